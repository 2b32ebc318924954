"""Checkpoints with orbax: train state + data-iterator state, keep-last-N + best, resume.

    ckpt = Checkpointer(workdir / 'checkpoints', max_to_keep=3, best_metric='eval/loss')
    ckpt.save(step, state, data_state=it.get_state(), metrics={'eval/loss': 1.2})
    restored = ckpt.restore(abstract_state)  # None when there is nothing to resume.

Each step directory holds two items: 'state' (the TrainState pytree: params, opt state, step,
RNG key) and 'data' (each process's iterator `get_state()` as JSON, keyed by process index;
bytes states are base64-wrapped).
Saves are async: arrays are copied to host before `save` returns (so the next step may donate
them) and written in a background thread. A latest checkpoint that fails to restore (truncated
or corrupt files) is moved aside with a warning and the previous one is used.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_BYTES_KEY = '__bytes_base64__'
BEST_MODES = ('min', 'max')


def encode_data_state(data_state: Any) -> dict[str, Any]:
  """Makes an iterator state JSON-safe: dicts pass through, bytes/str are wrapped."""
  if data_state is None:
    return {}
  if isinstance(data_state, bytes | bytearray):
    return {_BYTES_KEY: base64.b64encode(bytes(data_state)).decode('ascii')}
  if isinstance(data_state, str):
    return {_BYTES_KEY: base64.b64encode(data_state.encode()).decode('ascii'), 'str': True}
  if isinstance(data_state, Mapping):
    return dict(data_state)
  raise ValueError(f'data iterator state must be a dict, bytes or str, got {type(data_state)}')


def decode_data_state(item: Mapping[str, Any] | None) -> Any:
  """Inverse of `encode_data_state`; an empty dict decodes to None."""
  if not item:
    return None
  if _BYTES_KEY in item:
    raw = base64.b64decode(item[_BYTES_KEY])
    return raw.decode() if item.get('str') else raw
  return dict(item)


def _gather_strings(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective; identity with one process)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(text.encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded[None], tiled=True)
  return [bytes(row[:int(n)]).decode() for row, n in zip(rows, lengths.reshape(-1), strict=True)]


def _data_item(data_state: Any) -> dict[str, Any]:
  """The JSON item holding every process's iterator state (each process reads its shard)."""
  states = _gather_strings(json.dumps(encode_data_state(data_state)))
  return {'num_processes': len(states),
          'per_process': {str(i): json.loads(x) for i, x in enumerate(states)}}


def _data_state_from_item(item: Mapping[str, Any] | None) -> Any:
  if not item:
    return None
  n, me = item.get('num_processes'), jax.process_index()
  if n != jax.process_count():
    logging.warning('checkpoint holds iterator states of %s processes, this run has %d: the '
                    'train iterator is not restored (data order will differ)', n,
                    jax.process_count())
    return None
  return decode_data_state(item['per_process'][str(me)])


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""

  step: int
  state: Any
  data_state: Any


def with_shardings(abstract_state: Any, shardings: Any | None) -> Any:
  """Attaches shardings to a `jax.eval_shape` tree so orbax restores arrays in place.

  Without `shardings`, every leaf goes to the first local device.
  """
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract_state)
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      shardings)


