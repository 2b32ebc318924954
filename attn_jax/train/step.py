"""Pure train and eval steps, generic over a task's loss function.

A task supplies

    loss_fn(params, batch, rng, train) -> (objective_sum, metrics)

where `objective_sum` is the float32 scalar to minimise *summed* over the batch (e.g. the
label-smoothed cross-entropy sum) and `metrics` maps names to `(sum, count)` pairs and must
contain `'loss': (loss_sum, count)`. The gradient is `grad(objective_sum) / count` with
`count` summed over all devices, so a data-parallel step equals the single-device step on the
concatenated batch exactly, however padding is spread across devices.

`make_train_step` binds the task and optimizer and returns `step(state, batch) -> (state,
metrics)`; `parallel.py` wraps that same function with `pmap` or `jit` over a mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from attn_jax.train.losses import Metric
from attn_jax.train.state import TrainState

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, bool], tuple[jax.Array, dict]]
NONFINITE_MODES = ('skip', 'raise')


def _check_metrics(metrics: Any) -> None:
  if not isinstance(metrics, Mapping) or 'loss' not in metrics:
    raise ValueError(
        "loss_fn must return (objective_sum, metrics) with metrics['loss'] = (sum, count); "
        f'got metrics {type(metrics).__name__} with keys '
        f'{sorted(metrics) if isinstance(metrics, Mapping) else None}')
  for name, value in metrics.items():
    if not isinstance(value, tuple | list) or len(value) != 2:
      raise ValueError(f'metric {name!r} must be a (sum, count) pair, got {type(value).__name__}')


def _psum(tree: Any, axis_name: str | None) -> Any:
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    progress: jax.Array | None = None,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], Any],
    grad_accum_steps: int = 1,
    nonfinite: str = 'skip',
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, Metric]]:
  """One optimizer step (or accumulation micro-step) on `batch`.

  Args:
    state: the TrainState (float32 params and optimizer state).
    batch: dict of arrays with a leading batch axis (per-device under pmap).
    progress: float32 scalar in [0, 1], the fraction of the run done, for a `tx` and
      `schedule` built with `optim.make_optimizer(..., clock='progress')`: the updates are
      multiplied by `schedule(progress)`. None: `schedule` reads the update count.
    loss_fn: the task's `loss_fn(params, batch, rng, train)`; see module docstring.
    tx, schedule: from `optim.make_optimizer`.
    grad_accum_steps: the `optim.grad_accum_steps` used to build `tx` (for the logged lr).
    nonfinite: what to do when the loss or gradient norm is NaN/Inf. Both 'skip' and
      'raise' leave params/opt_state unchanged for that step (the step counter and RNG still
      advance) and count it in `metrics['nonfinite']`; with 'raise' the loop then stops with
      an error naming the step (a jitted step cannot raise itself).
    axis_name: pmap axis name; gradients, counts and metrics are `psum`med over it.

  Returns:
    `(new_state, metrics)`: the task's metrics (summed over devices) plus `learning_rate`,
    `grad_norm` (of the normalised gradient, before clipping), `param_norm` and
    `nonfinite`, each as a `(value, 1)` pair.
  """
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f'nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}')
  rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    # Different dropout masks on different devices, as the single-device batch would have.
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def objective(params):
    obj_sum, metrics = loss_fn(params, batch, rng, True)
    _check_metrics(metrics)
    return jnp.asarray(obj_sum, jnp.float32), metrics

  (obj_sum, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  metrics = {k: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32))
             for k, (s, c) in metrics.items()}
  grads, obj_sum, metrics = _psum((grads, obj_sum, metrics), axis_name)
  count = metrics['loss'][1]
  inv = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1e-12), 0.0)
  grads = jax.tree_util.tree_map(lambda g: (g * inv).astype(g.dtype), grads)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(obj_sum) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  if progress is None:
    lr = schedule(state.step // grad_accum_steps)
  else:  # tx was built with a rate of 1 (see optim.make_optimizer)
    lr = schedule(progress)
    updates = jax.tree_util.tree_map(lambda u: u * lr.astype(u.dtype), updates)
  new_params = optax.apply_updates(state.params, updates)
  # optax may promote dtypes (e.g. a float64 schedule); params and moments stay as created.
  new_params = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new_params, state.params)
  new_opt_state = jax.tree_util.tree_map(
      lambda n, o: n.astype(o.dtype) if hasattr(o, 'dtype') else n, new_opt_state,
      state.opt_state)
  new_params = _select(finite, new_params, state.params)
  new_opt_state = _select(finite, new_opt_state, state.opt_state)

  one = jnp.ones((), jnp.float32)
  metrics = dict(metrics)
  metrics['learning_rate'] = (jnp.asarray(lr, jnp.float32), one)
  metrics['grad_norm'] = (grad_norm, one)
  metrics['param_norm'] = (optax.tree.norm(state.params), one)
  metrics['nonfinite'] = (1.0 - finite.astype(jnp.float32), one)
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state)
  return new_state, metrics


def eval_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    loss_fn: LossFn,
    axis_name: str | None = None,
) -> dict[str, Metric]:
  """Task metrics on `batch` with `train=False`, `(sum, count)` pairs summed over devices."""
  _, metrics = loss_fn(state.params, batch, state.rng, False)
  _check_metrics(metrics)
  metrics = {k: (jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32))
             for k, (s, c) in metrics.items()}
  return _psum(metrics, axis_name)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], *, grad_accum_steps: int = 1,
                    nonfinite: str = 'skip') -> Callable[..., Any]:
  """Binds everything but `(state, batch, progress=None)`; the result also takes `axis_name=`
  for pmap."""
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f'config.train.nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}')

  def bound_train_step(state, batch, progress=None, axis_name=None):
    return train_step(state, batch, progress, loss_fn=loss_fn, tx=tx, schedule=schedule,
                      grad_accum_steps=grad_accum_steps, nonfinite=nonfinite,
                      axis_name=axis_name)

  return bound_train_step


def make_eval_step(loss_fn: LossFn) -> Callable[..., Any]:
  """Binds `loss_fn`; the result is `eval_step(state, batch, axis_name=None)`."""

  def bound_eval_step(state, batch, axis_name=None):
    return eval_step(state, batch, loss_fn=loss_fn, axis_name=axis_name)

  return bound_eval_step
