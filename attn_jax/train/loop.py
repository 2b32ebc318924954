"""A generic training loop: steps, periodic eval, metrics, checkpoints, resume, preemption.

    result = train_loop(config, workdir, init_params=init_params, loss_fn=loss_fn,
                        train_iter=train_iter, eval_iters={'valid': lambda: valid_batches()})

The loop knows no model or dataset. A task provides `init_params(rng)`, `loss_fn(params,
batch, rng, train) -> (objective_sum, {name: (sum, count)})`, a train iterator of numpy
batch dicts (with grain-style `get_state()`/`set_state()` for exact resume), eval iterables
and optional eval hooks (e.g. decoding + BLEU). The config has sections `optim`,
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
from attn_jax.train import state as state_lib
from attn_jax.train import step as step_lib
from attn_jax.train.config import default_parallel, validate_choices
from attn_jax.train.metrics import MetricWriter

EvalHook = Callable[[state_lib.TrainState, int], Mapping[str, float]]
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
  validate_choices(config, 'train.best_mode', ckpt_lib.BEST_MODES)
  validate_choices(config, 'train.on_mismatch', ON_MISMATCH)
  if 'parallel' in config:
    validate_choices(config, 'parallel.mode', parallel.PARALLEL_MODES)


def schedule_clock(config: ml_collections.ConfigDict) -> str:
  """'progress' when the run has a compute budget (the schedule follows the fraction done),
  else 'steps'."""
  return 'progress' if config.train.get('budget_minutes', 0.0) > 0 else 'steps'


class BudgetClock:
  """The fraction of a run done: `max(seconds spent / budget, step / num_steps)`, in [0, 1].

  `spent` counts wall-clock seconds from `start(already_spent)` (the seconds a checkpoint
  recorded), so a resumed run spends only what is left. With several processes every reading
  is process 0's, so all of them see the same progress and stop at the same step.
  """

  def __init__(self, budget_minutes: float, num_steps: int, now: Callable[[], float] = None):
    self.budget_s = float(budget_minutes) * 60.0
    self.num_steps = num_steps
    self._now = now or time.monotonic
    self._origin, self._already, self.spent = 0.0, 0.0, 0.0

  @property
  def enabled(self) -> bool:
    return self.budget_s > 0

  def start(self, already_spent: float = 0.0) -> None:
    self._origin, self._already = self._now(), float(already_spent)
    self.spent = self._already

  def read(self) -> float:
    """Updates and returns `spent` (one clock reading)."""
    spent = self._already + self._now() - self._origin
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      spent = float(multihost_utils.broadcast_one_to_all(np.float64(spent)))
    self.spent = spent
    return spent

  def progress(self, step: int) -> np.float32:
    done = max(self.spent / self.budget_s if self.enabled else 0.0, step / self.num_steps)
    return np.float32(min(1.0, done))

  def exhausted(self) -> bool:
    return self.enabled and self.spent >= self.budget_s


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  oc = ml_collections.ConfigDict(config.optim.to_dict())
  if oc.get('schedule') in ('warmup_cosine', 'warmup_linear') and not oc.get('total_steps'):
    oc.total_steps = max(1, config.train.num_steps // max(1, oc.get('grad_accum_steps', 1)))
  return oc


class _Runner:
  """The parallel-mode-specific pieces: state placement, batch placement, compiled steps."""

  def __init__(self, config, init_params, loss_fn, tx, schedule):
    pc = config.get('parallel', default_parallel())
    self.mode = pc.mode
    self.clock = schedule_clock(config)
    step_fn = step_lib.make_train_step(
        loss_fn, tx, schedule, grad_accum_steps=config.optim.grad_accum_steps,
        nonfinite=config.train.nonfinite)
    eval_fn = step_lib.make_eval_step(loss_fn)
    rng = jax.random.PRNGKey(config.train.seed)
    self.abstract = state_lib.abstract_state(init_params, tx, rng)
    self.shardings = None
    if self.mode == 'sharded':
      self.mesh = parallel.make_mesh(pc.mesh.to_dict())
      rules = list(pc.logical_axis_rules)
      self.shardings = parallel.state_shardings(
          self.abstract, state_lib.abstract_params(init_params, rng), self.mesh, rules)
      self.train_step = parallel.sharded_train_step(step_fn, self.mesh, self.shardings, rules)
      self.eval_step = parallel.sharded_eval_step(eval_fn, self.mesh, self.shardings, rules)
    elif self.mode == 'pmap':
      self.train_step = parallel.pmap_train_step(step_fn)
      self.eval_step = parallel.pmap_eval_step(eval_fn)
    else:
      self.train_step = jax.jit(step_fn, donate_argnums=(0,))
      self.eval_step = jax.jit(eval_fn)
    self._init = lambda: state_lib.create_train_state(init_params, tx, rng,
                                                      shardings=self.shardings)

  def init(self):
    return self.place(self._init())

  def abstract_for_restore(self):
    return ckpt_lib.with_shardings(self.abstract, self.shardings)

  def place(self, state):
    """A freshly created/restored state -> the layout the compiled step takes."""
    return parallel.replicate(state) if self.mode == 'pmap' else state

  def host_state(self, state):
    """The state as one logical copy (for checkpoints and hooks)."""
    return parallel.unreplicate(state) if self.mode == 'pmap' else state

  def batch(self, batch):
    if self.mode == 'pmap':
      return parallel.shard_batch(batch)
    if self.mode == 'sharded':
      return parallel.global_batch(batch, self.mesh)
    return batch

  def metrics(self, metrics):
    return parallel.unreplicate(metrics) if self.mode == 'pmap' else metrics

  def step(self, state, batch, progress):
    """One compiled train step; `progress` reaches it only on the 'progress' clock."""
    return self.train_step(state, batch, progress if self.clock == 'progress' else None)

  def step_flops(self, state, batch, progress) -> float | None:
    """FLOPs of one train step on this placed state and batch (all devices together)."""
    args = (state, batch, progress if self.clock == 'progress' else None)
    if self.mode == 'sharded':
      with jax.set_mesh(self.mesh):
        return throughput.step_flops(self.train_step.jitted, *args)
    return throughput.step_flops(self.train_step, *args,
                                 per_device_program=self.mode == 'pmap')


def _peak_flops(config_peak: float) -> float:
  """FLOP/s the utilisation is measured against, for all devices together."""
  if jax.default_backend() == 'cpu':  # CPU devices (also fake ones) share the host's cores
    per_process = config_peak or throughput.matmul_flops_per_second()
    return per_process * jax.process_count()
  return (config_peak or throughput.matmul_flops_per_second()) * jax.device_count()


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


def _restore_or_start_over(config, workdir: pathlib.Path, runner: _Runner,
                           keep_on_restart: Sequence[str]
                           ) -> tuple[ckpt_lib.Checkpointer, ckpt_lib.Restored | None]:
  """The open Checkpointer and the restored checkpoint (None: train from step 0).

  Only renames happen here (damaged steps to `corrupt_<step>`, or the old run to
  `replaced_<n>/`); nothing is written or cut back. A refusal closes the Checkpointer, so that
  the process exits cleanly.
  """
  t = config.train

  def open_checkpointer():
    return ckpt_lib.Checkpointer(workdir / CHECKPOINTS_DIR, max_to_keep=t.keep_checkpoints,
                                 best_metric=t.best_metric or None, best_mode=t.best_mode,
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


def _iterate(source: Any) -> Iterator[Any]:
  return iter(source() if callable(source) else source)


def evaluate(runner: _Runner, state, eval_iters: Mapping[str, Any], max_batches: int
             ) -> dict[str, float]:
  """Sums eval metrics over each eval iterable; returns `{'<name>/<metric>': mean}`."""
  out = {}
  for name, source in eval_iters.items():
    total, n = {}, 0
    for batch in _iterate(source):
      metrics = runner.eval_step(state, runner.batch(batch))
      total = losses.add_metrics(total, runner.metrics(metrics))
      n += 1
      if max_batches and n >= max_batches:
        break
    if n == 0:
      raise ValueError(f'eval set {name!r} yielded no batches')
    summary = losses.summarize(parallel.to_host(total))
    out.update({f'{name}/{k}': v for k, v in summary.items()})
  return out


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

  Returns:
    LoopResult. Raises FloatingPointError naming the step when `nonfinite='raise'` and a
    step's loss or gradient was NaN/Inf, and `checkpoint.StateMismatchError` (nothing written)
    when the workdir's checkpoint holds a state of other shapes and
    `config.train.on_mismatch='error'`.
  """
  if not validated:
    validate_config(config)
  t = config.train
  workdir = pathlib.Path(workdir)
  eval_iters = dict(eval_iters or {})
  tx, schedule = optim.make_optimizer(optim_config(config), schedule_clock(config))
  runner = _Runner(config, init_params, loss_fn, tx, schedule)
  logging.info('model has %d parameters', state_lib.param_count(runner.abstract.params))

  ckpt, restored = _restore_or_start_over(config, workdir, runner, keep_on_restart)
  clock = BudgetClock(t.get('budget_minutes', 0.0), t.num_steps, now=_now)
  try:
    if restored is None:
      state = runner.init()
      start = 0
    else:
      state, start = runner.place(restored.state), restored.step
      if restored.data_state is not None and hasattr(train_iter, 'set_state'):
        train_iter.set_state(restored.data_state)
      else:
        logging.warning('resumed at step %d but the train iterator state was not restored '
                        '(iterator has no set_state or checkpoint has none)', start)
      logging.info('resumed from checkpoint step %d', start)
    if on_start is not None:
      on_start(start)
    # Cuts metrics.jsonl back to `start`: only now that the restore has succeeded.
    writer = MetricWriter(workdir, total_steps=t.num_steps, start_step=start,
                          tensorboard=t.tensorboard, progress=t.progress)
  except BaseException:
    ckpt.close()
    raise
  eval_pending = restored is not None and restored.eval_pending and (eval_iters or eval_hooks)
  result = LoopResult(state=None, step=start, start_step=start)
  check_every = 1 if jax.process_count() == 1 else t.preemption_check_every

  def data_state():
    return train_iter.get_state() if hasattr(train_iter, 'get_state') else None

  def run_eval(step, preempt):
    # A stop request ends the eval itself at once (raising Preempted), not what it writes.
    with preempt.interruptible():
      scalars = evaluate(runner, state, eval_iters, t.max_eval_batches) if eval_iters else {}
      for hook in eval_hooks:
        scalars.update(hook(runner.host_state(state), step))
    if scalars:
      writer.write(step, scalars, prefix='')
    result.last_eval = scalars
    return scalars

  step, acc, pending, t0, t0_step, paused = start, {}, None, time.time(), start, 0.0
  tokens, flops, peak, in_flight = 0, None, None, None
  clock.start(restored.seconds_spent if restored is not None else 0.0)
  if clock.enabled:
    logging.info('compute budget: %.1f of %.1f minutes spent, stopping at the budget or step %d',
                 clock.spent / 60, clock.budget_s / 60, t.num_steps)
  finished = clock.exhausted()  # A resumed run whose budget was already spent.

  def save(step, **kw):
    return ckpt.save(step, runner.host_state(state), data_state=data_state(),
                     seconds_spent=clock.spent if clock.enabled else None, **kw)

  profiler = throughput.Profiler(workdir, t.profile_steps, t.profile_skip)
  try:
    with ckpt_lib.PreemptionHandler() as preempt:
      if eval_pending:
        logging.info('step %d: doing the eval that a stop interrupted', step)
        try:
          run_eval(step, preempt)
        except ckpt_lib.Preempted:
          result.preempted = True  # Its checkpoint still records the eval as pending.
      while step < t.num_steps and not result.preempted and not finished:
        try:
          batch = next(train_iter)
        except StopIteration:
          logging.warning('train iterator exhausted at step %d of %d', step, t.num_steps)
          result.data_exhausted = True
          break
        if count_tokens is not None:
          tokens += count_tokens(batch)
        placed = runner.batch(batch)
        progress = clock.progress(step)
        if step == start:  # XLA's FLOP count of the step, from its first batch shape
          flops = runner.step_flops(state, placed, progress)
          peak = _peak_flops(t.peak_flops) if flops else None
          if flops:
            logging.info('train step: %.4g GFLOP (XLA count); peak %.4g GFLOP/s', flops / 1e9,
                         peak / 1e9)
        state, metrics = runner.step(state, placed, progress)
        metrics = runner.metrics(metrics)
        step += 1
        if clock.enabled:
          # The clock counts finished steps: wait for the previous one (the queue of
          # dispatched steps stays one deep, as it does anyway).
          if in_flight is not None:
            jax.block_until_ready(in_flight)
          in_flight = metrics['loss']
          clock.read()
          finished = clock.exhausted()
          if finished:
            logging.info('compute budget of %.1f minutes spent at step %d',
                         clock.budget_s / 60, step)
        profiler.step(step - start, state)
        if t.nonfinite == 'raise':
          # Checked one step late so the host does not wait for every step to finish.
          _raise_if_nonfinite(pending)
          pending = (step, metrics['nonfinite'][0])
        acc = losses.add_metrics(acc, metrics)
        writer.advance(step)
        last = step == t.num_steps or finished
        if step % t.log_every == 0 or last:
          summary = losses.summarize(parallel.to_host(acc))
          # Training speed only: the time spent in eval and checkpoint saves is left out.
          train_s = max(time.time() - t0 - paused, 1e-9)
          summary['steps_per_second'] = (step - t0_step) / train_s
          if count_tokens is not None:  # Every process counts its own rows.
            summary['tokens_per_second'] = tokens * jax.process_count() / train_s
          if flops:
            summary['flops_utilisation'] = flops * summary['steps_per_second'] / peak
          summary['nonfinite'] = float(parallel.to_host(acc['nonfinite'][0]))  # A count.
          writer.write(step, summary)
          acc, t0, t0_step, paused, tokens = {}, time.time(), step, 0.0, 0
        eval_scalars = None
        pause_start = time.time()
        if (t.eval_every and step % t.eval_every == 0) or last:
          try:
            eval_scalars = run_eval(step, preempt)
          except ckpt_lib.Preempted:
            logging.warning('preempted during the eval at step %d: saving a checkpoint that '
                            'asks the resumed run to evaluate first, and stopping', step)
            save(step, force=True, eval_pending=True)
            result.preempted = True
            break
          logging.info('eval at step %d took %.1fs', step, time.time() - pause_start)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or last:
          save(step, metrics=eval_scalars)
        paused += time.time() - pause_start
        # At the last step the run is complete (evaluated and saved): nothing to stop.
        if not last and step % check_every == 0 and preempt.reached(step):
          logging.warning('preempted: saving checkpoint at step %d and stopping', step)
          save(step, force=True)
          result.preempted = True
          break
      if t.nonfinite == 'raise':
        _raise_if_nonfinite(pending)
      if result.data_exhausted and step > start:
        save(step)  # No-op if saved.
      if t.get('average_last', 0) > 1 and step > start and not result.preempted:
        try:
          with preempt.interruptible():
            averaged = _evaluate_average(runner, ckpt, state, step, t.average_last, eval_iters,
                                         eval_hooks, t.max_eval_batches)
        except ckpt_lib.Preempted:
          logging.warning('preempted during the eval of the averaged checkpoints; the run is '
                          'saved: decode with experiments/decode.py --average_last %d',
                          t.average_last)
          result.preempted = True
        else:
          writer.write(step, averaged, prefix='')
          result.last_eval.update(averaged)
  finally:
    profiler.stop()
    ckpt.wait()
    ckpt.close()
    writer.close()
  result.state, result.step = runner.host_state(state), step
  result.budget_exhausted, result.seconds_spent = clock.exhausted(), clock.spent
  return result


