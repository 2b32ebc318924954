"""Checkpoints with orbax: train state + data-iterator state, keep-last-N + best, resume.

    ckpt = Checkpointer(workdir / 'checkpoints', max_to_keep=3, best_metric='eval/loss')
    ckpt.save(step, state, data_state=it.get_state(), metrics={'eval/loss': 1.2})
    restored = ckpt.restore(abstract_state)  # None when there is nothing to resume.

Each step directory holds two items: 'state' (the TrainState pytree: params, opt state, step,
RNG key) and 'data' (each process's iterator `get_state()` as JSON, keyed by process index;
bytes states are base64-wrapped).
Saves are async: arrays are copied to host before `save` returns (so the next step may donate
them) and written in a background thread; a save killed before orbax commits it is a temporary
directory that the next run deletes.

Restore tells a checkpoint of another experiment from a damaged one. It first compares the
step's metadata (tree structure, shapes and dtypes, read without any array) with the state the
run builds: a difference raises `StateMismatchError` naming the arrays and changes nothing on
disk. A step whose metadata or arrays do not read (truncated, missing, bad metadata) is moved
aside to `corrupt_<step>` with a warning and the previous step is tried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
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


def _data_item(data_state: Any, eval_pending: bool = False,
               seconds_spent: float | None = None) -> dict[str, Any]:
  """The JSON item holding every process's iterator state (each process reads its shard),
  whether the eval of this step was interrupted (the resumed run does it first), and the
  compute budget's seconds spent up to this step."""
  states = _gather_strings(json.dumps(encode_data_state(data_state)))
  item = {'num_processes': len(states),
          'per_process': {str(i): json.loads(x) for i, x in enumerate(states)}}
  if eval_pending:
    item['eval_pending'] = True
  if seconds_spent is not None:
    item['seconds_spent'] = float(seconds_spent)
  return item


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
  eval_pending: bool = False  # Saved by a SIGTERM during this step's eval.
  seconds_spent: float = 0.0  # Of the run's compute budget, up to this step.


class StateMismatchError(ValueError):
  """A checkpoint holds a train state of other structure, shapes or dtypes than the run builds:
  another experiment's (a changed model size, optimizer...), not a damaged one. Nothing is
  moved or rewritten.

  Attributes:
    step: the checkpoint's step.
    differences: one string per differing array, `'<name> <checkpoint> -> <this run>'` where
      each side is `'<shape> <dtype>'` or 'missing'.
    summary: the message without its advice, for a caller that words the ways forward itself.
  """

  def __init__(self, message: str, *, step: int, differences: list[str], summary: str = ''):
    super().__init__(message)
    self.step, self.differences, self.summary = step, differences, summary or message


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _describe(spec: tuple[tuple[int, ...], np.dtype] | None) -> str:
  return 'missing' if spec is None else f'{spec[0]} {spec[1]}'


def state_differences(saved: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      abstract_state: Any) -> list[str]:
  """`'<name> <saved> -> <wanted>'` for each array whose shape or dtype differs between the
  checkpoint's `{name: (shape, dtype)}` and `abstract_state`, or that only one of them has;
  parameters first (the optimizer's moments repeat them).

  Names are the dotted key paths orbax stores (`params.decoder.layer_0.kernel`,
  `opt_state.1.0.mu.embedding`), so sharding and container classes do not count.
  """
  wanted = {'.'.join(_key_name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype))
            for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  names = sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith('params.'), n))
  return [f'{name} {_describe(saved.get(name))} -> {_describe(wanted.get(name))}'
          for name in names if saved.get(name) != wanted.get(name)]


