r"""Ablation (issues #13, #26): the baseline Transformer and one change at a time, on two
generated tasks and one real corpus, each variant at the learning rate it chose, three seeds.

The study is one command (`experiments/ablation.py`): it builds nothing but runs; the Bible
text is built first (Debian packages, no download of ours):

  apt-get install -y diatheke sword-text-kjv sword-text-sparv
  PYTHONPATH=$PWD python experiments/bible_corpus.py --out data/bible
  PYTHONPATH=$PWD python experiments/ablation.py --workdir runs/ablation \
      --out experiments/figures

It runs in two phases. Tuning: every variant of reverse and of the Bible LM (`TUNE_ON`: sort
takes reverse's choice) at each learning rate of LR_SCALES (times the task's base rate) on seed
TUNE_SEED, which no reported run uses; each keeps the rate with the best validation score of
the run's own final evaluation (`TUNE_METRICS`). Final: every task x variant at its rate, on
SEEDS; the table reports those runs only, each cell's mean with a 95% t-interval over seeds.

One run alone (the study reuses these workdirs):

  python experiments/train.py \
      --config configs/ablation.py:task=reverse,variant=rope,seed=1,lr=2 \
      --workdir runs/ablation/reverse_rope_lr2_seed1

Arguments (`:key=value,...`): task in TASKS, variant in VARIANTS, seed (init and shuffling;
the generated data are the same for every seed), lr (a factor of the task's base rate: 0.5,
1 or 2 in the study), smoke.

Tasks and what the table reports (`METRICS`; every number comes from the evaluation after
training, `attn_jax.experiment.ablation_eval`, on EVAL_EXAMPLES examples per split):
- `reverse`: train on 1-20 symbols; exact match of greedy decoding in range (validation), and
  token accuracy of greedy (free-running) decoding on 21-40 symbols (test): exact match there is
  0 for every variant, the tokens still rank them.
- `sort`: train on 1-20 symbols of 40 (instead of 10), exact match in range, and free-running
  token accuracy on 21-40 symbols: sorting 1-20 of 10 symbols was at the ceiling (0.96-1.00).
- `listops` (single runs only, not in the study: see STUDY_TASKS): ListOps at the CPU size
  of configs/listops.py, test accuracy (10 classes).
- `bible`: character-level language modelling of the King James Bible (verses, the books of
  experiments/bible_corpus.py's splits), bits per character on the held-out test books, at an
  equal wall-clock training budget (`BUDGET_MINUTES`, compilation included), so a slower
  variant trains fewer steps.
Runs are sized for a 2-core CPU with two runs at a time (see experiments/ablation.py for the
measured times and the sweep's total).
"""

from __future__ import annotations

import pathlib
from typing import Any

from attn_jax.experiment.config import base_config
from configs import algorithmic, common

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ('reverse', 'sort', 'listops', 'bible')
# The tasks the study sweeps. ListOps stays a task of this config for single runs, but not of
# the study: at this size it barely separated the variants (16 of 20 within 0.32-0.37 in the
# previous table), and its 6 runs per variant would cost about an hour of the study's budget,
# better spent on seeds, the learning-rate grid and the real-data task.
STUDY_TASKS = ('reverse', 'sort', 'bible')
SEEDS = (0, 1, 2)
TUNE_SEED = 100  # the learning-rate choice's own seed: no reported run uses it
LR_SCALES = (0.5, 1.0, 2.0)
BASE_LR = {'reverse': 3e-3, 'sort': 3e-3, 'listops': 2e-3, 'bible': 2e-3}

