"""The periodic actions of the training loop, each a small object that can be tested alone.

    clock = BudgetClock(budget_minutes, num_steps)      # the compute budget and its progress
    log = TrainLog(writer, log_every, count_tokens)      # one metrics record per log interval
    flops = FlopCount(peak)                              # the step's FLOPs -> utilisation
    saver = Checkpointing(checkpointer, runner, ...)    # periodic and final checkpoints
    stop = PreemptionCheck(handler, every)               # SIGTERM -> save and stop
    nonfinite = NonfiniteCheck(mode)                     # 'raise' one step late

The evaluation action is `attn_jax.train.evaluate.Evaluation`; the profiler
`throughput.Profiler`; `loop.train_loop` drives them all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import losses, parallel
from attn_jax.train.metrics import MetricWriter


def due(every: int, step: int, last: bool) -> bool:
  """Whether an action that runs every `every` steps (0 = only at the end) runs at `step`."""
  return bool(every and step % every == 0) or last


class BudgetClock:
  """The fraction of a run done: `max(seconds spent / budget, step / num_steps)`, in [0, 1].

  `spent` counts wall-clock seconds from `start(already_spent)` (the seconds a checkpoint
  recorded), so a resumed run spends only what is left. With several processes every reading
  is process 0's, so all of them see the same progress and stop at the same step. The clock is
  read once at `start` and once per step (`after_step`), never more.
  """

  def __init__(self, budget_minutes: float, num_steps: int, now: Callable[[], float] = None):
    self.budget_s = float(budget_minutes) * 60.0
    self.num_steps = num_steps
    self._now = now or time.monotonic
    self._origin, self._already, self.spent = 0.0, 0.0, 0.0
    self._in_flight = None

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

  def after_step(self, step: int, result: Any) -> bool:
    """Reads the clock after the step that produced `result` (any array of it) was dispatched;
    True when the budget is spent. Without a budget: nothing, False.

    The clock counts finished steps: it waits for the previous step (the queue of dispatched
    steps stays one deep, as it does anyway), not for this one.
    """
    if not self.enabled:
      return False
    if self._in_flight is not None:
      jax.block_until_ready(self._in_flight)
    self._in_flight = result
    self.read()
    if self.exhausted():
      logging.info('compute budget of %.1f minutes spent at step %d', self.budget_s / 60, step)
      return True
    return False


class FlopCount:
  """XLA's FLOP count of the train step, measured once on its first batch, and the
  utilisation it gives: `flops * steps_per_second / peak` (see `throughput`)."""

  def __init__(self, peak_fn: Callable[[], float]):
    self._peak_fn = peak_fn
    self.flops: float | None = None
    self.peak: float | None = None
    self.measured = False

  def measure(self, step_flops: Callable[[], float | None]) -> None:
    """Counts once (the first call): `step_flops()` lowers the step without running it."""
    if self.measured:
      return
    self.measured = True
    self.flops = step_flops()
    if self.flops:
      self.peak = self._peak_fn()
      logging.info('train step: %.4g GFLOP (XLA count); peak %.4g GFLOP/s', self.flops / 1e9,
                   self.peak / 1e9)

  def utilisation(self, steps_per_second: float) -> float | None:
    return self.flops * steps_per_second / self.peak if self.flops else None


class TrainLog:
  """The logging action: sums the steps' metrics and writes their means every `log_every`
  steps (and at the last), with the training speed.

  Speed counts training time only: time spent inside `paused()` (evals, checkpoint saves) is
  left out of the window it falls in. `count_tokens(batch)` (optional) gives each host batch's
  real tokens, for `tokens_per_second` over all processes.
  """

  def __init__(self, writer: MetricWriter, log_every: int, *,
               count_tokens: Callable[[Mapping[str, np.ndarray]], int] | None = None,
               flops: FlopCount | None = None, now: Callable[[], float] = time.time):
    self.writer, self.log_every = writer, log_every
    self.count_tokens, self.flops, self._now = count_tokens, flops, now
    self._sums: dict[str, Any] = {}
    self._tokens, self._paused = 0, 0.0
    self._t0, self._step0 = now(), 0

  def start(self, step: int) -> None:
    """Opens the first window at `step` (the step training starts from)."""
    self._t0, self._step0 = self._now(), step

  def add_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    if self.count_tokens is not None:
      self._tokens += self.count_tokens(batch)

  def add_metrics(self, metrics: Mapping[str, losses.Metric]) -> None:
    self._sums = losses.add_metrics(self._sums, metrics)

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """A section whose time is not training time."""
    start = self._now()
    try:
      yield
    finally:
      self._paused += self._now() - start

  def maybe_write(self, step: int, last: bool) -> None:
    if step % self.log_every == 0 or last:
      self.write(step)

  def write(self, step: int) -> dict[str, float]:
    """Writes the window's summary as 'train/<name>' at `step` and opens the next window."""
    summary = losses.summarize(parallel.to_host(self._sums))
    train_s = max(self._now() - self._t0 - self._paused, 1e-9)
    summary['steps_per_second'] = (step - self._step0) / train_s
    if self.count_tokens is not None:  # Every process counts its own rows.
      summary['tokens_per_second'] = self._tokens * jax.process_count() / train_s
    utilisation = self.flops.utilisation(summary['steps_per_second']) if self.flops else None
    if utilisation is not None:
      summary['flops_utilisation'] = utilisation
    summary['nonfinite'] = float(parallel.to_host(self._sums['nonfinite'][0]))  # A count.
    self.writer.write(step, summary)
    self._sums, self._tokens, self._paused = {}, 0, 0.0
    self._t0, self._step0 = self._now(), step
    return summary


