"""train_loop end to end on the tiny task: metrics, eval, checkpoints, resume across
parallel modes, SIGTERM (also during an eval), state mismatch, non-finite handling, config
errors."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import config as train_config
from attn_jax.train import loop, throughput
from attn_jax.train.metrics import read_metrics
from tests.train import tiny

NUM_STEPS = 8


def _config(**train):
  c = train_config.full_config()
  c.optim.update(dict(name='adamw', learning_rate=0.02, schedule='warmup_rsqrt', warmup_steps=2,
                      weight_decay=0.01))
  c.train.update(dict(num_steps=NUM_STEPS, log_every=2, eval_every=4, checkpoint_every=4,
                      best_metric='valid/loss', progress=False))
  c.train.update(train)
  return c


def _eval_batches():
  return [tiny.make_batch(99, i) for i in range(2)]


def _run(workdir, config, train_iter=None, **kw):
  init_params, loss_fn = tiny.make_task()
  return loop.train_loop(config, workdir, init_params=init_params, loss_fn=loss_fn,
                         train_iter=train_iter or tiny.BatchIterator(seed=3),
                         eval_iters={'valid': _eval_batches}, **kw)


def _by_step(workdir, key):
  return {r['step']: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  hook_calls = []

  def hook(state, step):
    hook_calls.append(step)
    return {'hook/param_step': float(state.step)}

  result = _run(workdir, _config(), eval_hooks=[hook])
  return workdir, result, hook_calls


def test_loop_writes_metrics_evaluates_and_checkpoints(reference):
  workdir, result, hook_calls = reference
  assert result.step == NUM_STEPS and result.start_step == 0 and not result.preempted
  train_loss = _by_step(workdir, 'train/loss')
  assert sorted(train_loss) == [2, 4, 6, 8] and train_loss[8] < train_loss[2]
  assert sorted(_by_step(workdir, 'valid/loss')) == [4, 8]
  assert sorted(_by_step(workdir, 'train/learning_rate')) == [2, 4, 6, 8]
  assert _by_step(workdir, 'hook/param_step') == {4: 4.0, 8: 8.0} and hook_calls == [4, 8]
  assert set(result.last_eval) >= {'valid/loss', 'valid/accuracy', 'valid/perplexity'}
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == [4, 8]
  assert (workdir / 'tensorboard').is_dir()
  # Already finished: a second call restores step 8 and trains nothing.
  again = _run(workdir, _config())
  assert again.start_step == NUM_STEPS and again.step == NUM_STEPS


def test_resume_across_parallel_modes_matches_reference(reference, tmp_path):
  ref_dir = reference[0]
  sharded = _config(num_steps=4)
  sharded.parallel.mode = 'sharded'
  sharded.parallel.mesh.update({'data': 2, 'fsdp': 2, 'tensor': 2})
  first = _run(tmp_path, sharded)
  assert first.step == 4
  pmap = _config()
  pmap.parallel.mode = 'pmap'
  second = _run(tmp_path, pmap, train_iter=tiny.BatchIterator(seed=3))
  assert second.start_step == 4 and second.step == NUM_STEPS
  for key in ('train/loss', 'valid/loss'):
    want, got = _by_step(ref_dir, key), _by_step(tmp_path, key)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-5)


class _SigtermAt(tiny.BatchIterator):

  def __next__(self):
    if self.index == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_saves_checkpoint_and_stops(tmp_path):
  result = _run(tmp_path, _config(), train_iter=_SigtermAt(seed=3))
  assert result.preempted and result.step == 3
  assert (tmp_path / 'checkpoints' / '3').is_dir()


def _scalar_task():
  def loss_fn(params, batch, rng, train):
    loss = jnp.sum(batch['scale'] * params['w'] ** 2)
    return loss, {'loss': (loss, jnp.float32(1.0))}
  return (lambda rng: {'w': jnp.ones((2, 2))}), loss_fn


def _scalar_run(tmp_path, scales, nonfinite):
  init_params, loss_fn = _scalar_task()
  config = _config(nonfinite=nonfinite, eval_every=0, checkpoint_every=0, best_metric='',
                   log_every=1, tensorboard=False)
  batches = iter([{'scale': np.float32(s)} for s in scales])
  return loop.train_loop(config, tmp_path, init_params=init_params, loss_fn=loss_fn,
                         train_iter=batches)


def test_sigterm_during_eval_checkpoints_at_once_and_resume_evaluates(tmp_path):
  """A SIGTERM while an eval hook runs (as a long decode would) stops the eval at once: the
  step is checkpointed and the loop returns; the re-run does that eval before training on."""
  signalled, finished = [], []

  def slow_hook(state, step):
    if not signalled:
      signalled.append(step)
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 30  # Longer than a scheduler's grace period.
      while time.time() < deadline:
        time.sleep(0.01)
    finished.append(step)
    return {'hook/step': float(step)}

  init_params, loss_fn = _scalar_task()
  config = _config(num_steps=4, eval_every=2, checkpoint_every=2, best_metric='',
                   log_every=1, tensorboard=False)
  run = lambda: loop.train_loop(  # noqa: E731
      config, tmp_path, init_params=init_params, loss_fn=loss_fn,
      train_iter=iter([{'scale': np.float32(1.0)}] * 4), eval_hooks=[slow_hook])
  result = run()
  assert result.preempted and result.step == 2 and finished == []
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2']
  assert _by_step(tmp_path, 'hook/step') == {}  # The interrupted eval wrote nothing.
  again = run()
  assert again.start_step == 2 and again.step == 4 and finished == [2, 4]
  assert _by_step(tmp_path, 'hook/step') == {2: 2.0, 4: 4.0}


def test_nonfinite_raise_names_the_step(tmp_path):
  with pytest.raises(FloatingPointError, match='non-finite loss or gradient at step 2'):
    _scalar_run(tmp_path, [1.0, np.inf, 1.0, 1.0], 'raise')


def test_nonfinite_skip_continues_and_exhaustion_stops(tmp_path):
  result = _scalar_run(tmp_path, [1.0, np.nan, 1.0], 'skip')
  assert result.data_exhausted and result.step == 3
  assert _by_step(tmp_path, 'train/nonfinite') == {1: 0.0, 2: 1.0, 3: 0.0}
  assert (tmp_path / 'checkpoints' / '3').is_dir()  # Exhaustion still saves the progress.
  assert np.all(np.isfinite(result.state.params['w']))


def test_steps_per_second_leaves_out_eval_time(tmp_path):
  # Each eval sleeps 1 s; counted in the window after it, 2 steps would read <= 2 steps/s.
  init_params, loss_fn = _scalar_task()
  config = _config(num_steps=4, log_every=2, eval_every=2, checkpoint_every=0, best_metric='',
                   tensorboard=False)
  batches = iter([{'scale': np.float32(1.0)}] * 4)
  loop.train_loop(config, tmp_path, init_params=init_params, loss_fn=loss_fn,
                  train_iter=batches, eval_hooks=[lambda state, step: time.sleep(1.0) or {}])
  assert _by_step(tmp_path, 'train/steps_per_second')[4] > 4.0


def test_tokens_per_second_utilisation_and_a_profile_of_two_steps(tmp_path):
  batches = [tiny.make_batch(5, i) for i in range(NUM_STEPS)]
  config = _config(checkpoint_every=0, eval_every=0, best_metric='', tensorboard=False,
                   profile_steps=2, profile_skip=3)
  _run(tmp_path, config, train_iter=iter(batches), count_tokens=throughput.count_tokens)
  records = {r['step']: r for r in read_metrics(tmp_path) if 'train/loss' in r}
  for step in (2, 4, 6, 8):  # Same time window: tokens/s over steps/s is tokens per step.
    real = sum(np.count_nonzero(b['inputs']) + np.count_nonzero(b['targets'])
               for b in batches[step - 2:step])
    r = records[step]
    np.testing.assert_allclose(r['train/tokens_per_second'] / r['train/steps_per_second'],
                               real / 2, rtol=1e-6)
    assert 0.0 < r['train/flops_utilisation'] < 2.0
  traces = list((tmp_path / throughput.PROFILE_DIR).rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert list((tmp_path / throughput.PROFILE_DIR).rglob('*.trace.json.gz'))


def test_step_flops_is_xlas_count_of_the_step():
  n = 64
  x = jnp.ones((n, n), jnp.float32)
  flops = throughput.step_flops(jax.jit(lambda a, b: a @ b), x, x)
  assert flops == 2 * n ** 3  # One matmul: 2 n^3, nothing else.
  pmapped = jax.pmap(lambda a, b: a @ b)
  per_device = jnp.ones((jax.device_count(), n, n), jnp.float32)
  # A pmap's program is one device's share (plus a few flops of index arithmetic).
  np.testing.assert_allclose(
      throughput.step_flops(pmapped, per_device, per_device, per_device_program=True),
      2 * n ** 3 * jax.device_count(), rtol=1e-4)
  assert throughput.matmul_flops_per_second(size=128, reps=2) > 0


def _checksums(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_state_mismatch_is_refused_unless_restart_moves_the_run_aside(tmp_path):
  def wide_task(rng):
    return {'w': jnp.ones((3, 2))}

  config = _config(num_steps=2, eval_every=0, checkpoint_every=1, best_metric='',
                   log_every=1, tensorboard=False)
  batches = lambda: iter([{'scale': np.float32(1.0)}] * 2)  # noqa: E731
  init_params, loss_fn = _scalar_task()
  loop.train_loop(config, tmp_path, init_params=init_params, loss_fn=loss_fn,
                  train_iter=batches())
  before = _checksums(tmp_path)
  with pytest.raises(ckpt_lib.StateMismatchError, match=r'params.w \(2, 2\) float32 -> \(3, 2\)'):
    loop.train_loop(config, tmp_path, init_params=wide_task, loss_fn=loss_fn,
                    train_iter=batches())
  assert _checksums(tmp_path) == before
  config.train.on_mismatch = 'restart'
  started = []
  result = loop.train_loop(config, tmp_path, init_params=wide_task, loss_fn=loss_fn,
                           train_iter=batches(), on_start=started.append)
  assert result.start_step == 0 and result.step == 2 and started == [0]
  assert _checksums(tmp_path / 'replaced_1') == before  # The old run, whole, beside the new.
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2]
  assert result.state.params['w'].shape == (3, 2)
  # Every checkpoint damaged: nothing restores, so the metrics are not cut back to step 0 but
  # move aside with the run they describe.
  for step_dir in (tmp_path / 'checkpoints').iterdir():
    (step_dir / 'state' / '_METADATA').unlink()
  again = loop.train_loop(config, tmp_path, init_params=wide_task, loss_fn=loss_fn,
                          train_iter=batches())
  assert again.start_step == 0
  assert [r['step'] for r in read_metrics(tmp_path / 'replaced_2')] == [1, 2]
  assert sorted(p.name for p in (tmp_path / 'replaced_2' / 'checkpoints').iterdir()) == [
      'corrupt_1', 'corrupt_2']


@pytest.mark.parametrize('section,field,value,match', [
    ('train', 'num_steps', 0, r'config.train.num_steps=0 must be an int >= 1'),
    ('train', 'eval_every', -1, r'config.train.eval_every=-1'),
    ('train', 'nonfinite', 'warn', r"config.train.nonfinite='warn' is not one of"),
    ('train', 'on_mismatch', 'ignore', r"config.train.on_mismatch='ignore' is not one of"),
    ('parallel', 'mode', 'dp', r"config.parallel.mode='dp' is not one of"),
    ('optim', 'name', 'lion', r"config.optim.name='lion' is not one of"),
])
def test_bad_config_raises_before_training(tmp_path, section, field, value, match):
  config = _config()
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    _run(tmp_path, config)
  assert not (tmp_path / 'checkpoints').exists()
