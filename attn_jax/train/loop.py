"""A generic training loop: steps, periodic eval, metrics, checkpoints, resume, preemption.

    result = train_loop(config, workdir, init_params=init_params, loss_fn=loss_fn,
                        train_iter=train_iter, eval_iters={'valid': lambda: valid_batches()})

The loop is a short driver of small parts: a `runner.Runner` (the parallel mode's placement and
compiled steps) and the periodic actions of `actions` (logging, checkpointing, preemption, the
budget clock, the non-finite check) and `evaluate` (evaluation, averaged checkpoints), each
testable alone. The loop knows no model or dataset. A task provides `init_params(rng)`,
`loss_fn(params, batch, rng, train) -> (objective_sum, {name: (sum, count)})`, a train iterator
of numpy batch dicts (with grain-style `get_state()`/`set_state()` for exact resume), eval
iterables and optional eval hooks (e.g. decoding + BLEU). The config has sections `optim`,
`train` and optionally `parallel` (`attn_jax.train.config.full_config()`).

Multi-host: call `parallel.initialize_distributed(config.parallel)` first thing in the entry
point (before any other JAX call), give every process the same `workdir` (shared storage) and
its own rows of each global batch; use `parallel.mode='sharded'`.

Resume: if `workdir/checkpoints` holds a checkpoint, the state (params, optimizer, step, RNG)
and the iterator position are restored, so a killed run continues with exactly the batches
and dropout masks it would have seen; `metrics.jsonl` is cut back to the restored step only
then. A checkpoint whose state has other shapes than this config builds is refused before
anything is written (`checkpoint.StateMismatchError`), unless `config.train.on_mismatch` is
'restart': the old run then moves whole into `workdir/replaced_<n>/`, as it does when every
checkpoint is damaged. SIGTERM saves a checkpoint and returns early; during an eval, at once
(the eval is done again on resume).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import losses, optim, parallel, throughput
from attn_jax.train import metrics as metrics_lib
from attn_jax.train import runner as runner_lib
from attn_jax.train import state as state_lib
from attn_jax.train import step as step_lib
from attn_jax.train.actions import (
    BudgetClock,
    Checkpointing,
    FlopCount,
    NonfiniteCheck,
    PreemptionCheck,
    TrainLog,
)
from attn_jax.train.config import validate_choices
from attn_jax.train.evaluate import EvalHook, Evaluation, evaluate, evaluate_average
from attn_jax.train.metrics import Direction, MetricWriter
from attn_jax.train.runner import Runner

__all__ = ['CHECKPOINTS_DIR', 'REPLACED_PREFIX', 'BudgetClock', 'EvalHook', 'LoopResult',
           'Runner', 'evaluate', 'optim_config', 'schedule_clock', 'set_aside', 'train_loop',
           'validate_config']
CHECKPOINTS_DIR = 'checkpoints'  # Under the workdir, beside metrics.METRICS_FILE.
REPLACED_PREFIX = 'replaced_'  # workdir/replaced_<n>/: a run moved aside to start over.
ON_MISMATCH = ('error', 'restart')
_now = time.monotonic  # The budget's clock; tests replace it with a deterministic one.


@dataclasses.dataclass
class LoopResult:
  """What `train_loop` returns: the final state (unreplicated), its step, and why it stopped."""

  state: state_lib.TrainState
  step: int
  start_step: int = 0  # > 0 when the run resumed from a checkpoint.
  preempted: bool = False
  data_exhausted: bool = False
  budget_exhausted: bool = False  # Stopped by config.train.budget_minutes.
  seconds_spent: float = 0.0  # Of the compute budget (0 without one).
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)


def validate_config(config: ml_collections.ConfigDict) -> None:
  for section in ('optim', 'train'):
    if section not in config:
      raise ValueError(f'config needs a {section!r} section (see attn_jax.train.{section})')
  t = config.train
  for field in ('num_steps', 'log_every', 'keep_checkpoints', 'preemption_check_every'):
    if not isinstance(t[field], int) or t[field] < 1:
      raise ValueError(f'config.train.{field}={t[field]!r} must be an int >= 1')
  for field in ('eval_every', 'checkpoint_every', 'max_eval_batches'):
    if not isinstance(t[field], int) or t[field] < 0:
      raise ValueError(f'config.train.{field}={t[field]!r} must be an int >= 0')
  budget = t.get('budget_minutes', 0.0)
  if isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0:
    raise ValueError(f'config.train.budget_minutes={budget!r} must be a number >= 0 (0 = off)')
  average = t.get('average_last', 0)
  if isinstance(average, bool) or not isinstance(average, int) or average < 0:
    raise ValueError(f'config.train.average_last={average!r} must be an int >= 0 (0 = off)')
  if average > t.keep_checkpoints:
    raise ValueError(f'config.train.average_last={average} needs config.train.keep_checkpoints '
                     f'>= {average} (it is {t.keep_checkpoints})')
  validate_choices(config, 'train.nonfinite', step_lib.NONFINITE_MODES)
  # '' = the declared direction of the best metric (`metrics.best_mode`).
  validate_choices(config, 'train.best_mode', ('',) + ckpt_lib.BEST_MODES)
  validate_choices(config, 'train.on_mismatch', ON_MISMATCH)
  if 'parallel' in config:
    validate_choices(config, 'parallel.mode', parallel.PARALLEL_MODES)


def schedule_clock(config: ml_collections.ConfigDict) -> str:
  """'progress' when the run has a compute budget (the schedule follows the fraction done),
  else 'steps'."""
  return 'progress' if config.train.get('budget_minutes', 0.0) > 0 else 'steps'


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  oc = ml_collections.ConfigDict(config.optim.to_dict())
  if oc.get('schedule') in ('warmup_cosine', 'warmup_linear') and not oc.get('total_steps'):
    oc.total_steps = max(1, config.train.num_steps // max(1, oc.get('grad_accum_steps', 1)))
  return oc


def set_aside(workdir: str | os.PathLike, keep: Sequence[str] = ()) -> pathlib.Path:
  """Moves everything in `workdir` but the names in `keep` and earlier set-asides into a new
  `workdir/replaced_<n>/` (n = 1, 2, ...), which reads as a workdir of its own; returns it.

  Renames only, nothing is deleted or copied. Process 0 moves; every process waits for it.
  """
  workdir = pathlib.Path(workdir)
  _sync('set_aside_start')
  n = 1
  while (workdir / f'{REPLACED_PREFIX}{n}').exists():
    n += 1
  target = workdir / f'{REPLACED_PREFIX}{n}'
  if jax.process_index() == 0:
    entries = [e for e in sorted(workdir.iterdir())
               if e.name not in keep and not e.name.startswith(REPLACED_PREFIX)]
    target.mkdir()
    for entry in entries:
      entry.rename(target / entry.name)
  _sync('set_aside_done')
  return target


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _restore_or_start_over(config, workdir: pathlib.Path, runner: Runner,
                           keep_on_restart: Sequence[str], best_mode: str
                           ) -> tuple[ckpt_lib.Checkpointer, ckpt_lib.Restored | None]:
  """The open Checkpointer and the restored checkpoint (None: train from step 0).

  Only renames happen here (damaged steps to `corrupt_<step>`, or the old run to
  `replaced_<n>/`); nothing is written or cut back. A refusal closes the Checkpointer, so that
  the process exits cleanly.
  """
  t = config.train

  def open_checkpointer():
    return ckpt_lib.Checkpointer(workdir / CHECKPOINTS_DIR, max_to_keep=t.keep_checkpoints,
                                 best_metric=t.best_metric or None, best_mode=best_mode,
                                 async_save=t.async_checkpoint)

  ckpt = open_checkpointer()
  try:
    had_checkpoints = bool(ckpt.all_steps())
    try:
      restored = ckpt.restore(runner.abstract_for_restore())
    except ckpt_lib.StateMismatchError as e:
      if t.on_mismatch != 'restart':
        raise
      reason = f"{e.summary}, and config.train.on_mismatch='restart'"
    else:
      if restored is not None or not had_checkpoints:
        return ckpt, restored
      # Its metrics describe steps that can no longer be resumed: keep them with the run.
      reason = 'no checkpoint in the workdir restores (see the warnings above)'
  except BaseException:
    ckpt.close()
    raise
  ckpt.close()
  aside = set_aside(workdir, keep_on_restart)
  logging.warning('%s: moved the old run to %s and training from step 0', reason, aside)
  return open_checkpointer(), None


def _start_state(runner: Runner, restored: ckpt_lib.Restored | None, train_iter: Any
                 ) -> tuple[Any, int]:
  """The placed state to train from and its step: restored (the iterator moved to where the
  checkpoint left it) or fresh."""
  if restored is None:
    return runner.init(), 0
  start = restored.step
  if restored.data_state is not None and hasattr(train_iter, 'set_state'):
    train_iter.set_state(restored.data_state)
  else:
    logging.warning('resumed at step %d but the train iterator state was not restored '
                    '(iterator has no set_state or checkpoint has none)', start)
  logging.info('resumed from checkpoint step %d', start)
  return runner.place(restored.state), start


def train_loop(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    init_params: Callable[[jax.Array], Any],
    loss_fn: step_lib.LossFn,
    train_iter: Iterator[Mapping[str, np.ndarray]],
    eval_iters: Mapping[str, Iterable[Any] | Callable[[], Iterable[Any]]] | None = None,
    eval_hooks: Sequence[EvalHook] = (),
    validated: bool = False,
    on_start: Callable[[int], None] | None = None,
    keep_on_restart: Sequence[str] = (),
    count_tokens: Callable[[Mapping[str, np.ndarray]], int] | None = None,
    metric_directions: Mapping[str, Direction] | None = None,
) -> LoopResult:
  """Trains until `config.train.num_steps`, resuming from `workdir` if it has checkpoints.

  Args:
    config: sections `optim`, `train` and optionally `parallel` (see
      `attn_jax.train.config.full_config`).
    workdir: run directory: `checkpoints/`, `metrics.jsonl`, `tensorboard/`.
    init_params: `rng -> params` (may be logically boxed).
    loss_fn: see `step.py`.
    train_iter: yields batch dicts of numpy arrays (this process's rows: with several
      processes, `parallel.local_batch_size` of the global batch); `get_state`/`set_state`
      make resume exact, without them resume restarts the iterator (with a warning). The
      state must describe the position after the batches already taken (no look-ahead).
    eval_iters: `{name: iterable or zero-arg callable returning one}`, evaluated every
      `eval_every` steps and at the end; batches must be padded to the training layout
      (weights zero on padding). Metrics are written as `<name>/<metric>`.
    eval_hooks: `hook(state, step) -> {name: value}` run after eval (e.g. decoding + BLEU),
      with the unreplicated state.
    count_tokens: `batch -> int`, the real (non-pad) tokens of a host batch: then
      `train/tokens_per_second` (all processes) is logged beside `steps_per_second`.
    validated: the caller has already run `validate_config` on `config` (the experiment
      layer validates every section once, up front).
    on_start: `on_start(start_step)`, called on every process once the state is restored (or
      the run starts over) and before the loop writes anything: where a caller writes its own
      run files, so that a refused re-run leaves them as they were.
    keep_on_restart: names in `workdir` that stay when the old run is moved aside (e.g. a log
      file being written by a parent process).
    metric_directions: metric name -> 'min' | 'max' | None, as the task declares them (see
      `metrics.metric_direction`); `config.train.best_mode` '' ranks the best checkpoint in its
      best metric's direction. Default: `losses.METRIC_DIRECTIONS` (loss, accuracy,
      perplexity).

  Returns:
    LoopResult. Raises FloatingPointError naming the step when `nonfinite='raise'` and a
    step's loss or gradient was NaN/Inf, and `checkpoint.StateMismatchError` (nothing written)
    when the workdir's checkpoint holds a state of other shapes and
    `config.train.on_mismatch='error'`.
  """
  if not validated:
    validate_config(config)
  t = config.train
  best_mode = metrics_lib.best_mode(t, metric_directions or losses.METRIC_DIRECTIONS)
  workdir = pathlib.Path(workdir)
  tx, schedule = optim.make_optimizer(optim_config(config), schedule_clock(config))
  runner = Runner(config, init_params, loss_fn, tx, schedule, clock=schedule_clock(config))
  logging.info('model has %d parameters', state_lib.param_count(runner.abstract.params))

  ckpt, restored = _restore_or_start_over(config, workdir, runner, keep_on_restart, best_mode)
  clock = BudgetClock(t.get('budget_minutes', 0.0), t.num_steps, now=_now)
  spent = restored.seconds_spent if restored is not None else 0.0
  try:
    state, start = _start_state(runner, restored, train_iter)
    if on_start is not None:
      on_start(start)
    # Cuts metrics.jsonl back to `start`: only now that the restore has succeeded.
    writer = MetricWriter(workdir, total_steps=t.num_steps, start_step=start,
                          tensorboard=t.tensorboard, progress=t.progress,
                          budget_minutes=clock.budget_s / 60, spent_minutes=spent / 60)
  except BaseException:
    ckpt.close()
    raise
  flops = FlopCount(lambda: runner_lib.peak_flops(t.peak_flops))
  log = TrainLog(writer, t.log_every, count_tokens=count_tokens, flops=flops)
  evaluation = Evaluation(runner, eval_iters or {}, eval_hooks, every=t.eval_every,
                          max_batches=t.max_eval_batches, writer=writer)
  saver = Checkpointing(ckpt, runner, every=t.checkpoint_every, clock=clock,
                        data_state=lambda: (train_iter.get_state()
                                            if hasattr(train_iter, 'get_state') else None))
  nonfinite = NonfiniteCheck(t.nonfinite)
  profiler = throughput.Profiler(workdir, t.profile_steps, t.profile_skip)
  result = LoopResult(state=None, step=start, start_step=start)
  step = start
  log.start(start)
  clock.start(spent)
  if clock.enabled:
    logging.info('compute budget: %.1f of %.1f minutes spent, stopping at the budget or step %d',
                 clock.spent / 60, clock.budget_s / 60, t.num_steps)
  finished = clock.exhausted()  # A resumed run whose budget was already spent.
  try:
    with ckpt_lib.PreemptionHandler() as preempt:
      stop = PreemptionCheck(preempt, t.preemption_check_every)
      if restored is not None and restored.eval_pending and evaluation.enabled:
        logging.info('step %d: doing the eval that a stop interrupted', step)
        try:
          result.last_eval = evaluation(state, step, preempt)
        except ckpt_lib.Preempted:
          result.preempted = True  # Its checkpoint still records the eval as pending.
      while step < t.num_steps and not result.preempted and not finished:
        try:
          batch = next(train_iter)
        except StopIteration:
          logging.warning('train iterator exhausted at step %d of %d', step, t.num_steps)
          result.data_exhausted = True
          break
        log.add_batch(batch)
        placed, progress = runner.batch(batch), clock.progress(step)
        flops.measure(functools.partial(runner.step_flops, state, placed, progress))
        state, metrics = runner.step(state, placed, progress)
        metrics = runner.metrics(metrics)
        step += 1
        finished = clock.after_step(step, metrics['loss'])
        profiler.step(step - start, state)
        nonfinite.after_step(step, metrics)
        log.add_metrics(metrics)
        writer.advance(step, minutes=clock.spent / 60)
        last = step == t.num_steps or finished
        log.maybe_write(step, last)
        with log.paused():
          eval_scalars = None
          if evaluation.due(step, last):
            try:
              eval_scalars = result.last_eval = evaluation(state, step, preempt)
            except ckpt_lib.Preempted:
              logging.warning('preempted during the eval at step %d: saving a checkpoint that '
                              'asks the resumed run to evaluate first, and stopping', step)
              saver.save(state, step, force=True, eval_pending=True)
              result.preempted = True
              break
          if saver.due(step, last):
            saver.save(state, step, metrics=eval_scalars)
        if stop.due(step, last):
          logging.warning('preempted: saving checkpoint at step %d and stopping', step)
          saver.save(state, step, force=True)
          result.preempted = True
          break
      nonfinite.finish()
      if result.data_exhausted and step > start:
        saver.save(state, step)  # No-op if saved.
      if t.get('average_last', 0) > 1 and step > start and not result.preempted:
        _average_at_end(runner, ckpt, state, step, t, evaluation, preempt, result)
  finally:
    profiler.stop()
    ckpt.wait()
    ckpt.close()
    writer.close()
  result.state, result.step = runner.host_state(state), step
  result.budget_exhausted, result.seconds_spent = clock.exhausted(), clock.spent
  return result


def _average_at_end(runner: Runner, ckpt: ckpt_lib.Checkpointer, state, step: int, t,
                    evaluation: Evaluation, preempt: ckpt_lib.PreemptionHandler,
                    result: LoopResult) -> None:
  """Evaluates the mean parameters of the last `train.average_last` checkpoints, as
  'averaged/<metric>'; a stop request ends it (the run itself is saved)."""
  try:
    with preempt.interruptible():
      averaged = evaluate_average(runner, ckpt, state, step, t.average_last,
                                  evaluation.eval_iters, evaluation.hooks, t.max_eval_batches)
  except ckpt_lib.Preempted:
    logging.warning('preempted during the eval of the averaged checkpoints; the run is saved: '
                    'decode with experiments/decode.py --average_last %d', t.average_last)
    result.preempted = True
  else:
    evaluation.writer.write(step, averaged, prefix='')
    result.last_eval.update(averaged)
