"""Checkpoint save/restore, retention, corrupt-latest fallback, mismatch refusal, SIGTERM and
SIGKILL resume."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import state as state_lib
from attn_jax.train.metrics import read_metrics
from tests.train import loop_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(seed=0):
  tx = optax.adam(1e-3)
  init = lambda r: {'w': jax.random.normal(r, (3, 4)), 'b': jnp.zeros(4)}  # noqa: E731
  state = state_lib.init_state(init, tx, jax.random.PRNGKey(seed))
  state = state.replace(step=jnp.int32(7), opt_state=jax.tree_util.tree_map(
      lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3, state.opt_state))
  return state, jax.eval_shape(lambda: state)


@pytest.mark.parametrize('data_state', [{'index': 5, 'nested': {'a': [1, 2]}}, b'\x00\xffgrain'])
def test_roundtrip_state_and_iterator_state(tmp_path, data_state):
  state, abstract = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2)
  assert ck.restore(abstract) is None
  assert ck.save(7, state, data_state=data_state)
  ck.wait()
  got = ck.restore(abstract)
  assert got.step == 7 and got.data_state == data_state
  chex.assert_trees_all_equal(got.state, state)
  assert not ck.save(7, state)  # Already saved: no error, no second copy.
  ck.close()


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
  """`--workdir runs/x` must work: orbax itself rejects relative paths."""
  monkeypatch.chdir(tmp_path)
  state, abstract = _state()
  ck = ckpt_lib.Checkpointer('runs/x/checkpoints')
  assert ck.directory.is_absolute()
  assert ck.save(1, state)
  ck.wait()
  assert ck.restore(abstract).step == 1
  assert (tmp_path / 'runs/x/checkpoints/1').is_dir()
  ck.close()


def test_keep_last_n_and_best(tmp_path):
  state, _ = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, best_metric='valid/loss', best_mode='min')
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None), (6, 4.0)]:
    ck.save(step, state, metrics=None if loss is None else {'valid/loss': loss})
  ck.wait()
  assert ck.all_steps() == [2, 5, 6] and ck.best_step() == 2
  ck.close()
  with pytest.raises(ValueError, match="best_mode='low'"):
    ckpt_lib.Checkpointer(tmp_path, best_mode='low')
  with pytest.raises(ValueError, match='max_to_keep=0'):
    ckpt_lib.Checkpointer(tmp_path, max_to_keep=0)


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
  state, abstract = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  ck.save(1, state, data_state={'index': 1})
  ck.save(2, state.replace(step=jnp.int32(8)), data_state={'index': 2})
  ck.close()
  files = [p for p in (tmp_path / '2').rglob('*') if p.is_file()]
  assert files
  for p in files:  # Truncate every file of the latest step, as a crash mid-copy would.
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
  with caplog.at_level(logging.WARNING):
    got = ck.restore(abstract)
  assert got.step == 1 and got.data_state == {'index': 1}
  assert 'checkpoint step 2' in caplog.text and 'falling back' in caplog.text
  assert (tmp_path / 'corrupt_2').is_dir() and ck.all_steps() == [1]
  with pytest.raises(ValueError, match=r'no checkpoint for step 9 .* have \[1\]'):
    ck.restore(abstract, step=9)
  ck.close()


def _truncate_array_data(step_dir):
  """Halves the OCDBT data files the state's arrays are read from (`state/d/`); _METADATA,
  _sharding and the manifests stay whole, so the step still looks restorable."""
  data = [p for p in (step_dir / 'state' / 'd').iterdir() if p.is_file()]
  assert data
  for p in data:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_truncated_array_data_falls_back_to_previous(tmp_path):
  state, abstract = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  ck.save(1, state, data_state={'index': 1})
  ck.save(2, state.replace(step=jnp.int32(8)), data_state={'index': 2})
  ck.close()
  _truncate_array_data(tmp_path / '2')
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3)
  got = ck.restore(abstract)
  ck.close()
  assert got.step == 1 and got.data_state == {'index': 1}
  chex.assert_trees_all_equal(got.state, state)
  assert (tmp_path / 'corrupt_2').is_dir() and ck.all_steps() == [1]


def _checksums(root):
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_state_mismatch_is_refused_and_changes_nothing(tmp_path):
  state, _ = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  ck.save(1, state)
  ck.save(2, state)
  ck.close()
  before = _checksums(tmp_path)
  # One parameter wider and one more: 6 arrays differ (each with its two Adam moments).
  init = lambda r: {'w': jnp.zeros((3, 5)), 'b': jnp.zeros(4), 'c': jnp.zeros(2)}  # noqa: E731
  other = jax.eval_shape(lambda: state_lib.init_state(init, optax.adam(1e-3),
                                                      jax.random.PRNGKey(0)))
  ck = ckpt_lib.Checkpointer(tmp_path)
  with pytest.raises(ckpt_lib.StateMismatchError) as e:
    ck.restore(other)
  with pytest.raises(ckpt_lib.StateMismatchError):
    ck.restore(other, step=1)
  ck.close()
  message = str(e.value)
  assert e.value.step == 2 and len(e.value.differences) == 6, e.value.differences
  assert 'step 2' in message and 'params.w (3, 4) float32 -> (3, 5) float32' in message
  assert 'params.c missing' in message and "on_mismatch='restart'" in message
  assert '\n' not in message  # One line for the command line.
  assert _checksums(tmp_path) == before  # Nothing quarantined, nothing rewritten.


def test_sigterm_sets_flag_and_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionHandler() as p:
    assert not p.reached(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.reached(1)
  assert signal.getsignal(signal.SIGTERM) == before


def test_data_state_codec():
  for s in [None, {'a': 1}, b'abc', 'text']:
    assert ckpt_lib.decode_data_state(ckpt_lib.encode_data_state(s)) == s
  with pytest.raises(ValueError, match='must be a dict, bytes or str'):
    ckpt_lib.encode_data_state(3)


def _run_worker(workdir, kill_at, cache_dir):
  # A compilation cache shared by the two runs only saves the restart's compile time.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run(
      [sys.executable, '-m', 'tests.train.loop_worker', str(workdir), str(kill_at)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


@pytest.mark.slow
def test_sigkill_during_async_write_and_truncated_latest_resume_exactly(tmp_path):
  """Killed while the checkpoint of step 6 is being written (2 and 4 committed), then step 4's
  array data is cut short: the restart ignores the partial step, moves 4 aside, resumes from
  2 without asyncio teardown errors, and ends bitwise where an uninterrupted run does."""
  killed, ckpts = tmp_path / 'killed', tmp_path / 'killed' / 'checkpoints'
  first = _run_worker(killed, loop_worker.KILL_AT, tmp_path / 'jax_cache')
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  every = loop_worker.CHECKPOINT_EVERY
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == [str(every),
                                                                         str(2 * every)]
  assert any(p.name.startswith(f'{loop_worker.KILL_AT}.') for p in ckpts.iterdir())  # Partial.
  assert max(_losses(killed)) >= loop_worker.KILL_AT  # Logged before the kill; cut back later.
  _truncate_array_data(ckpts / str(2 * every))
  second = _run_worker(killed, -1, tmp_path / 'jax_cache')
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'start_step={every}' in second.stdout, second.stdout
  assert (ckpts / f'corrupt_{2 * every}').is_dir()
  for noise in ('Event loop is closed', 'never retrieved', 'Exception ignored'):
    assert noise not in second.stderr, second.stderr[-3000:]
  # The uninterrupted reference runs here, in-process, with the worker's exact config.
  reference = tmp_path / 'reference'
  loop_worker.run(reference)
  want, got = _losses(reference), _losses(killed)
  assert sorted(want) == list(range(1, loop_worker.NUM_STEPS + 1))
  assert got == want  # Bitwise: same batches, same dropout masks, same optimizer state.


def test_grain_iterator_state_roundtrip(tmp_path):
  import grain

  ds = (grain.MapDataset.source(list(range(40))).shuffle(seed=1).batch(4)
        .map(lambda x: {'inputs': np.asarray(x)}).to_iter_dataset())
  it = iter(ds)
  next(it), next(it)
  state, abstract = _state()
  ck = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  ck.save(2, state, data_state=it.get_state())
  want = next(it)['inputs']
  restored = ck.restore(abstract)
  ck.close()
  fresh = iter(ds)
  fresh.set_state(restored.data_state)
  np.testing.assert_array_equal(next(fresh)['inputs'], want)
