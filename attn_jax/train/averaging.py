"""Checkpoint averaging: the elementwise mean of the parameters of the last N checkpoints.

    params, steps = average_checkpoints(workdir / 'checkpoints', abstract_state, last_n=5)

Vaswani et al. (2017) decode with the average of the last 5 (base) or 20 (big) checkpoints,
written 10 minutes apart. "Last N" are the N highest steps on disk: when `best_metric` keeps
an older best checkpoint beside the `keep_checkpoints` latest ones, it is among them only if
N exceeds the latest ones kept (the steps used are logged and returned).

Only the 'state' item's `params` subtree is read (an orbax partial restore, to host numpy), so
the optimizer's moments are never loaded; steps are read one at a time into a float64 host
accumulator: host memory is the accumulator plus one checkpoint's params, whatever N.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from attn_jax.train import checkpoint as ckpt_lib


def _select_steps(available: Sequence[int], last_n: int | None,
                  steps: Sequence[int] | None, directory: Any) -> list[int]:
  """The steps to average, ascending; every request error raised here, before any read."""
  available = sorted(available)
  if (last_n is None) == (steps is None):
    raise ValueError('give exactly one of last_n and steps')
  if steps is not None:
    steps = [int(s) for s in steps]
    if not steps:
      raise ValueError('steps is empty: nothing to average')
    if len(set(steps)) != len(steps):
      raise ValueError(f'steps {steps} repeat a step')
    missing = sorted(set(steps) - set(available))
    if missing:
      raise ValueError(f'no checkpoint for steps {missing} in {directory}; have {available}')
    return sorted(steps)
  if not isinstance(last_n, int) or last_n < 1:
    raise ValueError(f'last_n={last_n!r} must be an int >= 1')
  if len(available) < last_n:
    raise ValueError(
        f'cannot average the last {last_n} checkpoints: {directory} keeps '
        f'{len(available)} (steps {available}); raise config.train.keep_checkpoints (and '
        'checkpoint more often) when training, or average fewer')
  return available[-last_n:]


def _state_path(ckpt: ckpt_lib.Checkpointer, step: int) -> Any:
  # The layout Checkpointer writes: one directory per step, named by the step, holding the
  # 'state' item (a StandardCheckpointHandler item is a PyTreeCheckpointHandler one on disk).
  return ckpt.directory / str(step) / 'state'


def _saved_params(path: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`{'params.<dotted name>': (shape, dtype)}` of a step's 'state' item, from its metadata."""
  metadata = ocp.PyTreeCheckpointer().metadata(path).item_metadata
  tree = getattr(metadata, 'tree', metadata)
  flat = ocp.tree.to_flat_dict(tree['params']) if tree and 'params' in tree else {}
  return {'.'.join(['params', *map(str, key)]): (tuple(x.shape), np.dtype(x.dtype))
          for key, x in flat.items()}


