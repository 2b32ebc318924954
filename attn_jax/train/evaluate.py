"""Evaluation during training: the loss-based metrics of each eval set, the eval hooks, and the
eval of averaged checkpoints at the end.

    evaluation = Evaluation(runner, eval_iters, hooks, every=1000, max_batches=0, writer=w)
    if evaluation.due(step, last):
      scalars = evaluation(state, step, preemption_handler)   # may raise checkpoint.Preempted
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import losses, parallel
from attn_jax.train import state as state_lib
from attn_jax.train.actions import due
from attn_jax.train.metrics import MetricWriter

EvalHook = Callable[[state_lib.TrainState, int], Mapping[str, float]]


def _iterate(source: Any) -> Iterator[Any]:
  return iter(source() if callable(source) else source)


def evaluate(runner: Any, state, eval_iters: Mapping[str, Any], max_batches: int
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


def evaluate_all(runner: Any, state, eval_iters: Mapping[str, Any], hooks: Sequence[EvalHook],
                 step: int, max_batches: int) -> dict[str, float]:
  """`evaluate` (on the placed `state`), then each hook on the one logical copy of it."""
  scalars = evaluate(runner, state, eval_iters, max_batches) if eval_iters else {}
  host = runner.host_state(state) if hooks else None
  for hook in hooks:
    scalars.update(hook(host, step))
  return scalars


class Evaluation:
  """The evaluation action: every `every` steps (0 = only at the end) and at the last, the
  loss-based eval of each eval iterable and then the hooks (decoding, samples, heatmaps),
  written as one metrics record and one console line.

  A stop request (SIGTERM) during it raises `checkpoint.Preempted` at once: nothing of this
  eval is written, and the caller checkpoints the step with the eval pending.
  """

  def __init__(self, runner: Any, eval_iters: Mapping[str, Any], hooks: Sequence[EvalHook], *,
               every: int, max_batches: int, writer: MetricWriter):
    self.runner, self.eval_iters, self.hooks = runner, dict(eval_iters), list(hooks)
    self.every, self.max_batches, self.writer = every, max_batches, writer

  @property
  def enabled(self) -> bool:
    """Whether there is anything to evaluate."""
    return bool(self.eval_iters or self.hooks)

  def due(self, step: int, last: bool) -> bool:
    return due(self.every, step, last)

  def __call__(self, state, step: int, preempt: ckpt_lib.PreemptionHandler
               ) -> dict[str, float]:
    start = time.time()
    with preempt.interruptible():
      scalars = evaluate_all(self.runner, state, self.eval_iters, self.hooks, step,
                             self.max_batches)
    if scalars:
      self.writer.write(step, scalars, prefix='', label=f'eval ({time.time() - start:.1f}s)')
    return scalars


def evaluate_average(runner: Any, ckpt: ckpt_lib.Checkpointer, state, step: int, last_n: int,
                     eval_iters: Mapping[str, Any], hooks: Sequence[EvalHook],
                     max_batches: int) -> dict[str, float]:
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
  for hook in hooks:
    scalars.update(hook(host, step))
  logging.info('step %d: evaluated the mean of checkpoints %s', step, list(steps))
  return {f'averaged/{k}': v for k, v in scalars.items()}
