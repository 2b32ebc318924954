import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attn_jax import ops

RNG = np.random.default_rng(0)


def _qk(b=2, t=3, s=5, h=2, dq=4, dk=4):
  return (jnp.asarray(RNG.normal(size=(b, t, h, dq)), jnp.float32),
          jnp.asarray(RNG.normal(size=(b, s, h, dk)), jnp.float32))


def test_dot_and_scaled_dot_against_loops():
  q, k = _qk()
  got = ops.dot_scores(q, k)
  assert got.shape == (2, 2, 3, 5) and got.dtype == jnp.float32
  want = np.zeros(got.shape)
  for b in range(2):
    for h in range(2):
      for i in range(3):
        for j in range(5):
          want[b, h, i, j] = np.dot(q[b, i, h], k[b, j, h])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ops.scaled_dot_scores(q, k), want / 2.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ops.scaled_dot_scores(q, k, scale=0.3), want * 0.3, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('per_head', [False, True])
def test_general_scores_against_loops(per_head):
  q, k = _qk(dq=4, dk=6)
  w = jnp.asarray(RNG.normal(size=(2, 4, 6) if per_head else (4, 6)), jnp.float32)
  got = ops.general_scores(q, k, w)
  want = np.zeros(got.shape)
  for b in range(2):
    for h in range(2):
      wh = np.asarray(w[h] if per_head else w)
      for i in range(3):
        for j in range(5):
          want[b, h, i, j] = np.asarray(q[b, i, h]) @ wh @ np.asarray(k[b, j, h])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  check_grads(lambda q, k, w: ops.general_scores(q, k, w), (q, k, w), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)


def test_additive_scores_against_loops_and_grads():
  q, k = _qk(b=1, t=2, s=3, h=1, dq=4, dk=5)
  w_q = jnp.asarray(RNG.normal(size=(4, 7)), jnp.float32)
  w_k = jnp.asarray(RNG.normal(size=(5, 7)), jnp.float32)
  v = jnp.asarray(RNG.normal(size=(7,)), jnp.float32)
  got = ops.additive_scores(q, k, w_q, w_k, v)
  assert got.shape == (1, 1, 2, 3)
  for i in range(2):
    for j in range(3):
      want = np.asarray(v) @ np.tanh(np.asarray(q[0, i, 0]) @ w_q + np.asarray(k[0, j, 0]) @ w_k)
      np.testing.assert_allclose(got[0, 0, i, j], want, rtol=1e-5, atol=1e-5)
  check_grads(ops.additive_scores, (q, k, w_q, w_k, v), order=1, modes=['rev'], atol=1e-2,
              rtol=1e-2)


def test_scores_bad_shapes():
  q, k = _qk()
  with pytest.raises(ValueError, match='head_dim'):
    ops.dot_scores(q, k[..., :3])
  with pytest.raises(ValueError, match=r'w must be \[4, 4\]'):
    ops.general_scores(q, k, jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match='additive_scores'):
    ops.additive_scores(q, k, jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.zeros(3))


def test_scores_jit_vmap():
  q, k = _qk()
  batched = jax.vmap(ops.scaled_dot_scores)(q[:, None], k[:, None])[:, 0]
  np.testing.assert_allclose(jax.jit(ops.scaled_dot_scores)(q, k), batched, rtol=1e-6)