def average_checkpoints(directory_or_checkpointer: str | os.PathLike | ckpt_lib.Checkpointer,
                        abstract_state: Any, last_n: int | None = None,
                        steps: Sequence[int] | None = None) -> tuple[Any, list[int]]:
  """The elementwise mean of the params of the `last_n` highest kept steps (or of `steps`).

  Each floating leaf is summed in float64 and divided once, so the mean is the float64 mean
  rounded to the leaf's dtype (float32: within 1 ulp of the exact mean, independent of the
  order and of N). A non-floating leaf (none in a usual model) is taken from the latest step.

  Args:
    directory_or_checkpointer: a `Checkpointer`, or the checkpoint directory
      (`<workdir>/checkpoints`) to open one on. Nothing is saved, but opening a Checkpointer
      deletes unfinished (temporary) saves, as `inference.load_run` does: average a run that
      is still training from a copy.
    abstract_state: `jax.eval_shape` of the TrainState (only `.params` is used); leaves with
      shardings (see `checkpoint.with_shardings`) place the result so, others go to the first
      local device, as `Checkpointer.restore` does.
    last_n: how many of the highest steps on disk to average (>= 1; 1 = the latest params).
    steps: explicit steps instead of `last_n` (give exactly one of the two).

  Returns:
    `(params, steps_used)`: a tree like `abstract_state.params` of jax Arrays with its dtypes,
    and the averaged steps, ascending.

  Raises:
    ValueError: last_n < 1, fewer steps kept than `last_n` (naming those there), a step not
      on disk, or both/neither of `last_n` and `steps` — all before any array is read.
    checkpoint.StateMismatchError: a step's params differ in structure, shape or dtype from
      `abstract_state.params` (also before any array is read).
  """
  if isinstance(directory_or_checkpointer, ckpt_lib.Checkpointer):
    ckpt, owned = directory_or_checkpointer, False
  else:
    ckpt, owned = ckpt_lib.Checkpointer(directory_or_checkpointer, async_save=False), True
  try:
    chosen = _select_steps(ckpt.all_steps(), last_n, steps, ckpt.directory)
    # orbax's partial restore silently returns unrequested shapes and leaves missing arrays
    # abstract, so every step's metadata is compared first, as Checkpointer.restore does.
    target = {'params': abstract_state.params}
    for step in chosen:
      differences = ckpt_lib.state_differences(_saved_params(_state_path(ckpt, step)), target)
      if differences:
        shown = '; '.join(differences[:3]) + ('; ...' if len(differences) > 3 else '')
        raise ckpt_lib.StateMismatchError(
            f'checkpoint step {step} in {ckpt.directory} holds params that differ from this '
            f"run's in {len(differences)} arrays (checkpoint -> this run: {shown})",
            step=step, differences=differences)
    mean = _host_mean(ckpt, chosen, target)
  finally:
    if owned:
      ckpt.close()
  logging.info('averaged the params of %d checkpoints in %s: steps %s', len(chosen),
               ckpt.directory, chosen)
  return _place(mean, abstract_state.params), chosen


def _host_mean(ckpt: ckpt_lib.Checkpointer, steps: list[int], target: dict[str, Any]) -> Any:
  """float64 sums of the floating leaves of `steps`' params, divided by len(steps), as numpy
  arrays of the leaves' dtypes."""
  # PyTreeRestore (not the manager's StandardRestore, which restores whole trees) so that
  # only params are read: the Adam moments would triple the bytes read and the peak memory.
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        target)
  reader = ocp.PyTreeCheckpointer()
  total = None
  for step in steps:
    params = reader.restore(_state_path(ckpt, step), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))['params']
    if total is None:
      total = jax.tree_util.tree_map(
          lambda x: x.astype(np.float64) if _floating(x) else x, params)
    else:
      # In place: the only float64 memory is the accumulator itself.
      total = jax.tree_util.tree_map(
          lambda acc, x: np.add(acc, x, out=acc) if _floating(x) else x, total, params)
  return jax.tree_util.tree_map(
      lambda acc, spec: (acc / len(steps)).astype(spec.dtype) if _floating(acc) else acc,
      total, target['params'])


def _floating(x: Any) -> bool:
  # jnp's issubdtype also counts bfloat16 (an ml_dtypes type numpy does not see as floating).
  return jnp.issubdtype(x.dtype, jnp.floating)


def _place(params: Any, abstract_params: Any) -> Any:
  """Host arrays -> jax Arrays with the abstract leaves' shardings (first local device when a
  leaf has none)."""
  if any(getattr(x, 'sharding', None) is None
         for x in jax.tree_util.tree_leaves(abstract_params)):
    abstract_params = ckpt_lib.with_shardings(abstract_params, None)
  # make_array_from_callback, not device_put: with several processes each places its shards.
  return jax.tree_util.tree_map(
      lambda x, spec: jax.make_array_from_callback(x.shape, spec.sharding, lambda i: x[i]),
      params, abstract_params)
