"""The `train`, `optim` and `parallel` sections of a config: every field `train_loop`,
`optim.make_optimizer` and `parallel` read, with its default.

    c = full_config()                  # {optim, train, parallel}
    c.optim.learning_rate = 3e-4

This module imports only `ml_collections`, so experiment config files can build these
sections without loading JAX; the modules that read a section validate it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ml_collections

BATCH_AXES = ('data', 'fsdp')
# Logical axis names used by attn_jax.models -> mesh axes. Names a model uses but no rule
# mentions stay replicated. Embedding-sized dims are split by fsdp (ZeRO-3 style), per-head and
# MLP-hidden dims by tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('kv', None),
    ('head_dim', None),
    ('length', None),
)


def default_train() -> ml_collections.ConfigDict:
  """The `config.train` section with every field `train_loop` reads."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  # > 0: a compute budget in wall-clock minutes (compilation and periodic evals included; the
  # final eval not). Training stops at whichever of the budget and num_steps comes first,
  # with a checkpoint and the final eval, and the learning-rate schedule runs on the fraction
  # of the run done, max(time spent / budget, step / num_steps), so its warmup
  # (optim.warmup_fraction) and decay complete inside the budget. The time spent is stored in
  # each checkpoint: a resumed run (even after kill -9) spends only what is left.
  c.budget_minutes = 0.0
  # > 1: at the end of training, also evaluate the mean of the parameters of the last N
  # checkpoints (Vaswani et al. 2017), as 'averaged/<metric>'; needs keep_checkpoints >= N.
  c.average_last = 0
  c.log_every = 100
  c.eval_every = 1000  # 0 = only at the end.
  # 0 = only at the end (and on SIGTERM / data exhaustion). Best-checkpoint tracking ranks
  # the checkpoints saved at eval steps, so make this a multiple of eval_every.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.best_metric = ''  # e.g. 'valid/loss': that checkpoint is kept too.
  # 'min' | 'max' | '' = the direction the task declares for best_metric (loss: min,
  # accuracy: max, ...; see attn_jax.train.metrics.best_mode).
  c.best_mode = ''
  c.async_checkpoint = True
  # A workdir whose checkpoint holds a state of other shapes than this config builds (a changed
  # model size, optimizer...): 'error' stops before anything is written; 'restart' moves the
  # old run whole into workdir/replaced_<n>/ and trains from step 0. Either way the old run
  # stays intact; changes that keep the state's shapes (steps, eval, learning rate) resume.
  c.on_mismatch = 'error'
  c.nonfinite = 'skip'  # 'skip' the update, or 'raise' (stop naming the step).
  c.max_eval_batches = 0  # 0 = whole eval iterable.
  c.tensorboard = True
  c.progress = True
  c.preemption_check_every = 10  # Multi-process only (a collective); 1 process polls every step.
  # The utilisation logged beside steps/s and tokens/s is the step's FLOPs (XLA's count) per
  # second over this peak, in FLOP/s per device; 0 = measure a float32 matmul at start (on CPU
  # the host's rate, shared by all its devices).
  c.peak_flops = 0.0
  # > 0: a jax.profiler trace of that many steps, after profile_skip steps (compilation), into
  # workdir/profile/ (TensorBoard's profile plugin, or its .trace.json.gz in ui.perfetto.dev).
  c.profile_steps = 0
  c.profile_skip = 3
  return c


def default_optim() -> ml_collections.ConfigDict:
  """The `config.optim` section with every field `optim.make_optimizer` reads."""
  c = ml_collections.ConfigDict()
  c.name = 'adamw'
  c.learning_rate = 1e-3
  c.schedule = 'warmup_rsqrt'
  c.warmup_steps = 1000
  c.warmup_fraction = 0.05  # Warmup length as a fraction of the run: with train.budget_minutes.
  c.total_steps = 0  # Cosine/linear decay length in updates; 0 = train_loop fills it in.
  c.end_lr_factor = 0.0  # Final lr = learning_rate * end_lr_factor for cosine/linear.
  c.b1 = 0.9
  c.b2 = 0.98
  c.eps = 1e-9
  c.weight_decay = 0.0
  c.momentum = 0.9  # sgd only
  c.clip_grad_norm = 1.0  # <= 0 disables clipping.
  c.grad_accum_steps = 1
  return c


def default_parallel() -> ml_collections.ConfigDict:
  """`config.parallel`: mode, mesh axis sizes (-1 = all remaining devices), rules, multi-host."""
  c = ml_collections.ConfigDict()
  c.mode = 'none'
  # 'sequence' > 1 splits every sequence's length over that many devices (context
  # parallelism: self-attention runs as ring attention over the axis).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'sequence': 1, 'tensor': 1})
  c.logical_axis_rules = DEFAULT_RULES  # (logical name, mesh axis | tuple | None) pairs.
  c.coordinator_address = ''  # 'host:port'; '' = read JAX_COORDINATOR_ADDRESS or run alone.
  c.num_processes = 1
  c.process_id = 0
  return c


def full_config(**sections: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`{optim, train, parallel}` defaults, updated by any sections given."""
  c = ml_collections.ConfigDict({'optim': default_optim(), 'train': default_train(),
                                 'parallel': default_parallel()})
  for name, section in sections.items():
    c[name].update(section)
  return c


def _get_field(config: Any, field: str) -> Any:
  value = config
  for part in field.split('.'):
    try:
      value = value[part] if isinstance(value, dict) else getattr(value, part)
    except (AttributeError, KeyError):
      raise ValueError(f'config has no field {field!r}') from None
  return value


def validate_choices(config: Any, field: str, allowed: Iterable[Any], *,
                     where: str = 'config') -> Any:
  """Checks that `config.<field>` (dotted path) is one of `allowed` and returns it.

  `where` names `config` in the message, e.g. 'config.optim' for a section.

  Raises:
    ValueError: naming the field, the bad value and the allowed values.
  """
  allowed = tuple(allowed)
  value = _get_field(config, field)
  if value not in allowed:
    raise ValueError(f'{where}.{field}={value!r} is not one of {allowed}')
  return value
