"""The loop's periodic actions, each alone with fakes: no model, no compile (test_loop.py runs
them together)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from attn_jax.train import actions
from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train.evaluate import Evaluation
from attn_jax.train.metrics import MetricWriter, ProgressBar, read_metrics


class Ticks:
  """A clock that advances by `dt` on every reading, counting them."""

  def __init__(self, dt: float = 1.0):
    self.dt, self.readings = dt, 0

  def __call__(self) -> float:
    self.readings += 1
    return (self.readings - 1) * self.dt


class FakeWriter:
  def __init__(self):
    self.records = []

  def write(self, step, scalars, prefix='train', label=''):
    self.records.append((step, prefix, label, dict(scalars)))


def _metrics(loss: float, nonfinite: float = 0.0):
  one = np.float32(1.0)
  return {'loss': (np.float32(loss), one), 'nonfinite': (np.float32(nonfinite), one)}


def test_due_every_n_steps_and_at_the_end():
  assert [s for s in range(1, 9) if actions.due(3, s, last=s == 8)] == [3, 6, 8]
  assert [s for s in range(1, 9) if actions.due(0, s, last=s == 8)] == [8]  # 0 = at the end


def test_budget_clock_reads_once_per_step_and_stops_at_the_budget():
  now = Ticks(dt=30.0)  # Each step "takes" 30 s: a 2-minute budget ends at step 4.
  clock = actions.BudgetClock(budget_minutes=2.0, num_steps=100, now=now)
  clock.start(already_spent=0.0)
  finished = [clock.after_step(step, np.zeros(())) for step in range(1, 5)]
  assert finished == [False, False, False, True] and clock.spent == 120.0
  assert now.readings == 5  # One at the start, one per step.
  assert clock.progress(4) == 1.0 and clock.exhausted()
  # A resumed run spends only what is left.
  resumed = actions.BudgetClock(budget_minutes=2.0, num_steps=100, now=Ticks(dt=30.0))
  resumed.start(already_spent=60.0)
  assert [resumed.after_step(s, np.zeros(())) for s in (5, 6)] == [False, True]
  assert resumed.progress(5) == np.float32(1.0)
  # Without a budget: never read, never finished; progress is the step fraction.
  off = actions.BudgetClock(0.0, num_steps=10, now=Ticks())
  off.start()
  assert not off.after_step(1, np.zeros(())) and off.progress(5) == np.float32(0.5)


def test_train_log_writes_means_and_speed_without_paused_time():
  writer, now = FakeWriter(), Ticks(dt=1.0)
  flops = actions.FlopCount(peak_fn=lambda: 100.0)
  flops.measure(lambda: 50.0)
  log = actions.TrainLog(writer, log_every=2, count_tokens=lambda b: int(b['n']), flops=flops,
                         now=now)
  log.start(10)
  for step, loss in ((11, 1.0), (12, 3.0)):
    log.add_batch({'n': 7})
    log.add_metrics(_metrics(loss, nonfinite=1.0 if step == 12 else 0.0))
    with log.paused():  # Two readings one second apart: one second not trained.
      pass
    log.maybe_write(step, last=False)
  (step, prefix, _, summary), = writer.records
  assert step == 12 and prefix == 'train'
  assert summary['loss'] == 2.0 and summary['nonfinite'] == 1.0  # A count, not a mean.
  # Readings: start 0, paused 1-2, paused 3-4, write 5: 5 s elapsed, 2 paused, 3 trained.
  assert summary['steps_per_second'] == pytest.approx(2 / 3)
  assert summary['tokens_per_second'] == pytest.approx(14 / 3)
  assert summary['flops_utilisation'] == pytest.approx(50.0 * (2 / 3) / 100.0)
  log.add_metrics(_metrics(5.0))
  log.maybe_write(13, last=True)  # The last step writes whatever the interval.
  assert [r[0] for r in writer.records] == [12, 13] and writer.records[1][3]['loss'] == 5.0


def test_flop_count_measures_once_and_none_gives_no_utilisation():
  calls = []
  flops = actions.FlopCount(peak_fn=lambda: calls.append('peak') or 10.0)
  flops.measure(lambda: calls.append('count') or 20.0)
  flops.measure(lambda: calls.append('count') or 99.0)
  assert calls == ['count', 'peak'] and flops.utilisation(2.0) == 4.0
  none = actions.FlopCount(peak_fn=lambda: 1 / 0)  # Never asked for a peak without a count.
  none.measure(lambda: None)
  assert none.utilisation(2.0) is None


class FakeCheckpointer:
  def __init__(self):
    self.saved = []

  def save(self, step, state, **kwargs):
    self.saved.append((step, state, kwargs))
    return True


class FakeRunner:
  def host_state(self, state):
    return ('host', state)


def test_checkpointing_saves_host_state_data_position_and_budget():
  ckpt, clock = FakeCheckpointer(), actions.BudgetClock(1.0, 10, now=Ticks(dt=6.0))
  clock.start(already_spent=12.0)
  saver = actions.Checkpointing(ckpt, FakeRunner(), every=4, data_state=lambda: {'index': 3},
                                clock=clock)
  assert [s for s in range(1, 11) if saver.due(s, last=s == 10)] == [4, 8, 10]
  saver.save('state', 4, metrics={'valid/loss': 1.0})
  assert ckpt.saved == [(4, ('host', 'state'), {'data_state': {'index': 3},
                                                'seconds_spent': 12.0,
                                                'metrics': {'valid/loss': 1.0}})]
  no_budget = actions.Checkpointing(ckpt, FakeRunner(), every=0, data_state=lambda: None,
                                    clock=actions.BudgetClock(0.0, 10))
  no_budget.save('s', 5, force=True)
  assert ckpt.saved[-1][2] == {'data_state': None, 'seconds_spent': None, 'force': True}


class FakeHandler:
  def __init__(self, stop_at: int):
    self.stop_at, self.asked = stop_at, []

  def reached(self, step):
    self.asked.append(step)
    return step >= self.stop_at

  @contextlib.contextmanager
  def interruptible(self):
    if self.stop_at == 0:
      raise ckpt_lib.Preempted(15)
    yield


def test_preemption_check_polls_every_step_but_never_at_the_last():
  handler = FakeHandler(stop_at=3)
  stop = actions.PreemptionCheck(handler, every=10)  # One process: `every` is 1.
  assert [s for s in range(1, 6) if stop.due(s, last=s == 5)] == [3, 4]
  assert not stop.due(6, last=True) and 6 not in handler.asked


def test_nonfinite_check_raises_one_step_late_or_at_finish():
  check = actions.NonfiniteCheck('raise')
  check.after_step(1, _metrics(1.0))
  check.after_step(2, _metrics(np.inf, nonfinite=1.0))  # Not yet: it looks one step back.
  with pytest.raises(FloatingPointError, match='at step 2'):
    check.after_step(3, _metrics(1.0))
  last = actions.NonfiniteCheck('raise')
  last.after_step(7, _metrics(np.nan, nonfinite=1.0))
  with pytest.raises(FloatingPointError, match='at step 7'):
    last.finish()
  skip = actions.NonfiniteCheck('skip')
  skip.after_step(1, _metrics(np.nan, nonfinite=1.0))
  skip.finish()


class SumRunner:
  """Eval step: the batch's sum as a loss, counted once per batch."""

  def eval_step(self, state, batch):
    return {'loss': (np.float32(np.sum(batch) + state), np.float32(1.0))}

  def batch(self, batch):
    return batch

  def metrics(self, metrics):
    return metrics

  def host_state(self, state):
    return state


