"""Training throughput: tokens per second, the step's FLOPs and the fraction of the machine's
matmul rate they reach, and an optional `jax.profiler` trace of a few steps.

    peak = matmul_flops_per_second()              # this device, float32, measured
    flops = step_flops(train_step, state, batch)  # what the compiled step executes
    utilisation = flops * steps_per_second / (peak * jax.device_count())

The FLOPs are XLA's own count of the lowered step (forward, backward and the optimizer; every
matmul, elementwise op and reduction), so the utilisation needs no model formula and is the
same measure for every model; it is computed for the first batch shape seen (bucketed data
with several shapes gives an estimate).
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROFILE_DIR = 'profile'  # Under the workdir.


def matmul_flops_per_second(size: int = 1024, reps: int = 5, device: Any = None) -> float:
  """FLOP/s of a float32 `[size, size] @ [size, size]` on `device` (default: the first), the
  best of `reps` timed runs after a warm-up: the peak a step's utilisation is measured against.
  """
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / max(best, 1e-9)


def step_flops(step_fn: Any, *args: Any, per_device_program: bool = False) -> float | None:
  """FLOPs of one call of the jitted (or pmapped) `step_fn` on `args`, all devices together,
  from XLA's cost analysis of the lowered program (no compilation); None where the backend
  gives none.

  `per_device_program`: the step is a `pmap`, whose lowered program is one device's share; its
  count is multiplied by the number of devices. A jit (also a sharded one) is lowered whole.
  """
  fn = getattr(step_fn, 'jitted', step_fn)  # parallel.sharded_train_step keeps its jit here
  try:
    cost = fn.lower(*args).cost_analysis()
  except Exception as e:  # Backends without cost analysis; never worth stopping training.
    logging.info('no FLOP count for the train step (%s): utilisation not logged', e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = None if not cost else cost.get('flops')
  if not flops or flops <= 0:
    return None
  return float(flops) * (jax.device_count() if per_device_program else 1)


def count_tokens(batch: Any, keys: tuple[str, ...] = ('inputs', 'targets')) -> int:
  """Real (non-pad, id != 0) tokens in the batch's `keys` arrays that are present."""
  return int(sum(np.count_nonzero(np.asarray(batch[k])) for k in keys if k in batch))


class Profiler:
  """Writes a `jax.profiler` trace of `num_steps` steps, starting after `skip` steps (so
  compilation stays out of it), to `workdir/profile/` in TensorBoard's layout, with a Perfetto
  trace file beside it.

  View: `tensorboard --logdir WORKDIR/profile` (with `tensorboard-plugin-profile`), or open
  the `*.trace.json.gz` under it in https://ui.perfetto.dev.
  """

  def __init__(self, workdir: str | os.PathLike, num_steps: int, skip: int):
    self.dir = pathlib.Path(workdir) / PROFILE_DIR
    self.num_steps, self.skip = int(num_steps), int(skip)
    self._first = self._last = None
    self.active = False

  def step(self, steps_done: int, state: Any) -> None:
    """Call after each step with the number of steps this process has run and the state."""
    if self.num_steps <= 0 or jax.process_index() != 0:
      return
    if self._first is None and steps_done >= self.skip:
      jax.block_until_ready(state)
      self.dir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
      self._first, self.active = steps_done, True
      logging.info('profiling %d steps into %s', self.num_steps, self.dir)
    elif self.active and steps_done >= self._first + self.num_steps:
      self.stop(state)

  def stop(self, state: Any = None) -> None:
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    logging.info('wrote a profile of %d steps to %s (tensorboard --logdir %s, or open its '
                 '.trace.json.gz in ui.perfetto.dev)', self.num_steps, self.dir, self.dir)