# variant -> (label, TransformerConfig overrides); 'baseline' first, then one change each.
# The MLA sizes are relative to the model's (`_latent`): latent rank d_model / 2, RoPE part
# head_dim / 2 (DeepSeek-V2's ratio for the latter); MLA needs RoPE, so it adds RoPE too.
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
    'latent': ('MLA: latent K/V (rank d/2) + decoupled RoPE', dict(
        positional='rope', attention=dict(kind='latent'))),
    'differential': ('differential attention (Ye et al.)',
                     dict(attention=dict(kind='differential'))),
    'gated': ('sigmoid output gate per head (Qwen)', dict(attention=dict(output_gate=True))),
    'value_residual': ('value residual to layer 1 (ResFormer)',
                       dict(attention=dict(value_residual=True))),
    'talking_heads': ('talking heads (Shazeer et al.)', dict(attention=dict(talking_heads=True))),
    'memory_kv': ('4 learned memory K/V slots', dict(attention=dict(num_memory_kv=4))),
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
# Cells that do not exist: a decoder-only LM has no encoder to aggregate backward.
SKIPPED = {('bible', 'backward_aggregation')}

# The table's columns: task -> {label: (split, score)}, scores of `ablation_eval`; 'bpc' is
# lower-better, the rest higher-better.
METRICS = {
    'reverse': {'exact, 1-20': ('validation', 'exact'),
                'tokens free-running, 21-40': ('test', 'tokens')},
    'sort': {'exact, 1-20': ('validation', 'exact'),
             'tokens free-running, 21-40': ('test', 'tokens')},
    'listops': {'accuracy': ('test', 'accuracy')},
    'bible': {'test bits/char': ('test', 'bpc')},
}
# Which task's tuning runs choose each task's rate. Sort takes the rate its variant chose on
# reverse: the two share the model, the steps, the batch and the base rate, and tuning sort
# too would add 78 runs (about 0.6 h of the study) for little. {'sort': 'sort'} tunes it alone.
TUNE_ON = {'reverse': 'reverse', 'sort': 'reverse', 'listops': 'listops', 'bible': 'bible'}
# What each cell's learning rate is chosen on: the tuning run's own final evaluation of the
# validation split (no decoding: exact match of the teacher-forced outputs for reverse and sort,
# the loss for the Bible), and whether higher ('max') or lower ('min') is better.
TUNE_METRICS = {'reverse': ('validation/tf_sequence_accuracy', 'max'),
                'sort': ('validation/tf_sequence_accuracy', 'max'),
                'listops': ('validation/accuracy', 'max'), 'bible': ('validation/loss', 'min')}

MODEL = dict(d_model=48, d_ff=96, num_encoder_layers=2, num_decoder_layers=2,
             attention=dict(num_heads=4))
LM_MODEL = dict(d_model=64, d_ff=128, num_encoder_layers=0, num_decoder_layers=3,
                attention=dict(num_heads=4))
SMOKE_MODEL = dict(d_model=32, d_ff=64, num_encoder_layers=1, num_decoder_layers=1,
                   attention=dict(num_heads=4))
STEPS = 700
BATCH = 32
EVAL_EXAMPLES = 2000  # per split: binomial standard error <= 0.011 per run
BUDGET_MINUTES = 1.0  # per Bible run, compilation included
LM_LENGTH, LM_BATCH = 128, 16
LM_EVAL_BATCH = 128  # rows of LM_LENGTH characters: the test books are about 660 rows
BIBLE = ROOT / 'data' / 'bible'
_SMOKE_TEXT = ROOT / 'tests' / 'data' / 'fixtures' / 'tiny.en'
# What the table's note says about every run (experiments/ablation.py copies it).
SETTINGS = {
    'model': 'pre-norm, d_model 48, 4 heads, d_ff 96, 2+2 layers (Bible LM: d_model 64, '
             'd_ff 128, 3 decoder layers), no dropout',
    'training': f'{STEPS} steps of batch {BATCH} (Bible: {BUDGET_MINUTES} wall-clock minutes '
                f'of batch {LM_BATCH} x {LM_LENGTH} characters), AdamW, warmup and cosine decay',
    'learning rate': f'per variant and task, the best of {LR_SCALES} x the task base {BASE_LR} '
                     f'on seed {TUNE_SEED} (validation: teacher-forced exact match; Bible: '
                     'loss); sort takes the rate chosen on reverse',
    'evaluation': f'after training, {EVAL_EXAMPLES} examples per split (Bible: the test books); '
                  'greedy decoding for reverse and sort',
    'data': 'reverse on 1-20 of 10 symbols, sort on 1-20 of 40 symbols (tested on 1-20 and '
            '21-40); King James Bible, characters (test: 10 held-out books)',
    'seeds': f'{SEEDS}; intervals: 95% t-interval of the mean over seeds',
}


