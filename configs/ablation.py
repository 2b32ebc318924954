r"""Ablation (issue #13): the baseline Transformer and one change at a time, on three tasks
where attention matters, two seeds each.

The whole study (every task x variant x seed of `sweep()`, resumable, then the table, JSON
and figure) is one command; the README's table comes from one run of it:

  PYTHONPATH=$PWD python experiments/ablation.py --workdir runs/ablation \
      --out experiments/figures

One run of it alone (the study reuses this workdir):

  python experiments/train.py --config configs/ablation.py:task=reverse,variant=rope,seed=1 \
      --workdir runs/ablation/reverse_rope_seed1

Arguments (`:key=value,...`): task in TASKS, variant in VARIANTS, seed (init, shuffling and
the Performer's random features; the data are the same for every seed), smoke.

Tasks: `reverse` trains on 1-20 symbols and is tested on 21-40 (validation: in range, test:
longer, both decoded greedily, exact match); `sort` on 1-20 symbols, tested in range;
`listops` at the CPU size of configs/listops.py (expressions of 10-100 tokens, 10 classes).
Each run is sized so that the 120 runs take about an hour on a 2-core CPU with two runs at a
time: a small pre-norm model (d=48, 4 heads, d_ff=96, 2+2 layers for the seq2seq tasks, 2
encoder layers for ListOps), 700 steps of batch 32, few padded lengths (few compiles), one
evaluation at the end on 250 examples per split. Measured with `experiments/ablation.py
--jobs=2` on the 2-core machine, the baseline's runs took 72 / 48 s (reverse, seed 0 / seed 1:
the second reuses the first's compiled programs), 64 / 47 s (sort) and 48 / 36 s (ListOps), for
in-range exact match 0.54 (reverse), 0.98 (sort) and accuracy 0.35 (ListOps, chance 0.12).
"""

from __future__ import annotations

from typing import Any

from attn_jax.experiment.config import base_config
from configs import algorithmic, common

TASKS = ('reverse', 'sort', 'listops')
SEEDS = (0, 1)
# variant -> (label, TransformerConfig overrides); 'baseline' first, then one change each.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    'baseline': ('baseline (pre-norm, sinusoidal, 4 heads)', {}),
    'shared_qk': ('shared query-key (Reformer)', dict(attention=dict(shared_qk=True))),
    'no_value_proj': ('no value projection', dict(attention=dict(value_projection=False))),
    'no_kv_proj': ('no key and no value projection',
                   dict(attention=dict(value_projection=False, key_projection=False))),
    'backward_aggregation': ('backward aggregation (encoder)',
                             dict(attention=dict(aggregation='backward'))),
    'concat_geometric': ('concatenated geometric positions',
                         dict(positional='concat_geometric')),
    'share_head_proj': ('one q/k/v projection for all heads',
                        dict(attention=dict(share_head_projections=True))),
    'share_layers': ('one layer for the whole stack (ALBERT)', dict(share_layers=True)),
    'linear': ('linear attention (Katharopoulos et al.)', dict(attention=dict(kind='linear'))),
    # m = 32 random features per head, about head_dim * ln(head_dim) as Choromanski et al.
    # 2021 suggest (head_dim 12).
    'performer': ('Performer, FAVOR+ (32 features)',
                  dict(attention=dict(kind='performer', performer_features=32))),
    'gqa': ('GQA, 2 key/value heads', dict(attention=dict(num_kv_heads=2))),
    'mqa': ('MQA, 1 key/value head', dict(attention=dict(num_kv_heads=1))),
    'learned': ('learned absolute positions', dict(positional='learned')),
    'rope': ('RoPE', dict(positional='rope')),
    'alibi': ('ALiBi', dict(positional='alibi')),
    't5': ('T5 relative bias', dict(positional='t5')),
    'nope': ('no positions (NoPE)', dict(positional='none')),
    'post_norm': ('post-norm', dict(norm_position='post')),
    'softcap': ('logit soft-cap 5', dict(attention=dict(logit_softcap=5.0))),
    'qk_norm': ('QK-norm', dict(attention=dict(qk_norm=True))),
}
LABELS = {name: label for name, (label, _) in VARIANTS.items()}
# The metric each task is compared on (the gather script reads these): reverse in range and
# beyond (exact match of greedy decoding; beyond, also the teacher-forced token accuracy, which
# still separates models that never get a whole longer sequence right), sort and ListOps on
# their test split.
METRICS = {
    'reverse': {'in range (1-20)': 'validation/sequence_accuracy',
                'longer (21-40)': 'test/sequence_accuracy',
                'longer, tokens': 'test/accuracy'},
    'sort': {'exact match': 'test/sequence_accuracy'},
    'listops': {'accuracy': 'test/accuracy'},
}
MODEL = dict(d_model=48, d_ff=96, num_encoder_layers=2, num_decoder_layers=2,
             attention=dict(num_heads=4))
