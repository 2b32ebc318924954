r"""ListOps (Long Range Arena): classify the value of a nested list expression, 10 classes.

  PYTHONPATH=$PWD python experiments/train.py --config configs/listops.py:size=cpu \
      --workdir /tmp/attn_jax/listops_cpu
  python experiments/train.py --config configs/listops.py:size=lra,attention=blockwise \
      --workdir /tmp/attn_jax/listops_lra      # the LRA size: 500-2000 tokens, an accelerator

Arguments: size in SIZES ('lra': the LRA recipe, 96k examples of up to 2000 tokens and a
4-layer 512-wide encoder; 'cpu': expressions of 10-100 tokens and a small encoder that learns
in minutes on a CPU), attention in ATTENTIONS (ops implementation; None = the op chooses),
pooling in POOLINGS, smoke. Numbers: `--config.data.listops.max_depth=6` etc.
"""

from __future__ import annotations

from attn_jax.experiment.config import base_config
from configs import common

SIZES = ('lra', 'cpu')
ATTENTIONS = ('auto', 'dense', 'blockwise', 'cudnn', 'pallas')
POOLINGS = ('mean', 'cls')


def get_config(arg: str | None = None):
  a = common.parse_arg(
      arg, choices={'size': SIZES, 'attention': ATTENTIONS, 'pooling': POOLINGS}, size='cpu',
      attention='auto', pooling='mean')
  implementation = None if a.attention == 'auto' else a.attention
  shared = dict(pooling=a.pooling, norm_position='pre', num_decoder_layers=0)
  if a.size == 'lra':
    model, heads = dict(d_model=512, d_ff=1024, num_encoder_layers=4, dropout_rate=0.1), 8
  else:
    model, heads = dict(d_model=128, d_ff=256, num_encoder_layers=2, dropout_rate=0.1), 4
  if a.smoke:
    model, heads = dict(d_model=32, d_ff=64, num_encoder_layers=1, dropout_rate=0.0), 4
  c = base_config('listops', 'encoder_classifier', 'tiny', **model, **shared,
                  attention=dict(num_heads=heads, implementation=implementation))
  c.arg = arg or ''

  lo = c.data.listops
  if a.size == 'cpu':
    lo.length, lo.max_depth, lo.max_args = (10, 100), 4, 5
    lo.num_train, lo.num_validation, lo.num_test = 20_000, 1_000, 1_000
    c.data.max_length = 104
    c.data.batch_size, c.data.eval_batch_size = 64, 200
    c.train.num_steps = 5_000
    c.optim.learning_rate = 1e-3
  else:  # LRA: 96k/2k/2k examples, length 500-2000, batch 32, 5k steps (Tay et al. 2020).
    c.data.max_length = 2048
    c.data.batch_size, c.data.eval_batch_size = 32, 32
    c.train.num_steps = 5_000
    c.optim.learning_rate = 5e-4
    c.optim.weight_decay = 0.1
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 500
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.best_metric = 'validation/accuracy'
  c.train.best_mode = 'max'

  if a.smoke:
    common.apply_smoke(c)
    lo.length, lo.max_depth, lo.max_args = (5, 30), 3, 3
    lo.num_train, lo.num_validation, lo.num_test = 64, 16, 16
    c.data.max_length = 32
    c.train.best_metric = ''
  c.lock()
  return c


def sweep():
  """Pooling x learning rate at the CPU size."""
  return [{'arg': f'size=cpu,pooling={p}', 'overrides': {'optim.learning_rate': lr},
           'name': f'listops_cpu_{p}_lr{lr:g}'} for p in POOLINGS for lr in (3e-4, 1e-3)]
