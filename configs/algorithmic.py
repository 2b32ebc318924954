r"""Algorithmic seq2seq tasks (copy / reverse / sort / addition): Transformer vs RNN+attention.

The quickstart (reverse with a small Transformer; its time and accuracy on a 2-core CPU are in
the README, "Every config that runs on a CPU without downloads"):

  PYTHONPATH=$PWD python experiments/train.py --config configs/algorithmic.py \
      --workdir /tmp/attn_jax/reverse_transformer

The RNN encoder-decoder with additive (Bahdanau) attention, and its no-attention ablation:

  python experiments/train.py --config configs/algorithmic.py:model=rnn --workdir ...
  python experiments/train.py --config configs/algorithmic.py:model=rnn_noattn --workdir ...

Arguments (`:key=value,...`): task in TASKS, model in MODELS, generalize (test on longer
sequences than training: 21-40 symbols instead of 1-20), smoke (seconds, for tests).
Numbers: `--config.optim.learning_rate=3e-4 --config.train.num_steps=5000 ...`.
The eval hook reports `test/sequence_accuracy` (greedy decoding, exact match) overall and per
quarter of the target-length range (`test/sequence_accuracy_len_<lo>_<hi>`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from attn_jax.experiment.config import base_config
from configs import common

TASKS = ('copy', 'reverse', 'sort', 'addition')
MODELS = ('transformer', 'rnn', 'rnn_noattn')


def seq2seq_config(task: str, model: str, *, transformer: dict[str, Any],
                   rnn: dict[str, Any]) -> ml_collections.ConfigDict:
  """`base_config` for an algorithmic seq2seq `task` with `model` in MODELS, and the batch
  sizes and AdamW schedule shared with `configs/length_study.py`.

  'transformer' is a pre-norm encoder_decoder built with the fields in `transformer`;
  'rnn' / 'rnn_noattn' the RNN encoder-decoder with additive / no attention built with the
  fields in `rnn`. No dropout. The RNN trains best at a higher rate. Unlocked: the caller
  sets the data and train fields of its experiment, then `lock()`s.
  """
  if model not in MODELS:
    raise ValueError(f'model={model!r} is not one of {MODELS}')
  if model == 'transformer':
    kind, overrides = 'encoder_decoder', dict(transformer, dropout_rate=0.0,
                                              norm_position='pre')
  else:
    attention = 'none' if model == 'rnn_noattn' else 'additive'
    kind, overrides = 'rnn_seq2seq', dict(rnn, attention=attention, dropout_rate=0.0)
  c = base_config(task, kind, 'tiny', **overrides)
  c.data.batch_size = 64
  c.data.eval_batch_size = 250
  c.optim.learning_rate = 2e-3 if model == 'transformer' else 3e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  return c


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'task': TASKS, 'model': MODELS}, task='reverse',
                       model='transformer', generalize=False)
  if a.smoke:
    transformer = dict(d_model=32, d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                       attention=dict(num_heads=4))
    rnn = dict(embed_dim=16, hidden_dim=32, attention_dim=16)
  else:
    transformer = dict(d_model=128, d_ff=256, num_encoder_layers=2, num_decoder_layers=2,
                       attention=dict(num_heads=4))
    rnn = dict(embed_dim=64, hidden_dim=128, attention_dim=64)
  c = seq2seq_config(a.task, a.model, transformer=transformer, rnn=rnn)
  c.arg = arg or ''

  alg = c.data.algorithmic
  alg.num_train, alg.num_validation, alg.num_test = 20_000, 500, 1_000
  if not a.generalize:
    alg.test_length = alg.train_length  # in-distribution test split
  longest = alg.test_length[1]
  # Tokens incl. EOS; addition inputs are two operands and '+'.
  c.data.max_length = 2 * longest + 2 if a.task == 'addition' else longest + 1
  # Addition has to learn its carries (most significant digit first) and needs three times the
  # steps of the other tasks: the README's table of every CPU config gives both runs.
  c.train.num_steps = 6_000 if a.task == 'addition' else 2_000
  c.train.log_every = 100
  # Greedy decoding of both eval splits is not free on a CPU: 2 (addition: 3) evals per run.
  c.train.eval_every = 2_000 if a.task == 'addition' else 1_000
  c.train.checkpoint_every = c.train.eval_every
  c.train.best_metric = 'validation/sequence_accuracy'
  c.train.best_mode = 'max'
  c.eval.decode_method = 'greedy'

  if a.smoke:
    common.apply_smoke(c)
    alg.num_train, alg.num_validation, alg.num_test = 64, 16, 16
    alg.train_length = alg.test_length = (1, 6)
    c.data.max_length = 16
    c.train.best_metric = ''
  c.lock()
  return c


def sweep():
  """Every task x model, and two learning rates for the RNNs."""
  runs = []
  for task in TASKS:
    runs.append({'arg': f'task={task},model=transformer', 'name': f'{task}_transformer'})
    for model in ('rnn', 'rnn_noattn'):
      for lr in (1e-3, 3e-3):
        runs.append({'arg': f'task={task},model={model}',
                     'overrides': {'optim.learning_rate': lr},
                     'name': f'{task}_{model}_lr{lr:g}'})
  return runs
