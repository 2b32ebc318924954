"""The parallel-mode-specific pieces of a training run: where the state and batches live, and
the compiled train and eval steps, for `config.parallel.mode` 'none', 'pmap' or 'sharded'.

    runner = Runner(config, init_params, loss_fn, tx, schedule, clock='steps')
    state = runner.init()                          # placed for runner.step
    state, metrics = runner.step(state, runner.batch(batch), progress)
    checkpointer.save(step, runner.host_state(state))

The loop (`attn_jax.train.loop`) talks to the runner only, so it reads the same for every mode;
the wrappers themselves (`pmap_train_step`, `sharded_train_step`, the mesh) are in `parallel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import parallel, throughput
from attn_jax.train import state as state_lib
from attn_jax.train import step as step_lib
from attn_jax.train.config import default_parallel


class Runner:
  """The parallel-mode-specific pieces: state placement, batch placement, compiled steps.

  Args:
    config: sections `optim`, `train` and optionally `parallel`.
    init_params: `rng -> params`; loss_fn: see `step.py`; tx, schedule: from
      `optim.make_optimizer`.
    clock: 'progress' (the schedule follows the fraction of a compute budget done, passed to
      `step`) or 'steps'.
  """

  def __init__(self, config: ml_collections.ConfigDict, init_params: Callable[[jax.Array], Any],
               loss_fn: step_lib.LossFn, tx: Any, schedule: Any, clock: str = 'steps'):
    pc = config.get('parallel', default_parallel())
    self.mode = pc.mode
    self.clock = clock
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


def peak_flops(config_peak: float) -> float:
  """FLOP/s the utilisation is measured against, for all devices together."""
  if jax.default_backend() == 'cpu':  # CPU devices (also fake ones) share the host's cores
    per_process = config_peak or throughput.matmul_flops_per_second()
    return per_process * jax.process_count()
  return (config_peak or throughput.matmul_flops_per_second()) * jax.device_count()