class Checkpointing:
  """Saves the state (with the data iterator's position and the budget spent) every
  `every` steps (0 = only at the end), and on demand (`save`)."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer, runner: Any, *, every: int,
               data_state: Callable[[], Any], clock: BudgetClock):
    self.checkpointer, self.runner, self.every = checkpointer, runner, every
    self._data_state, self._clock = data_state, clock

  def due(self, step: int, last: bool) -> bool:
    return due(self.every, step, last)

  def save(self, state: Any, step: int, **kwargs: Any) -> bool:
    """Saves `state` at `step`; kwargs as `Checkpointer.save` (metrics, force, eval_pending)."""
    return self.checkpointer.save(
        step, self.runner.host_state(state), data_state=self._data_state(),
        seconds_spent=self._clock.spent if self._clock.enabled else None, **kwargs)


class PreemptionCheck:
  """Whether to stop for a SIGTERM (or a multi-host preemption notice) after a step.

  One process polls its flag every step; several agree on a step through a collective, every
  `every` steps. At the last step the run is complete (evaluated and saved): nothing to stop.
  """

  def __init__(self, handler: ckpt_lib.PreemptionHandler, every: int):
    self.handler = handler
    self.every = 1 if jax.process_count() == 1 else every

  def due(self, step: int, last: bool) -> bool:
    return not last and step % self.every == 0 and self.handler.reached(step)


class NonfiniteCheck:
  """`config.train.nonfinite='raise'`: stops with FloatingPointError naming the first step whose
  loss or gradient was NaN/Inf. Checked one step late (`after_step` looks at the previous
  step's count), so the host does not wait for every step to finish; `finish` checks the last.
  'skip' does nothing here (the step skipped the update and the count is logged)."""

  def __init__(self, mode: str):
    self.enabled = mode == 'raise'
    self._pending: tuple[int, Any] | None = None

  def after_step(self, step: int, metrics: Mapping[str, losses.Metric]) -> None:
    if self.enabled:
      self.finish()
      self._pending = (step, metrics['nonfinite'][0])

  def finish(self) -> None:
    pending = self._pending
    if pending is not None and float(parallel.to_host(pending[1])) > 0:
      raise FloatingPointError(
          f'non-finite loss or gradient at step {pending[0]} (update skipped); set '
          "config.train.nonfinite='skip' to continue past such steps")