def _run_and_drain(coro: Any) -> Any:
  """orbax's `asyncio_utils._run_sync_via_new_loop`, except that the loop is closed only once
  every task started on it has finished.

  When one array of a restore fails, `asyncio.gather` returns the error while the reads of the
  other arrays are still in flight; orbax then closes the loop under them and TensorStore's
  threads, finishing those reads, call into the closed loop ('RuntimeError: Event loop is
  closed' tracebacks, 'Task exception was never retrieved'), long after the failure was handled.
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    finally:
      pending = asyncio.all_tasks(loop)
      if pending:  # Only after a failure: a finished coroutine has awaited all it started.
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
  finally:
    asyncio.set_event_loop(None)
    loop.close()


def _drain_orbax_event_loops() -> None:
  """Makes orbax's synchronous calls use `_run_and_drain` (once per process; a no-op if this
  orbax version has no such function, which tests/train/test_checkpoint.py would notice)."""
  from orbax.checkpoint._src import asyncio_utils
  if getattr(asyncio_utils, '_run_sync_via_new_loop', _run_and_drain) is not _run_and_drain:
    asyncio_utils._run_sync_via_new_loop = _run_and_drain


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
    _drain_orbax_event_loops()
    # Handlers named up front (not inferred from the first save/restore's args), so a fresh
    # process can read a step's metadata before restoring it.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})
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
           metrics: Mapping[str, float] | None = None, force: bool = False,
           eval_pending: bool = False, seconds_spent: float | None = None) -> bool:
    """Starts saving `state` (and the iterator state) as checkpoint `step`.

    Returns False if `step` is already saved (e.g. a preemption save right after a periodic
    one). `metrics` (Python floats) rank the checkpoint for `best_metric`; `eval_pending`
    records that the eval of `step` was interrupted (see `Restored`); `seconds_spent` is the
    compute budget spent up to `step` (`loop.BudgetClock`).
    """
    if step in self._requested or step in self._manager.all_steps():
      return False
    self._requested.add(step)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(
                                  _data_item(data_state, eval_pending, seconds_spent)))
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
      `Restored(step, state, data_state, eval_pending)` or None if the directory has no
      checkpoint (or none that reads).

    Raises:
      StateMismatchError: the latest readable step (or `step`) holds a state of other
        structure, shapes or dtypes than `abstract_state`; nothing was moved or rewritten.
    """
    if any(getattr(x, 'sharding', None) is None
           for x in jax.tree_util.tree_leaves(abstract_state)):
      abstract_state = with_shardings(abstract_state, None)
    if step is not None:
      if step not in self._manager.all_steps():
        raise ValueError(f'no checkpoint for step {step} in {self.directory}; '
                         f'have {self.all_steps()}')
      self._check_state(step, self._saved_arrays(step), abstract_state)
      return self._restore(step, abstract_state)
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self._saved_arrays(candidate)
      except Exception as e:  # noqa: BLE001 - whatever the reason, its metadata is unusable.
        self._set_aside_corrupt(candidate, 'has unreadable metadata', e)
        continue
      # A mismatch is refused before any array is read, so nothing is quarantined for it.
      self._check_state(candidate, saved, abstract_state)
      try:
        return self._restore(candidate, abstract_state)
      except Exception as e:  # noqa: BLE001 - the metadata matched: its files are damaged.
        self._set_aside_corrupt(candidate, 'does not restore', e)
    return None

  def _saved_arrays(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{dotted name: (shape, dtype)}` of the step's state, from its metadata alone."""
    metadata = self._manager.item_metadata(step)['state']
    if metadata is None or not hasattr(metadata, 'tree'):
      raise ValueError(f'no state metadata in {self.directory / str(step)}')
    flat = ocp.tree.to_flat_dict(metadata.tree)
    if not flat:
      raise ValueError(f'empty state metadata in {self.directory / str(step)}')
    return {'.'.join(str(k) for k in key): (tuple(x.shape), np.dtype(x.dtype))
            for key, x in flat.items()}

  def _check_state(self, step: int, saved: Mapping[str, Any], abstract_state: Any) -> None:
    differences = state_differences(saved, abstract_state)
    if not differences:
      return
    shown = '; '.join(differences[:3]) + ('; ...' if len(differences) > 3 else '')
    summary = (f'checkpoint step {step} in {self.directory} holds a train state that differs '
               f"from this run's in {len(differences)} arrays (checkpoint -> this run: {shown})")
    raise StateMismatchError(
        f"{summary}. It was left as it is: train in a new workdir, or set "
        "config.train.on_mismatch='restart' to move the old run aside and start over.",
        step=step, differences=differences, summary=summary)

  def _restore(self, step: int, abstract_state: Any) -> Restored:
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    item = out['data'] or {}
    return Restored(step, out['state'], _data_state_from_item(item),
                    bool(item.get('eval_pending')), float(item.get('seconds_spent', 0.0)))

  def _set_aside_corrupt(self, step: int, what: str, error: Exception) -> None:
    logging.warning('checkpoint step %d in %s %s (%s: %s); moving it aside to corrupt_%d and '
                    'falling back to the previous one', step, self.directory, what,
                    type(error).__name__, str(error)[:300], step)
    self._quarantine(step)

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


class Preempted(BaseException):
  """Raised inside `PreemptionHandler.interruptible()` by a stop request.

  A BaseException, like KeyboardInterrupt, so that an eval hook's `except Exception` does not
  swallow it.
  """


class PreemptionHandler:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly; inside
  `interruptible()` (an eval) it raises `Preempted` at once instead.

  Multi-host runs also consult orbax's preemption sync point (the JAX coordination service
  agrees on one step across hosts). Use as a context manager to restore the old handler.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._interruptible = False

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
    self._event.set()
    if self._interruptible:
      self._interruptible = False  # A second signal, while this one unwinds, only sets the flag.
      logging.warning('received signal %d: stopping the eval to checkpoint and stop', signum)
      raise Preempted(signum)
    logging.warning('received signal %d: will checkpoint and stop after this step', signum)

  @contextlib.contextmanager
  def interruptible(self) -> Iterator[None]:
    """A section (an eval, which can outlast a scheduler's grace period) that a stop request
    ends at once by raising `Preempted`, also if it came before the section began.

    With one process only, and only while the handler is installed: with several processes, one
    leaving an eval early would leave the others waiting in its collectives, so the stop is
    taken after the section as usual.
    """
    if not self._previous or jax.process_count() > 1:
      yield
      return
    self._interruptible = True
    try:
      if self._event.is_set():
        raise Preempted(signal.SIGTERM)
      yield
    finally:
      self._interruptible = False

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