def _evaluate_average(runner: _Runner, ckpt: ckpt_lib.Checkpointer, state, step: int,
                      last_n: int, eval_iters, eval_hooks, max_batches: int) -> dict[str, float]:
  """Evaluates the mean parameters of the last `last_n` checkpoints: `{'averaged/<key>'}`."""
  from attn_jax.train import averaging  # Only runs that average need it.
  ckpt.wait()
  kept = ckpt.all_steps()
  if len(kept) < last_n:
    logging.warning('train.average_last=%d but only %d checkpoint(s) were saved (%s): '
                    'averaging those', last_n, len(kept), sorted(kept))
  params, steps = averaging.average_checkpoints(ckpt, runner.abstract_for_restore(),
                                                min(last_n, len(kept)))
  host = runner.host_state(state).replace(params=params)
  scalars = evaluate(runner, runner.place(host), eval_iters, max_batches) if eval_iters else {}
  for hook in eval_hooks:
    scalars.update(hook(host, step))
  logging.info('step %d: evaluated the mean of checkpoints %s', step, list(steps))
  return {f'averaged/{k}': v for k, v in scalars.items()}


def _raise_if_nonfinite(pending: tuple[int, Any] | None) -> None:
  if pending is not None and float(parallel.to_host(pending[1])) > 0:
    raise FloatingPointError(
        f'non-finite loss or gradient at step {pending[0]} (update skipped); set '
        "config.train.nonfinite='skip' to continue past such steps")
