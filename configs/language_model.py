r"""Language modelling and text generation with a decoder-only Transformer.

  PYTHONPATH=$PWD python experiments/train.py --config configs/language_model.py \
      --workdir /tmp/attn_jax/shakespeare        # tiny_shakespeare, characters (TFDS download)
  python experiments/train.py --config configs/language_model.py:data=local,size=small \
      --workdir /tmp/attn_jax/my_lm --config.data.local.train=/data/corpus.txt \
      --config.data.local.lm_documents=paragraph --config.data.local.validation_fraction=0.05

Arguments: data in DATA, size in SIZES, positional in POSITIONALS (where position enters
attention: added sinusoids/learned table, or RoPE / ALiBi / T5 bias inside attention), smoke.
Eval reports loss and perplexity per split and writes sampled continuations of validation
prompts (`config.eval.temperature`, `top_k`, `top_p`) to `workdir/samples/step_<N>.txt`.
"""

from __future__ import annotations

import pathlib

from attn_jax.experiment.config import base_config
from configs import common

DATA = {'shakespeare': 'tiny_shakespeare', 'lm1b': 'lm1b', 'local': 'local'}
SIZES = ('tiny', 'small', 'base')
POSITIONALS = ('rope', 'sinusoidal', 'learned', 'alibi', 't5')
_SMOKE_FILE = pathlib.Path(__file__).resolve().parents[1] / 'tests/data/fixtures/tiny.en'


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'data': DATA, 'size': SIZES, 'positional': POSITIONALS},
                       data='shakespeare', size='small', positional='rope')
  dataset = 'local' if a.smoke else DATA[a.data]
  model = dict(positional=a.positional, norm_position='pre', num_encoder_layers=0,
               dropout_rate=0.1)
  if a.smoke:
    model.update(d_model=32, d_ff=64, num_decoder_layers=1, dropout_rate=0.0,
                 attention=dict(num_heads=4))
  c = base_config(dataset, 'decoder_lm', 'tiny' if a.smoke else a.size, **model)
  c.arg = arg or ''

  d = c.data
  d.local.task = 'lm'
  d.batching = 'concat'  # rows of exactly max_length tokens cut from concatenated documents
  d.tokenizer.kind = 'sentencepiece' if a.data == 'lm1b' else 'char'
  d.tokenizer.vocab_size = 32_000
  d.max_length = 256 if a.data == 'shakespeare' else 128
  d.batch_size, d.eval_batch_size = 32, 32
  c.optim.learning_rate = 1e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.99
  c.train.num_steps = 5_000 if a.data == 'shakespeare' else 100_000
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.max_eval_batches = 50
  c.train.best_metric = 'validation/loss' if a.data != 'lm1b' else 'test/loss'
  c.eval.decode_method = 'sample'
  c.eval.temperature = 0.8
  c.eval.top_k = 40
  c.eval.prompt_length = 16
  c.eval.sample_length = 128
  c.eval.attention_examples = 1
  if a.data == 'local':
    d.local.validation_fraction = 0.05

  if a.smoke:
    common.apply_smoke(c)
    d.local.train = str(_SMOKE_FILE)
    d.local.validation_fraction = 0.1
    d.max_length = 32
    c.eval.prompt_length = 4
    c.train.best_metric = ''
  c.lock()
  return c


def sweep():
  """Where position information enters attention, at the small size on Shakespeare."""
  return [{'arg': f'data=shakespeare,positional={p}', 'name': f'shakespeare_{p}'}
          for p in POSITIONALS]
