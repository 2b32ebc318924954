"""A tiny training run for the SIGKILL/resume test: `python -m tests.train.loop_worker DIR K`.

With K >= 0 the process SIGKILLs itself when the loop asks for batch K (after the checkpoint
at step CHECKPOINT_EVERY has had time to land); K = -1 trains to the end.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys
import time

from attn_jax.train import config as train_config
from attn_jax.train import loop
from tests.train import tiny

NUM_STEPS = 8
CHECKPOINT_EVERY = 3
KILL_AT = 5


class _KillingIterator(tiny.BatchIterator):

  def __init__(self, workdir: str, kill_at: int):
    super().__init__(seed=1)
    self.workdir, self.kill_at = pathlib.Path(workdir), kill_at

  def __next__(self):
    if self.index == self.kill_at:
      # Die only once the async checkpoint of step CHECKPOINT_EVERY is committed (orbax
      # renames the finished temporary directory to its step number), so the restart has
      # something to resume from; metrics of later steps are already in metrics.jsonl.
      done = self.workdir / 'checkpoints' / str(CHECKPOINT_EVERY)
      deadline = time.time() + 60
      while not done.is_dir() and time.time() < deadline:
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)
    return super().__next__()


def config():
  c = train_config.full_config()
  c.optim.update(dict(name='adamw', learning_rate=0.02, schedule='warmup_cosine', warmup_steps=2,
                      weight_decay=0.01, b2=0.98))
  c.train.update(dict(num_steps=NUM_STEPS, log_every=1, eval_every=0,
                      checkpoint_every=CHECKPOINT_EVERY, progress=False, tensorboard=False))
  return c


def run(workdir, kill_at: int = -1):
  init_params, loss_fn = tiny.make_task(dropout_rate=0.2)
  return loop.train_loop(config(), workdir, init_params=init_params, loss_fn=loss_fn,
                         train_iter=_KillingIterator(workdir, kill_at))


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  print(f'start_step={run(sys.argv[1], int(sys.argv[2])).start_step}')
