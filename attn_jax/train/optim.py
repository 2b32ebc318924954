"""Optimizers and learning-rate schedules built from a `config.optim` ConfigDict section.

    tx, schedule = optim.make_optimizer(config.optim)

The chain is `clip_by_global_norm -> adam(w)` (decoupled weight decay masked off biases and
normalization scales), optionally wrapped in `optax.MultiSteps` for gradient accumulation.
`schedule(update_count)` is returned too, so the train step can log the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from attn_jax.train.config import validate_choices

OPTIMIZERS = ('adamw', 'adam', 'sgd')
SCHEDULES = ('constant', 'warmup_constant', 'warmup_rsqrt', 'warmup_cosine', 'warmup_linear')
# Parameter names (last path component) that never get weight decay: biases and the scales of
# LayerNorm/RMSNorm. Decaying them pulls norms towards zero and biases towards a prior nobody
# wants; 1-D parameters are excluded for the same reason even under other names.
NO_DECAY_NAMES = ('bias', 'scale', 'embedding_scale')


def _num(config: Any, field: str, *, low: float, high: float | None = None,
         low_inclusive: bool = True) -> float:
  value = config[field]
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise ValueError(f'config.optim.{field}={value!r} must be a number')
  ok = value >= low if low_inclusive else value > low
  if high is not None:
    ok = ok and value <= high
  if not ok:
    bracket = '[' if low_inclusive else '('
    upper = f'{high}]' if high is not None else 'inf)'
    raise ValueError(f'config.optim.{field}={value!r} must be in {bracket}{low}, {upper}')
  return value


CLOCKS = ('steps', 'progress')


def make_schedule(config: ml_collections.ConfigDict, clock: str = 'steps') -> optax.Schedule:
  """Learning-rate schedule `t -> lr`, on one of two clocks.

  clock='steps': `t` counts optimizer updates from 0; warmup lasts `warmup_steps` and a
  cosine/linear decay ends at `total_steps`. clock='progress': `t` is the fraction of the
  run done, in [0, 1] (a compute budget: `attn_jax.train.loop`); warmup lasts
  `warmup_fraction` and the decay ends at 1, so both complete inside the budget whatever
  the step rate turns out to be.

  - constant: `lr`.
  - warmup_constant: linear warmup from 0, then `lr`.
  - warmup_rsqrt: linear warmup, then `lr * sqrt(warmup / t)` (the Transformer schedule,
    continuous at `t == warmup`).
  - warmup_cosine: linear warmup, then cosine decay to `lr * end_lr_factor` at the end.
  - warmup_linear: linear warmup, then linear decay to `lr * end_lr_factor` at the end.
  """
  if clock not in CLOCKS:
    raise ValueError(f'schedule clock={clock!r} is not one of {CLOCKS}')
  kind = validate_choices(config, 'schedule', SCHEDULES, where='config.optim')
  lr = _num(config, 'learning_rate', low=0.0, low_inclusive=False)
  if kind == 'constant':
    return optax.constant_schedule(lr)
  if clock == 'steps':
    warmup, total = float(int(_num(config, 'warmup_steps', low=0))), None
    floor = 1.0  # rsqrt's reference point when there is no warmup: the first update
  else:
    warmup, total = float(_num(config, 'warmup_fraction', low=0.0, high=1.0)), 1.0
    floor = 1e-3
  if kind in ('warmup_cosine', 'warmup_linear'):
    if clock == 'steps':
      total = float(int(_num(config, 'total_steps', low=1)))
    if total <= warmup:
      what = ('total_steps', 'warmup_steps') if clock == 'steps' else ('(end)', 'warmup_fraction')
      raise ValueError(
          f'config.optim.{what[0]}={total:g} must exceed config.optim.{what[1]}={warmup:g} '
          f'for schedule {kind!r}')
    end = lr * _num(config, 'end_lr_factor', low=0.0, high=1.0)

  def schedule(t):
    t = jnp.asarray(t).astype(jnp.float32)
    w = jnp.ones_like(t) if warmup == 0 else jnp.minimum(1.0, t / warmup)
    if kind == 'warmup_constant':
      return lr * w
    if kind == 'warmup_rsqrt':
      ref = max(warmup, floor)
      return lr * w * jax.lax.rsqrt(jnp.maximum(t, ref) / ref)
    frac = jnp.clip((t - warmup) / (total - warmup), 0.0, 1.0)
    if kind == 'warmup_cosine':
      decay = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      decay = lr + (end - lr) * frac
    return w * decay

  return schedule


def decay_mask(params: Any) -> Any:
  """Boolean tree like `params`: True where weight decay applies (kernels, embeddings).

  False for 1-D (or scalar) parameters and for leaves named in `NO_DECAY_NAMES`.
  """
  def keep(path, leaf):
    name = path[-1].key if path and hasattr(path[-1], 'key') else None
    return bool(jnp.ndim(leaf) >= 2 and name not in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    config: ml_collections.ConfigDict, clock: str = 'steps',
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Builds `(tx, schedule)` from a `config.optim` section (`config.default_optim()`).

  Args:
    config: the `config.optim` section.
    clock: 'steps' (the schedule reads optax's update count) or 'progress' (the schedule
      reads the fraction of the run done, which only the loop knows: `tx` is then built with a
      learning rate of 1 and the train step multiplies its updates by `schedule(progress)`;
      the same update, since every optimizer here applies the rate last, to the decayed
      update too).

  Returns:
    tx: the gradient transformation. With `grad_accum_steps = k > 1` it is an
      `optax.MultiSteps`: each call accumulates the (mean) gradient and every k-th call
      applies one update, so `schedule` advances once per k train steps.
    schedule: `update_count -> learning rate` (clock='steps') or `progress -> learning
      rate` (float32 scalar).

  Raises:
    ValueError: naming the field for an unknown optimizer/schedule or an out-of-range value.
  """
  name = validate_choices(config, 'name', OPTIMIZERS, where='config.optim')
  schedule = make_schedule(config, clock)
  # A rate of 1 as a schedule, not a constant: the optimizer state then has the same structure
  # on both clocks, so a run's checkpoints resume with or without a budget.
  rate = schedule if clock == 'steps' else (lambda count: jnp.ones((), jnp.float32))
  wd = _num(config, 'weight_decay', low=0.0)
  clip = config.clip_grad_norm
  if clip is not None:
    clip = _num(config, 'clip_grad_norm', low=float('-inf'))
  accum = config.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(f'config.optim.grad_accum_steps={accum!r} must be an int >= 1')

  if name in ('adamw', 'adam'):
    b1 = _num(config, 'b1', low=0.0, high=1.0)
    b2 = _num(config, 'b2', low=0.0, high=1.0)
    eps = _num(config, 'eps', low=0.0)
    if name == 'adam' and wd > 0:
      raise ValueError(
          f'config.optim.weight_decay={wd} needs name="adamw" (adam has no decoupled decay)')
    if name == 'adamw':
      opt = optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    else:
      opt = optax.adam(rate, b1=b1, b2=b2, eps=eps)
  else:
    momentum = _num(config, 'momentum', low=0.0, high=1.0)
    opt = optax.sgd(rate, momentum=momentum or None)
    if wd > 0:
      opt = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), opt)

  parts = []
  if clip is not None and clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(opt)
  tx = optax.chain(*parts) if len(parts) > 1 else opt
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule


def learning_rate_at(schedule: Callable[[Any], Any], step: Any, grad_accum_steps: int) -> Any:
  """The learning rate used by train step `step` (0-based) under gradient accumulation."""
  return schedule(jnp.asarray(step) // grad_accum_steps)
