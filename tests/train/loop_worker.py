"""A tiny training run for the SIGKILL/resume test: `python -m tests.train.loop_worker DIR K`.

With K >= 0 the process SIGKILLs itself in the background thread that writes the asynchronous
checkpoint of step K, once the arrays are written and before orbax commits them (renames the
temporary directory to the step number): a partial step is left on disk beside the committed
ones, and the metrics of the steps trained meanwhile are in metrics.jsonl. K = -1 trains to
the end.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from attn_jax.train import config as train_config
from attn_jax.train import loop
from tests.train import tiny

NUM_STEPS = 8
CHECKPOINT_EVERY = 2
KILL_AT = 3 * CHECKPOINT_EVERY  # Steps 2 and 4 are committed by then.


def kill_when_committing(step: int) -> None:
  """SIGKILLs this process when orbax starts committing the checkpoint of `step`."""
  from orbax.checkpoint._src.path import atomicity

  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get().name.startswith(f'{step}.'):  # '<step>.orbax-checkpoint-tmp-<time>'
      os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def config():
  c = train_config.full_config()
  c.optim.update(dict(name='adamw', learning_rate=0.02, schedule='warmup_cosine', warmup_steps=2,
                      weight_decay=0.01, b2=0.98))
  c.train.update(dict(num_steps=NUM_STEPS, log_every=1, eval_every=0,
                      checkpoint_every=CHECKPOINT_EVERY, progress=False, tensorboard=False))
  return c


def run(workdir):
  init_params, loss_fn = tiny.make_task(dropout_rate=0.2)
  return loop.train_loop(config(), workdir, init_params=init_params, loss_fn=loss_fn,
                         train_iter=tiny.BatchIterator(seed=1))


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  if int(sys.argv[2]) >= 0:
    kill_when_committing(int(sys.argv[2]))
  print(f'start_step={run(sys.argv[1]).start_step}')