SMOKE_MODEL = dict(d_model=32, d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                   attention=dict(num_heads=4))
STEPS = 700
BATCH = 32
EVAL_EXAMPLES = 250  # per split: one eval batch
# What the table's note says about every run (experiments/ablation.py copies it).
SETTINGS = {
    'model': 'pre-norm, d_model 48, 4 heads, d_ff 96, 2+2 layers (ListOps: 2 encoder layers, '
             'mean pooling), no dropout',
    'training': f'{STEPS} steps of batch {BATCH}, AdamW with warmup (100) and cosine decay, '
                'lr 3e-3 (ListOps 2e-3)',
    'evaluation': f'at the end, {EVAL_EXAMPLES} examples per split, greedy decoding for the '
                  'seq2seq tasks (exact match)',
    'data': 'reverse and sort on 1-20 symbols (reverse tested on 21-40); ListOps lengths '
            '10-100, depth 4',
    'chance': 'exact match about 0; ListOps majority class 0.12 of the test split',
}


def run_name(task: str, variant: str, seed: int) -> str:
  return f'{task}_{variant}_seed{seed}'


def _model(task: str, variant: str, seed: int, smoke: bool) -> dict[str, Any]:
  base, change = SMOKE_MODEL if smoke else MODEL, VARIANTS[variant][1]
  model = {**base, **change, 'attention': {**base['attention'], **change.get('attention', {})}}
  if task == 'listops':
    model['num_decoder_layers'] = 0
  if model['attention'].get('kind') == 'performer':
    model['attention']['performer_seed'] = seed  # redrawn per seed, fixed during training
  return model


def _seq2seq(task: str, model: dict[str, Any], smoke: bool):
  c = algorithmic.seq2seq_config(task, 'transformer', transformer=model, rnn={})
  alg = c.data.algorithmic
  alg.train_length = (1, 20)
  # reverse: validation in range, test beyond it; sort: both in range.
  alg.test_length = (21, 40) if task == 'reverse' else (1, 20)
  alg.num_train, alg.num_validation, alg.num_test = 20_000, EVAL_EXAMPLES, EVAL_EXAMPLES
  c.data.max_length = alg.test_length[1] + 1  # symbols + EOS: nothing is truncated
  c.data.max_target_length = 0
  c.optim.learning_rate = 3e-3  # short runs: a little above the shared 2e-3
  c.train.best_metric = 'validation/sequence_accuracy'
  c.eval.decode_method = 'greedy'
  if smoke:
    alg.num_train, alg.num_validation, alg.num_test = 64, 16, 16
    alg.train_length, alg.test_length = (1, 6), ((7, 12) if task == 'reverse' else (1, 6))
    c.data.max_length = alg.test_length[1] + 1
  return c


def _listops(model: dict[str, Any], smoke: bool):
  c = base_config('listops', 'encoder_classifier', 'tiny', **model, pooling='mean',
                  norm_position='pre', dropout_rate=0.0)
  lo = c.data.listops
  lo.length, lo.max_depth, lo.max_args = (10, 100), 4, 5  # configs/listops.py, size=cpu
  lo.num_train, lo.num_validation, lo.num_test = 20_000, EVAL_EXAMPLES, EVAL_EXAMPLES
  c.data.max_length = 104
  c.optim.learning_rate = 2e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  c.train.best_metric = 'validation/accuracy'
  if smoke:
    lo.length, lo.max_depth, lo.max_args = (5, 30), 3, 3
    lo.num_train, lo.num_validation, lo.num_test = 64, 16, 16
    c.data.max_length = 32
  return c


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'task': TASKS, 'variant': tuple(VARIANTS)},
                       task='reverse', variant='baseline', seed=0)
  if a.seed < 0:
    raise ValueError(f'config arg seed={a.seed} must be >= 0')
  model = _model(a.task, a.variant, a.seed, a.smoke)
  norm_position = model.pop('norm_position', 'pre')
  c = _listops(model, a.smoke) if a.task == 'listops' else _seq2seq(a.task, model, a.smoke)
  c.model.norm_position = norm_position  # the shared builders fix pre-norm
  c.arg = arg or ''
  c.train.seed = a.seed
  c.train.num_steps = STEPS
  c.data.batch_size, c.data.eval_batch_size = BATCH, EVAL_EXAMPLES
  c.train.log_every = 100
  c.train.eval_every = 0  # one evaluation, at the end
  c.train.checkpoint_every = 0
  c.train.best_mode = 'max'
  c.train.tensorboard = False
  c.train.progress = False
  # Few padded lengths, few compiles: reverse's training and validation batches take the
  # shorter of two (24 tokens), its longer test the other; sort has one (21); ListOps two
  # (56, 104), which halves the work of its many short expressions.
  c.data.num_length_buckets = 1 if a.task == 'sort' else 2
  c.data.eval_splits = 'validation,test'
  c.eval.attention_examples = 0
  if a.smoke:
    common.apply_smoke(c)
    c.data.eval_splits = 'validation,test'  # the gather reads both
    c.train.best_metric = ''
  c.lock()
  return c


def sweep():
  """Every task x variant x seed: 3 x 20 x 2 = 120 runs (experiments/ablation.py runs them and
  gathers the table)."""
  return [{'arg': f'task={t},variant={v},seed={s}', 'name': run_name(t, v, s)}
          for t in TASKS for v in VARIANTS for s in SEEDS]