def run_name(task: str, variant: str, seed: int, lr: float) -> str:
  return f'{task}_{variant}_lr{lr:g}_seed{seed}'


def _latent(model: dict[str, Any]) -> dict[str, Any]:
  head_dim = model['d_model'] // model['attention']['num_heads']
  return dict(kv_lora_rank=model['d_model'] // 2, qk_rope_head_dim=head_dim // 2)


def _model(task: str, variant: str, seed: int, smoke: bool) -> dict[str, Any]:
  base = SMOKE_MODEL if smoke else (LM_MODEL if task == 'bible' else MODEL)
  change = VARIANTS[variant][1]
  model = {**base, **change, 'attention': {**base['attention'], **change.get('attention', {})}}
  if task == 'listops':
    model['num_decoder_layers'] = 0
  if task == 'bible':
    model['num_encoder_layers'] = 0
  attention = model['attention']
  if attention.get('kind') == 'performer':
    # Redrawn per seed, fixed during training; but one draw for the Bible's budgeted runs: the
    # features are constants of the compiled step, and a program compiled anew per seed would
    # spend its compilation out of the budget that the other variants' cached programs save.
    attention['performer_seed'] = 0 if task == 'bible' else seed
  if attention.get('kind') == 'latent':
    attention.update(_latent(model))
  return model


def _seq2seq(task: str, model: dict[str, Any], smoke: bool):
  c = algorithmic.seq2seq_config(task, 'transformer', transformer=model, rnn={})
  alg = c.data.algorithmic
  alg.train_length, alg.test_length = (1, 20), (21, 40)  # validation: in range; test: longer
  if task == 'sort':
    alg.num_symbols = 40
  alg.num_train, alg.num_validation, alg.num_test = 20_000, EVAL_EXAMPLES, EVAL_EXAMPLES
  c.data.max_length = alg.test_length[1] + 1  # symbols + EOS: nothing is truncated
  c.data.max_target_length = 0
  c.eval.decode_method = 'greedy'
  c.eval.exact_match = False  # decoded once, after training, by ablation_eval
  if smoke:
    alg.num_train, alg.num_validation, alg.num_test = 64, 16, 16
    alg.train_length, alg.test_length = (1, 6), (7, 12)
    c.data.max_length = alg.test_length[1] + 1
  return c


def _listops(model: dict[str, Any], smoke: bool):
  c = base_config('listops', 'encoder_classifier', 'tiny', **model, pooling='mean',
                  norm_position='pre', dropout_rate=0.0)
  lo = c.data.listops
  lo.length, lo.max_depth, lo.max_args = (10, 100), 4, 5  # configs/listops.py, size=cpu
  lo.num_train, lo.num_validation, lo.num_test = 20_000, EVAL_EXAMPLES, EVAL_EXAMPLES
  c.data.max_length = 104
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  if smoke:
    lo.length, lo.max_depth, lo.max_args = (5, 30), 3, 3
    lo.num_train, lo.num_validation, lo.num_test = 64, 16, 16
    c.data.max_length = 32
  return c


def _bible(model: dict[str, Any], smoke: bool):
  c = base_config('local', 'decoder_lm', 'tiny', **model, norm_position='pre', dropout_rate=0.0)
  d = c.data
  d.local.task, d.local.lm_documents = 'lm', 'line'  # a verse per line
  d.local.train, d.local.validation, d.local.test = (
      str(BIBLE / f'{split}.en') for split in ('train', 'dev', 'test'))
  d.tokenizer.kind = 'char'
  d.batching = 'concat'  # rows of exactly max_length characters across verses
  d.max_length = LM_LENGTH
  c.optim.schedule = 'warmup_cosine'  # on the fraction of the budget spent
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.99
  c.train.budget_minutes = BUDGET_MINUTES
  c.train.num_steps = 1_000_000  # the budget ends every run
  c.eval.num_samples = 0
  if smoke:
    d.local.train, d.local.validation, d.local.test = str(_SMOKE_TEXT), '', ''
    d.local.validation_fraction = d.local.test_fraction = 0.2
    d.max_length = 32
    c.train.budget_minutes = 0.0
  return c


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, choices={'task': TASKS, 'variant': tuple(VARIANTS)},
                       task='reverse', variant='baseline', seed=0, lr=1.0)
  if a.seed < 0 or a.lr <= 0:
    raise ValueError(f'config arg seed={a.seed} must be >= 0 and lr={a.lr} > 0')
  if (a.task, a.variant) in SKIPPED:
    raise ValueError(f'config arg variant={a.variant!r} does not apply to task={a.task!r}')
  model = _model(a.task, a.variant, a.seed, a.smoke)
  norm_position = model.pop('norm_position', 'pre')
  build = {'listops': _listops, 'bible': _bible}.get(a.task)
  c = build(model, a.smoke) if build else _seq2seq(a.task, model, a.smoke)
  c.model.norm_position = norm_position  # the shared builders fix pre-norm
  c.arg = arg or ''
  c.train.seed = a.seed
  c.optim.learning_rate = BASE_LR[a.task] * a.lr
  if a.task != 'bible':
    c.train.num_steps = STEPS
  c.data.batch_size, c.data.eval_batch_size = BATCH, EVAL_EXAMPLES
  c.train.max_eval_batches = 1  # of EVAL_EXAMPLES rows: the whole split
  if a.task == 'bible':
    c.data.batch_size, c.data.eval_batch_size = LM_BATCH, LM_EVAL_BATCH
    c.train.max_eval_batches = 0  # the whole split, a few batches
  c.train.log_every = 100
  c.train.eval_every = 0  # one loss evaluation, at the end; the scores come after training
  c.train.checkpoint_every = 0
  c.train.best_metric = ''
  c.train.tensorboard = False
  c.train.progress = False
  # Few padded lengths, few compiles: reverse and sort train on one (24 tokens) and test on
  # two; ListOps two (56, 104), which halves the work of its many short expressions.
  c.data.num_length_buckets = 1 if a.task in ('reverse', 'sort') else 2
  c.data.eval_splits = 'validation,test'
  c.eval.attention_examples = 0
  if a.smoke:
    common.apply_smoke(c)
    c.data.eval_splits = 'validation,test'  # the evaluation reads both
    c.data.eval_batch_size = 16
  c.lock()
  return c