class Checkpointer:
  """An orbax `CheckpointManager` for TrainState + iterator state.

  Args:
    directory: where step directories go (created).
    max_to_keep: the most recent checkpoints kept (>= 1).
    best_metric: if set, the checkpoint with the best value of this key of `metrics` passed
      to `save` is also kept, whatever its age.
    best_mode: 'min' or 'max' for `best_metric`.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               best_metric: str | None = None, best_mode: str = 'min',
               async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f'checkpoint max_to_keep={max_to_keep!r} must be an int >= 1')
    if best_mode not in BEST_MODES:
      raise ValueError(f'checkpoint best_mode={best_mode!r} is not one of {BEST_MODES}')
    # orbax needs an absolute path; a relative local workdir (`--workdir runs/x`) is
    # resolved against the current directory. Remote paths (gs://...) pass through.
    if '://' not in os.fspath(directory):
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric:
      worst = math.inf if best_mode == 'min' else -math.inf
      best_fn = lambda m: float(m.get(best_metric, worst))  # noqa: E731
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == 'min', n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn also makes orbax store the metrics with each step; which steps are kept is
        # decided by the preservation policy alone.
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # Half-written saves of a killed run.
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'data'))
    self._requested: set[int] = set()  # Includes saves still being written asynchronously.

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without metric or ranked steps)."""
    if not self.best_metric:
      return None
    ranked = []
    for step in self._manager.all_steps():
      value = (self._manager.metrics(step) or {}).get(self.best_metric)
      if value is not None:
        ranked.append((value if self.best_mode == 'min' else -value, step))
    return min(ranked)[1] if ranked else None

  def save(self, step: int, state: Any, *, data_state: Any = None,
           metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator state) as checkpoint `step`.

    Returns False if `step` is already saved (e.g. a preemption save right after a periodic
    one). `metrics` (Python floats) rank the checkpoint for `best_metric`.
    """
    if step in self._requested or step in self._manager.all_steps():
      return False
    self._requested.add(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(_data_item(data_state)))
    metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
    return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore(self, abstract_state: Any, step: int | None = None) -> Restored | None:
    """Restores `step` (default: the latest that loads) into `abstract_state`'s layout.

    Args:
      abstract_state: `jax.eval_shape` of the state, ideally via `with_shardings` so arrays
        land sharded; plain ShapeDtypeStructs restore to the first device.
      step: a specific step; it must exist and load (no fallback).

    Returns:
      `Restored(step, state, data_state)` or None if the directory has no checkpoint.
    """
    if any(getattr(x, 'sharding', None) is None
           for x in jax.tree_util.tree_leaves(abstract_state)):
      abstract_state = with_shardings(abstract_state, None)
    if step is not None:
      if step not in self._manager.all_steps():
        raise ValueError(f'no checkpoint for step {step} in {self.directory}; '
                         f'have {self.all_steps()}')
      return self._restore(step, abstract_state)
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self._restore(candidate, abstract_state)
      except Exception as e:  # noqa: BLE001 - any failure to read means "unusable".
        logging.warning('checkpoint step %d in %s does not restore (%s: %s); moving it aside '
                        'and falling back to the previous one', candidate, self.directory,
                        type(e).__name__, str(e)[:300])
        self._quarantine(candidate)
    return None

  def _restore(self, step: int, abstract_state: Any) -> Restored:
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return Restored(step, out['state'], _data_state_from_item(out['data']))

  def _quarantine(self, step: int) -> None:
    # Renamed, not deleted: the files may help debugging, and orbax ignores non-step names.
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f'corrupt_{step}'
      if src.exists():
        if dst.exists():
          dst.rmtree()
        src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f'checkpoint_quarantine_{step}')
    self._manager.reload()


class PreemptionHandler:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly.

  Multi-host runs also consult orbax's preemption sync point (the JAX coordination service
  agrees on one step across hosts). Use as a context manager to restore the old handler.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionHandler:
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    else:
      logging.warning('not on the main thread: SIGTERM will not trigger a checkpoint')
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning('received signal %d: will checkpoint and stop after this step', signum)
    self._event.set()

  def trigger(self) -> None:
    """Requests a stop as SIGTERM would (tests, external schedulers)."""
    self._event.set()

  def reached(self, step: int) -> bool:
    """True once a stop was requested, agreed by all processes.

    Single process: the local flag. Multi-process: the local flag or orbax's preemption sync
    point on any process, all-gathered so every process stops at the same step (a collective:
    the loop polls this every `preemption_check_every` steps there).
    """
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    try:
      local = local or bool(ocp.utils.reached_preemption(step))
    except Exception:  # noqa: BLE001 - no coordination service: local signals only.
      pass
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    return bool(np.any(flags))
