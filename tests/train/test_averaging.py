"""Checkpoint averaging: the mean of the last N (or given) steps' params, exact to float32
rounding; the request errors come before any read."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.train import averaging
from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import state as state_lib

# Sums in float64, one rounding to float32: the mean is within 1 float32 ulp (~1.2e-7 relative).
RTOL = 1e-6


def _init(r):
  return {'dense': {'kernel': jax.random.normal(r, (3, 4))}, 'bias': jnp.zeros(4)}


def _state(seed):
  state = state_lib.init_state(_init, optax.adam(1e-3), jax.random.PRNGKey(seed))
  # Params of different magnitudes, so a wrong weighting or a missed step shows.
  return state.replace(step=jnp.int32(seed), params=jax.tree_util.tree_map(
      lambda x: x * (seed + 1) + seed / 3, state.params))


@pytest.fixture
def saved(tmp_path):
  """Steps 10, 20, 30, 40 (with adam states) in `tmp_path`, and their params as numpy."""
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=4, async_save=False)
  params = {}
  for step in (10, 20, 30, 40):
    state = _state(step)
    ck.save(step, state)
    params[step] = jax.tree_util.tree_map(np.asarray, state.params)
  ck.close()
  return tmp_path, params, jax.eval_shape(lambda: _state(0))


def _mean(trees):
  return jax.tree_util.tree_map(
      lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0), *trees)


def _assert_close(got, want):
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=0),
                         got, want)


def test_mean_of_last_n(saved, caplog):
  directory, params, abstract = saved
  with caplog.at_level(logging.INFO):
    got, steps = averaging.average_checkpoints(directory, abstract, last_n=3)
  assert steps == [20, 30, 40]
  assert 'steps [20, 30, 40]' in caplog.text
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(abstract.params)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32
             for x in jax.tree_util.tree_leaves(got))
  _assert_close(got, _mean([params[s] for s in steps]))


def test_last_one_is_the_latest_and_explicit_steps(saved):
  directory, params, abstract = saved
  ck = ckpt_lib.Checkpointer(directory, async_save=False)
  latest, steps = averaging.average_checkpoints(ck, abstract, 1)
  assert steps == [40]
  jax.tree_util.tree_map(np.testing.assert_array_equal, latest, params[40])
  got, steps = averaging.average_checkpoints(ck, abstract, steps=[30, 10])
  assert steps == [10, 30]
  _assert_close(got, _mean([params[10], params[30]]))
  ck.close()


def test_last_n_counts_a_kept_best_checkpoint(tmp_path):
  """'Last N' are the highest steps on disk, which include an old best one past the latest."""
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, best_metric='loss', async_save=False)
  for step, loss in [(1, 0.5), (2, 2.0), (3, 3.0), (4, 4.0)]:
    ck.save(step, _state(step), metrics={'loss': loss})
  assert ck.all_steps() == [1, 3, 4]
  abstract = jax.eval_shape(lambda: _state(0))
  assert averaging.average_checkpoints(ck, abstract, 2)[1] == [3, 4]
  assert averaging.average_checkpoints(ck, abstract, 3)[1] == [1, 3, 4]
  ck.close()


def test_request_errors_before_any_read(saved, monkeypatch):
  directory, _, abstract = saved

  def no_read(*args, **kwargs):
    raise AssertionError('read an array before refusing the request')

  monkeypatch.setattr(averaging, '_host_mean', no_read)
  with pytest.raises(ValueError, match='last_n=0 must be an int >= 1'):
    averaging.average_checkpoints(directory, abstract, 0)
  with pytest.raises(ValueError, match=(
      r'last 5 checkpoints: .* keeps 4 \(steps \[10, 20, 30, 40\]\); '
      r'raise config.train.keep_checkpoints')):
    averaging.average_checkpoints(directory, abstract, 5)
  with pytest.raises(ValueError, match=r'no checkpoint for steps \[25\] .* have \[10, 20'):
    averaging.average_checkpoints(directory, abstract, steps=[20, 25])
  with pytest.raises(ValueError, match='exactly one of last_n and steps'):
    averaging.average_checkpoints(directory, abstract, 2, steps=[20])
  other = jax.eval_shape(lambda: state_lib.init_state(
      lambda r: {'dense': {'kernel': jnp.zeros((3, 5))}, 'bias': jnp.zeros(4)},
      optax.adam(1e-3), jax.random.PRNGKey(0)))
  # orbax's partial restore would return the (3, 4) kernel as it is: refused from metadata.
  with pytest.raises(ckpt_lib.StateMismatchError,
                     match=r'params.dense.kernel \(3, 4\) float32 -> \(3, 5\) float32'):
    averaging.average_checkpoints(directory, other, 2)
