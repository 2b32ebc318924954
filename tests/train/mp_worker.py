"""One process of the two-process test: `python -m tests.train.mp_worker WORKDIR STEPS`.

Reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Both processes run
`train_loop` in sharded mode on a shared workdir, each feeding its half of every global
batch: first to step STEPS - 1 (checkpoint), then again to STEPS, which resumes from that
checkpoint (sharded state + this process's own iterator position). Process 0 alone writes
metrics.jsonl; each process writes `done_<i>.json` with what it saw.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from attn_jax.train import loop, parallel


def main(workdir: str, steps: int) -> None:
  parallel.initialize_distributed()
  from tests.train import test_parallel, tiny

  config = test_parallel.loop_config(steps - 1)
  init_params, loss_fn = tiny.make_task()

  def run(cfg):
    it = tiny.BatchIterator(seed=0, batch_size=parallel.local_batch_size(8),
                            offset=jax.process_index(), stride=jax.process_count())
    return loop.train_loop(cfg, workdir, init_params=init_params, loss_fn=loss_fn,
                           train_iter=it), it

  first, _ = run(config)
  config.train.num_steps = steps
  second, it = run(config)
  (pathlib.Path(workdir) / f'done_{jax.process_index()}.json').write_text(json.dumps({
      'first_step': first.step, 'start_step': second.start_step, 'step': second.step,
      'iterator_index': it.index, 'process_count': jax.process_count(),
      'device_count': jax.device_count()}))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
