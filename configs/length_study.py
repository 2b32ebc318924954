r"""Length study (Bahdanau et al. 2014, Figure 2): accuracy against sequence length.

Each model trains on sequences of 1..L symbols (`train_max=L`) and is scored on every length
1..2L of the test split. The whole study (train the three models, evaluate, write the JSON,
table and plot) is one command, resumable, which prints each model's commands:

  PYTHONPATH=$PWD python experiments/length_study.py --workdir runs/length_study

One model of it, trained alone (the study reuses this workdir):

  python experiments/train.py --config configs/length_study.py:model=rnn \
      --workdir runs/length_study/rnn

Arguments (`:key=value,...`): task in TASKS, model in MODELS (`rnn` = RNN encoder-decoder with
additive attention, `rnn_noattn` = the same without attention), train_max (L), smoke (seconds,
for tests). Numbers: `--config.train.num_steps=...`, `--config.optim.learning_rate=...`.

The sizes are chosen so each model trains in a few minutes on a 2-core CPU; the training split
holds lengths 1..L, validation too (in-range), test 1..2L, and `data.max_length` covers 2L
symbols plus EOS so nothing is truncated and the decoder may emit up to 2L + 1 tokens.
"""

from __future__ import annotations

from configs import algorithmic, common

TASKS = ('reverse', 'copy', 'sort')
MODELS = ('rnn_noattn', 'rnn', 'transformer')
LABELS = {'rnn_noattn': 'RNN encoder-decoder, no attention',
          'rnn': 'RNN encoder-decoder + additive attention',
          'transformer': 'Transformer'}
EXAMPLES_PER_LENGTH = 50  # Expected test examples per length (lengths are drawn uniformly).


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'task': TASKS, 'model': MODELS}, task='reverse',
                       model='transformer', train_max=20)
  if a.train_max < 1:
    raise ValueError(f'config arg train_max={a.train_max} must be >= 1')
  n = 3 if a.smoke else a.train_max  # L, the longest training length
  if a.smoke:
    transformer = dict(d_model=32, d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                       attention=dict(num_heads=2))
    rnn = dict(embed_dim=16, hidden_dim=16, attention_dim=16)
  else:
    transformer = dict(d_model=64, d_ff=256, num_encoder_layers=2, num_decoder_layers=2,
                       attention=dict(num_heads=4))
    rnn = dict(embed_dim=32, hidden_dim=96, attention_dim=64)
  c = algorithmic.seq2seq_config(
      a.task, a.model, transformer=dict(transformer, positional='sinusoidal'), rnn=rnn)
  c.arg = arg or ''

  alg = c.data.algorithmic
  alg.train_length = (1, n)
  alg.test_length = (1, 2 * n)  # in-range and longer lengths in one split
  alg.num_train, alg.num_validation = 20_000, 500
  alg.num_test = EXAMPLES_PER_LENGTH * 2 * n
  c.data.max_length = 2 * n + 1  # symbols + EOS: no test example is truncated
  c.train.seed = 0  # init and shuffling; data content is data.data_seed (0)
  c.train.num_steps = 3_000
  c.train.log_every = 100
  c.train.eval_every = 0  # only at the end: the study scores the test split itself
  c.train.checkpoint_every = 1_000
  c.train.tensorboard = False
  c.eval.decode_method = 'greedy'
  c.eval.decode_splits = 'validation'  # in-range exact match at the end of training
  c.eval.attention_examples = 0  # experiments/attention_maps.py draws them

  if a.smoke:
    common.apply_smoke(c)
    alg.num_train, alg.num_validation = 64, 16
    alg.num_test = 4 * 2 * n
    # The study decodes the test split itself: no decoding or plots while training.
    c.eval.exact_match = False
    c.eval.attention_examples = 0
  c.lock()
  return c


def sweep():
  """The study's three models (experiments/length_study.py runs them and compares)."""
  return [{'arg': f'model={m}', 'name': m} for m in MODELS]