def _entries(cells, seeds, lr_of) -> list[dict[str, str]]:
  return [{'arg': f'task={t},variant={v},seed={s},lr={lr:g}', 'name': run_name(t, v, s, lr)}
          for t, v in cells for s in seeds for lr in lr_of(t, v)]


def cells(tasks=None) -> list[tuple[str, str]]:
  """Every (task, variant) of the study's table (of `tasks`), task-major."""
  return [(t, v) for t in tasks or STUDY_TASKS for v in VARIANTS if (t, v) not in SKIPPED]


def sweep():
  """The tuning phase: every variant of the tasks that choose rates (TUNE_ON) at every rate of
  LR_SCALES on TUNE_SEED (the study command then runs `final_sweep` at the rates chosen)."""
  tuned = [t for t in STUDY_TASKS if t in TUNE_ON.values()]
  return _entries(cells(tuned), (TUNE_SEED,), lambda t, v: LR_SCALES)


def final_sweep(lr_choice: dict[str, float], only: set[str] | None = None):
  """The reported runs: every cell (or those named `'<task>/<variant>'` in `only`) on SEEDS at
  the rate chosen for it, `lr_choice['<TUNE_ON[task]>/<variant>']`."""
  chosen = [(t, v) for t, v in cells() if only is None or f'{t}/{v}' in only]
  missing = sorted({f'{TUNE_ON[t]}/{v}' for t, v in chosen} - set(lr_choice))
  if missing:
    raise ValueError(f'no learning rate chosen for {missing[:5]} (and {len(missing)} in all)')
  return _entries(chosen, SEEDS, lambda t, v: (lr_choice[f'{TUNE_ON[t]}/{v}'],))
