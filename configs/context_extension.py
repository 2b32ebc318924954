r"""Context extension: a character-level DecoderLM trained on 64-character rows of real English
text, evaluated on rows 2-8 times longer, with its positions inside attention as RoPE (with and
without each frequency scaling, applied at evaluation only), ALiBi, or none (NoPE).

The text is the King James Bible from Debian packages (no download at run time):

  apt-get install diatheke sword-text-kjv sword-text-sparv
  python experiments/bible_corpus.py --out data/bible

The whole study (every positional x seed of `sweep()`, then the evaluation at every length and
scaling, the table, JSON and figure) is one command:

  PYTHONPATH=$PWD python experiments/context_extension.py --workdir runs/context \
      --out experiments/figures

One run of it alone:

  python experiments/train.py --config configs/context_extension.py:positional=rope,seed=1 \
      --workdir runs/context/rope_seed1

Arguments (`:key=value,...`): positional in POSITIONALS, seed, train_length (characters per
training row), smoke. The training text is one document (`lm_documents='file'`), so every row
is contiguous text whose positions run 0..length-1.
"""

from __future__ import annotations

import pathlib

from attn_jax.experiment.config import base_config
from configs import common

POSITIONALS = ('rope', 'alibi', 'nope')
SEEDS = (0, 1, 2)
TRAIN_LENGTH = 64
EVAL_FACTORS = (1, 2, 4, 8)  # evaluation rows of TRAIN_LENGTH times these
DATA = 'data/bible'  # written by experiments/bible_corpus.py
_SMOKE_FILE = pathlib.Path(__file__).resolve().parents[1] / 'tests/data/fixtures/tiny.en'
MODEL = dict(d_model=128, d_ff=512, num_encoder_layers=0, num_decoder_layers=4,
             norm_position='pre', dropout_rate=0.0, attention=dict(num_heads=4))
SMOKE_MODEL = dict(d_model=32, d_ff=64, num_encoder_layers=0, num_decoder_layers=1,
                   norm_position='pre', dropout_rate=0.0, attention=dict(num_heads=2))


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'positional': POSITIONALS}, positional='rope', seed=0,
                       train_length=TRAIN_LENGTH)
  if a.seed < 0 or a.train_length < 8:
    raise ValueError(f'config arg seed={a.seed} must be >= 0 and train_length='
                     f'{a.train_length} >= 8')
  positional = 'none' if a.positional == 'nope' else a.positional
  model = dict(SMOKE_MODEL if a.smoke else MODEL, positional=positional)
  c = base_config('local', 'decoder_lm', 'tiny', **model)
  c.arg = arg or ''
  d = c.data
  d.local.task = 'lm'
  d.local.lm_documents = 'file'  # one document: rows of contiguous text, positions 0..L-1
  if a.smoke:
    d.local.train = d.local.validation = str(_SMOKE_FILE)  # a check of the code, not a result
  else:
    d.local.train, d.local.validation = f'{DATA}/train.en', f'{DATA}/dev.en'
  d.batching = 'concat'
  d.tokenizer.kind = 'char'
  d.max_length = a.train_length
  d.batch_size, d.eval_batch_size = 32, 32
  d.eval_splits = 'validation'
  c.optim.learning_rate = 2e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.1
  c.train.seed = a.seed
  c.train.num_steps = 2_000
  c.train.log_every = 250
  c.train.eval_every = 1_000
  c.train.checkpoint_every = 1_000
  c.train.max_eval_batches = 20
  c.eval.num_samples = 0
  c.eval.attention_examples = 0
  if a.smoke:
    common.apply_smoke(c)
    c.eval.num_samples = c.eval.attention_examples = 0  # the study scores losses only
  c.lock()
  return c


def run_name(positional: str, seed: int) -> str:
  return f'{positional}_seed{seed}'


def sweep():
  """Every positional x seed: 3 x 3 = 9 runs (experiments/context_extension.py runs them,
  then evaluates every length and RoPE scaling)."""
  return [{'arg': f'positional={p},seed={s}', 'name': run_name(p, s)}
          for p in POSITIONALS for s in SEEDS]
