r"""Image classification with a Vision Transformer (Dosovitskiy et al. 2021).

Offline, on the 1,797 real handwritten 8x8 digits that ship inside scikit-learn (the default;
a fixed split of 1,259 / 179 / 359 images), a small ViT in a few CPU minutes:

  python experiments/train.py --config configs/image_classification.py --workdir runs/digits

With a network, TFDS's MNIST and CIFAR-10 (downloaded and prepared once; preparing them needs
TensorFlow: `pip install -e '.[tf]'`):

  python experiments/train.py --config configs/image_classification.py:data=mnist \
      --workdir runs/mnist
  python experiments/train.py --config configs/image_classification.py:data=cifar10 \
      --workdir runs/cifar10

Arguments (`:key=value,...`): data in DATA, positional in POSITIONALS (patch positions: a
learned table, 2-D sinusoids added to the patch embeddings, or 2-D RoPE inside attention),
pooling ('mean' over patches or a 'cls' token), smoke. Every attention option of the text
models is `--config.model.attention.<field>=...` (e.g. `sliding_window`, `modifiers`). At
the end, `workdir/attention/step_<N>/patch_attention.png` shows where the model looks
(attention rollout over the patches of a few test images).
"""

from __future__ import annotations

from attn_jax.experiment.config import base_config
from configs import common

DATA = ('digits', 'mnist', 'cifar10')
POSITIONALS = ('rope_2d', 'learned', 'sinusoidal_2d', 'none')
POOLINGS = ('mean', 'cls')
# Per dataset: the ViT size, its patch, training steps, batch, learning rate.
SETTINGS = {
    'digits': dict(variant='tiny', patch_size=2, steps=5_000, batch=64, lr=2e-3),
    'mnist': dict(variant='tiny', patch_size=4, steps=10_000, batch=128, lr=1e-3),
    'cifar10': dict(variant='small', patch_size=4, steps=50_000, batch=128, lr=5e-4),
}


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'data': DATA, 'positional': POSITIONALS,
                                     'pooling': POOLINGS},
                       data='digits', positional='rope_2d', pooling='mean')
  s = SETTINGS[a.data]
  model = dict(patch_size=s['patch_size'], positional=a.positional, pooling=a.pooling,
               dropout_rate=0.1)
  if a.smoke:
    model.update(d_model=32, d_ff=64, num_layers=1, attention=dict(num_heads=2))
  c = base_config(a.data, 'vision_transformer', s['variant'], **model)
  c.arg = arg or ''
  c.data.batch_size, c.data.eval_batch_size = s['batch'], 256
  c.data.image.crop_padding = 1 if a.data == 'digits' else 4
  if a.data == 'digits':
    c.data.image.augment = 'crop'  # shifts by a pixel; flips would change a digit
  c.optim.learning_rate = s['lr']
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.05
  c.loss.label_smoothing = 0.1
  c.train.num_steps = s['steps']
  c.train.log_every = 250
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.best_metric = 'validation/accuracy'
  c.data.eval_splits = 'validation,test'
  c.eval.attention_examples = 8
  if a.smoke:
    common.apply_smoke(c)
    c.data.eval_splits = 'validation,test'
  c.lock()
  return c


def sweep():
  """The 2-D position schemes on the digits, three seeds each (12 runs of a few CPU minutes)."""
  return [{'arg': f'positional={p}', 'overrides': {'train.seed': seed},
           'name': f'digits_{p}_seed{seed}'} for p in POSITIONALS for seed in (0, 1, 2)]
