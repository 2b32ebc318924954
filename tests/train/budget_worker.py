"""A tiny run under a compute budget, on a clock that advances one second per reading, for the
kill -9 test: `python -m tests.train.budget_worker DIR K` SIGKILLs itself when the train
iterator is asked for batch K (K = -1: train to the budget)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from attn_jax.train import config as train_config
from attn_jax.train import loop
from tests.train import tiny

BUDGET_SECONDS = 20  # = steps: the clock is read once at the start and once per step
CHECKPOINT_EVERY = 5
WARMUP_FRACTION = 0.2


class FakeClock:
  """`now()` returns 0, 1, 2, ...: each reading is one second after the last."""

  def __init__(self):
    self.readings = 0

  def __call__(self) -> float:
    self.readings += 1
    return float(self.readings - 1)


class KillAt(tiny.BatchIterator):

  def __init__(self, kill_at: int, **kw):
    super().__init__(**kw)
    self.kill_at = kill_at

  def __next__(self):
    if self.index == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return super().__next__()


def config(**train):
  c = train_config.full_config()
  c.optim.update(dict(name='adamw', learning_rate=0.02, schedule='warmup_cosine',
                      warmup_fraction=WARMUP_FRACTION, weight_decay=0.01))
  c.train.update(dict(num_steps=1000, budget_minutes=BUDGET_SECONDS / 60, log_every=1,
                      eval_every=0, checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=3,
                      async_checkpoint=False, progress=False, tensorboard=False))
  c.train.update(train)
  return c


def run(workdir, kill_at: int = -1, eval_hooks=(), **train):
  """Trains the tiny task in `workdir` on a fresh FakeClock (restored after)."""
  init_params, loss_fn = tiny.make_task(dropout_rate=0.2)
  saved, loop._now = loop._now, FakeClock()
  try:
    return loop.train_loop(config(**train), workdir, init_params=init_params, loss_fn=loss_fn,
                           train_iter=KillAt(kill_at, seed=1),
                           eval_iters={'valid': [tiny.make_batch(99, 0)]},
                           eval_hooks=eval_hooks)
  finally:
    loop._now = saved


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  run(sys.argv[1], int(sys.argv[2]))
