"""The compute budget (config.train.budget_minutes): the stop with a checkpoint and the final
eval, a schedule on the fraction of the budget that completes inside it, an exact resume
after kill -9, and the eval of averaged checkpoints (config.train.average_last) at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import loop, optim
from attn_jax.train.metrics import read_metrics
from tests.train import budget_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAST = worker.BUDGET_SECONDS  # One fake second per step: the budget ends at this step.


def _series(workdir, key):
  return {r['step']: r[key] for r in read_metrics(workdir) if key in r}


def _params_hook(seen):
  def hook(state, step):
    seen.append(jax.tree_util.tree_map(np.asarray, state.params))
    return {}
  return hook


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('budget')
  seen = []
  result = worker.run(workdir, average_last=3, eval_hooks=[_params_hook(seen)])
  return workdir, result, seen


def test_budget_stops_with_a_checkpoint_and_the_final_eval(uninterrupted):
  workdir, result, _ = uninterrupted
  assert result.step == LAST and result.budget_exhausted and not result.preempted
  assert result.seconds_spent == LAST
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == [10, 15, 20]
  assert sorted(_series(workdir, 'valid/loss')) == [LAST]
  ck = ckpt_lib.Checkpointer(workdir / 'checkpoints')
  restored = ck.restore(jax.eval_shape(lambda: result.state))
  ck.close()
  assert restored.step == LAST and restored.seconds_spent == LAST
  # Finished: a re-run restores, finds the budget spent and trains nothing.
  again = worker.run(workdir)
  assert again.start_step == again.step == LAST and again.budget_exhausted


def test_schedule_runs_on_the_budget_and_completes_inside_it(uninterrupted):
  workdir, _, _ = uninterrupted
  lr = _series(workdir, 'train/learning_rate')
  assert sorted(lr) == list(range(1, LAST + 1))
  # Step k+1 runs at the progress read after step k: k seconds of the budget.
  schedule = optim.make_schedule(worker.config().optim, 'progress')
  want = [float(schedule((k - 1) / LAST)) for k in range(1, LAST + 1)]
  np.testing.assert_allclose([lr[k] for k in sorted(lr)], want, rtol=1e-6, atol=1e-12)
  peak = worker.config().optim.learning_rate
  warmup_end = int(worker.WARMUP_FRACTION * LAST) + 1
  assert lr[1] == 0.0 and lr[warmup_end] == pytest.approx(peak)  # Warmup completed...
  assert lr[LAST] < 0.01 * peak  # ...and the cosine decay nearly so, at the last step.


@pytest.mark.slow
def test_resume_after_kill_9_spends_only_what_is_left_and_ends_where_the_run_does(
    uninterrupted, tmp_path):
  ref_dir, ref, _ = uninterrupted
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  killed = subprocess.run([sys.executable, '-m', 'tests.train.budget_worker', str(tmp_path),
                           '12'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10', '5']
  resumed = worker.run(tmp_path)
  assert resumed.start_step == 10 and resumed.step == LAST and resumed.seconds_spent == LAST
  np.testing.assert_array_equal(  # The same progress at every step, hence the same run.
      [v for _, v in sorted(_series(tmp_path, 'train/learning_rate').items())],
      [v for _, v in sorted(_series(ref_dir, 'train/learning_rate').items())])
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.params, ref.state.params)


def test_the_mean_of_the_last_checkpoints_is_evaluated_at_the_end(uninterrupted):
  workdir, result, seen = uninterrupted
  ck = ckpt_lib.Checkpointer(workdir / 'checkpoints')
  abstract = jax.eval_shape(lambda: result.state)
  saved = [ck.restore(abstract, step).state.params for step in (10, 15, 20)]
  ck.close()
  mean = jax.tree_util.tree_map(lambda *p: np.mean(np.stack(p), axis=0), *saved)
  # The hook ran twice: on the final state, then on the averaged parameters.
  assert len(seen) == 2
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         seen[1], mean)
  final = {k: v for r in read_metrics(workdir) for k, v in r.items() if r['step'] == LAST}
  assert 'averaged/valid/loss' in final and final['averaged/valid/loss'] != final['valid/loss']
  assert result.last_eval['averaged/valid/loss'] == final['averaged/valid/loss']


def test_budget_and_average_config_errors(tmp_path):
  for train, match in [(dict(budget_minutes=-1.0), 'budget_minutes'),
                       (dict(average_last=4, keep_checkpoints=3), 'keep_checkpoints >= 4')]:
    with pytest.raises(ValueError, match=match):
      loop.validate_config(worker.config(**train))
  bad = worker.config()
  bad.optim.warmup_fraction = 1.5
  with pytest.raises(ValueError, match='warmup_fraction'):
    optim.make_optimizer(bad.optim, 'progress')
