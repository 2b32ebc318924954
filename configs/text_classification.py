r"""Text classification with a Transformer encoder: IMDB reviews, AG News, or your labelled file.

  PYTHONPATH=$PWD python experiments/train.py --config configs/text_classification.py:data=imdb \
      --workdir /tmp/attn_jax/imdb          # downloads through TFDS on first use
  python experiments/train.py --config configs/text_classification.py:data=local \
      --workdir /tmp/attn_jax/mine --config.data.local.train=/data/train.tsv \
      --config.data.local.validation_fraction=0.1   # TSV/CSV with text,label columns or JSONL

Arguments: data in DATA, size in SIZES (a transformer_config variant), pooling in POOLINGS,
tokenizer in TOKENIZERS (bytes need no training; sentencepiece is trained on the train split),
smoke (a tiny model on a bundled 60-line file). Reports accuracy and loss per eval split and
encoder self-attention heatmaps at the end.
"""

from __future__ import annotations

import pathlib

from attn_jax.experiment.config import base_config
from configs import common

DATA = {'imdb': 'imdb_reviews', 'ag_news': 'ag_news_subset', 'local': 'local'}
SIZES = ('tiny', 'small', 'base')
POOLINGS = ('mean', 'cls')
TOKENIZERS = ('byte', 'sentencepiece')
_SMOKE_FILE = (pathlib.Path(__file__).resolve().parents[1]
               / 'tests/configs/fixtures/tiny_reviews.tsv')


def get_config(arg: str | None = None):
  a = common.parse_arg(
      arg, choices={'data': DATA, 'size': SIZES, 'pooling': POOLINGS, 'tokenizer': TOKENIZERS},
      data='imdb', size='small', pooling='mean', tokenizer='byte')
  dataset = 'local' if a.smoke else DATA[a.data]
  model = dict(pooling=a.pooling, num_decoder_layers=0, norm_position='pre')
  if a.smoke:
    model.update(d_model=32, d_ff=64, num_encoder_layers=1, dropout_rate=0.0,
                 attention=dict(num_heads=4))
  c = base_config(dataset, 'encoder_classifier', 'tiny' if a.smoke else a.size,
                             **model)
  c.arg = arg or ''

  d = c.data
  d.local.task = 'classification'
  d.tokenizer.kind = a.tokenizer
  d.tokenizer.vocab_size = 8_000
  d.max_length = 512 if a.tokenizer == 'sentencepiece' else 1024
  d.batch_size, d.eval_batch_size = 32, 64
  c.optim.learning_rate = 3e-4
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 0.01
  c.train.num_steps = 10_000
  c.train.log_every = 100
  c.train.eval_every = 1_000
  c.train.checkpoint_every = 1_000
  c.train.max_eval_batches = 100
  c.train.best_metric = f"{'validation' if a.data == 'local' else 'test'}/accuracy"
  c.train.best_mode = 'max'
  if a.data == 'local':
    d.local.validation_fraction = 0.1

  if a.smoke:
    common.apply_smoke(c)
    d.local.train = str(_SMOKE_FILE)
    d.local.validation_fraction = 0.2
    d.max_length = 64
    c.train.best_metric = ''
  c.lock()
  return c


def sweep():
  """Pooling x model size on IMDB."""
  return [{'arg': f'data=imdb,size={s},pooling={p}', 'name': f'imdb_{s}_{p}'}
          for s in ('tiny', 'small') for p in POOLINGS]
