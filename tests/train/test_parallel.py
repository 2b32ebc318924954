"""pmap and mesh-sharded steps equal the single-device step; two processes equal one.

Tolerances: float32 CPU, rtol 1e-5 (psum/all-reduce order differs from one device's sum).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attn_jax.train import config as train_config
from attn_jax.train import optim, parallel
from attn_jax.train import state as state_lib
from attn_jax.train import step as step_lib
from attn_jax.train.metrics import read_metrics
from tests.train import tiny

STEPS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


OPTIM = dict(name='adamw', schedule='warmup_constant', warmup_steps=2, learning_rate=0.05,
             weight_decay=0.01, clip_grad_norm=1.0)


def make_setup():
  """(init_params, tx, step_fn): AdamW + clipping, no dropout (so devices see equal math)."""
  c = train_config.default_optim()
  c.update(OPTIM)
  tx, sched = optim.make_optimizer(c)
  init_params, loss_fn = tiny.make_task()
  return init_params, tx, step_lib.make_train_step(loss_fn, tx, sched)


def loop_config(num_steps):
  """train_loop config with `make_setup`'s optimizer, sharded over all devices (mp_worker)."""
  c = train_config.full_config()
  c.optim.update(OPTIM)
  c.train.update(dict(num_steps=num_steps, log_every=1, eval_every=0, checkpoint_every=0,
                      progress=False, tensorboard=False))
  c.parallel.mode = 'sharded'
  return c


def _loss(m):
  m = parallel.to_host(m)
  return float(np.sum(m['loss'][0]) / np.sum(m['loss'][1]))


@pytest.fixture(scope='module')
def reference():
  """Losses and final params of the plain single-device jit step on the global batches."""
  init_params, tx, step_fn = make_setup()
  state = state_lib.create_train_state(init_params, tx, jax.random.PRNGKey(0))
  step = jax.jit(step_fn)
  losses = []
  for i in range(STEPS):
    state, m = step(state, tiny.make_batch(0, i))
    losses.append(_loss(m))
  return losses, jax.device_get(state.params)


def test_pmap_matches_single_device(reference):
  init_params, tx, step_fn = make_setup()
  state = parallel.replicate(state_lib.create_train_state(init_params, tx,
                                                          jax.random.PRNGKey(0)))
  step = parallel.pmap_train_step(chex.assert_max_traces(step_fn, n=1))
  losses = []
  for i in range(STEPS):
    state, m = step(state, parallel.shard_batch(tiny.make_batch(0, i)))
    losses.append(_loss(parallel.unreplicate(m)))
  np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
  chex.assert_trees_all_close(parallel.unreplicate(state).params, reference[1], rtol=1e-4,
                              atol=1e-6)


def test_sharded_matches_single_device_and_shards_params(reference):
  init_params, tx, step_fn = make_setup()
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rng = jax.random.PRNGKey(0)
  shardings = parallel.state_shardings(state_lib.abstract_state(init_params, tx, rng),
                                       state_lib.abstract_params(init_params, rng), mesh)
  state = state_lib.create_train_state(init_params, tx, rng, shardings=shardings)
  assert state.params['hidden']['kernel'].sharding.spec == P('fsdp', 'tensor')
  assert state.params['embedding'].sharding.spec == P('tensor', 'fsdp')
  moments = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if jax.tree_util.keystr(p).endswith("['hidden']['kernel']")}
  assert list(moments.values()) == [P('fsdp', 'tensor')] * 2, moments  # Adam mu and nu.
  assert state.step.sharding.spec == P()
  step = parallel.sharded_train_step(step_fn, mesh, shardings)
  losses = []
  for i in range(STEPS):
    state, m = step(state, parallel.global_batch(tiny.make_batch(0, i), mesh))
    losses.append(_loss(m))
  np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(state.params), reference[1], rtol=1e-4, atol=1e-6)
  assert step.jitted._cache_size() == 1  # No recompilation after the first step.


def test_mesh_and_batch_errors():
  with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
    parallel.make_mesh({'model': 2})
  with pytest.raises(ValueError, match='needs 6 devices, have 8'):
    parallel.make_mesh({'data': 3, 'fsdp': 2})
  with pytest.raises(ValueError, match='does not divide 8 devices'):
    parallel.make_mesh({'data': -1, 'fsdp': 3})
  with pytest.raises(ValueError, match=r"batch\['x'\] shape \(6,\): batch size not divisible"):
    parallel.shard_batch({'x': np.zeros(6)})
  with pytest.raises(ValueError, match="mesh axis 'model' not in"):
    parallel.param_shardings({}, parallel.make_mesh({}), [('embed', 'model')])


def test_indivisible_dims_stay_replicated():
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 8})
  boxed = {'w': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 16), np.float32),
                                        ('embed', 'mlp'))}
  s = parallel.param_shardings(boxed, mesh)
  assert s['w'].spec == P(None, 'tensor')  # 6 % 8 != 0: embed not split; mlp -> tensor (size 1).


def test_initialize_distributed_is_noop_without_coordinator(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  assert parallel.initialize_distributed(ml_collections.ConfigDict(
      {'coordinator_address': ''})) is False
  assert parallel.is_primary()


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(reference, tmp_path):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2')
  procs = [
      subprocess.Popen([sys.executable, '-m', 'tests.train.mp_worker', str(tmp_path), str(STEPS)],
                       env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
      for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=150)[0].decode())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  for i in range(2):
    done = json.loads((tmp_path / f'done_{i}.json').read_text())
    assert done == {'first_step': STEPS - 1, 'start_step': STEPS - 1, 'step': STEPS,
                    'iterator_index': STEPS, 'process_count': 2, 'device_count': 4}
  records = [r for r in read_metrics(tmp_path) if 'train/loss' in r]
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))  # One writer, no repeats.
  losses = {r['step']: r['train/loss'] for r in records}
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], reference[0], rtol=1e-5)

def test_host_helpers():
  assert parallel.local_batch_size(8) == 8  # One process here.
  with pytest.raises(ValueError, match='process_id=2 must be in'):
    parallel.initialize_distributed(ml_collections.ConfigDict(
        {'coordinator_address': '127.0.0.1:1', 'num_processes': 2, 'process_id': 2}))
  mesh = parallel.make_mesh({'data': 4, 'fsdp': 2})
  with pytest.raises(ValueError, match=r"batch\['x'\] shape \(6, 2\): global batch not divisible"):
    parallel.global_batch({'x': np.zeros((6, 2))}, mesh)
  got = parallel.global_batch({'x': np.arange(16.0).reshape(8, 2), 'n': np.arange(8)}, mesh)
  # Rows over the batch axes, lengths over `sequence` (of size 1 here): per leaf, by its rank.
  assert got['x'].sharding.spec == P(('data', 'fsdp'), 'sequence')
  assert got['n'].sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_array_equal(parallel.to_host(got)['x'], np.arange(16.0).reshape(8, 2))