def test_evaluation_writes_one_record_of_loss_metrics_and_hooks():
  writer = FakeWriter()
  evaluation = Evaluation(SumRunner(), {'valid': lambda: [np.ones(2), np.ones(2) * 3]},
                          [lambda state, step: {'valid/hook': float(step)}], every=5,
                          max_batches=0, writer=writer)
  assert evaluation.enabled and [s for s in range(1, 12) if evaluation.due(s, s == 11)] == [
      5, 10, 11]
  scalars = evaluation(0.0, 5, FakeHandler(stop_at=99))
  assert scalars['valid/loss'] == 4.0 and scalars['valid/hook'] == 5.0  # mean of 2 and 6
  assert scalars['valid/perplexity'] == pytest.approx(np.exp(4.0))
  (step, prefix, label, written), = writer.records
  assert step == 5 and prefix == '' and label.startswith('eval (') and written == scalars
  with pytest.raises(ckpt_lib.Preempted):  # A stop during the eval: nothing written.
    evaluation(0.0, 10, FakeHandler(stop_at=0))
  assert len(writer.records) == 1
  assert not Evaluation(SumRunner(), {}, [], every=1, max_batches=0, writer=writer).enabled


def test_progress_bar_counts_the_budget_in_minutes(tmp_path):
  bar = ProgressBar(total_steps=1_000_000, budget_minutes=2.0, spent_minutes=0.5)
  assert bar._bar.total == 2.0 and bar._bar.n == 0.5
  bar.advance(10, minutes=1.25)
  bar.advance(11, minutes=9.0)  # Past the budget: the bar stops at it.
  assert bar._bar.n == 2.0
  bar.close()
  steps = ProgressBar(total_steps=8, start_step=2)
  steps.advance(5)
  assert steps._bar.total == 8 and steps._bar.n == 5
  steps.close()
  writer = MetricWriter(tmp_path, total_steps=8, tensorboard=False, progress=True,
                        budget_minutes=1.0, enabled=True)
  writer.write(1, {'loss': 2.0})
  writer.advance(1, minutes=0.5)
  writer.close()
  assert read_metrics(tmp_path)[0]['train/loss'] == 2.0
