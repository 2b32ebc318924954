"""ops.map_valid_chunks: real rows computed exactly once in input order, chunks of padding
skipped in the forward and backward pass, gradients equal to the dense function's. float32;
tolerance 1e-6 (values) and 1e-5 (gradients): the same row-wise math, different row blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops


def _rows_and_valid(n=22, d=5, seed=0):
  rng = np.random.default_rng(seed)
  valid = rng.random(n) < 0.45
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  return x, jnp.asarray(valid)


def _f(w, x):
  return jnp.tanh(x @ w)


def _skipping(w):
  # The active flag rides along as a column, so the test sees which chunks ran.
  def run_chunk(active, rows):
    return jax.lax.cond(active, lambda r: (_f(w, r), jnp.ones(r.shape[0])),
                        lambda r: (jnp.zeros((r.shape[0], w.shape[1])), jnp.zeros(r.shape[0])),
                        rows)
  return run_chunk


def test_valid_first_order_is_stable():
  valid = jnp.array([False, True, False, True, True, False])
  np.testing.assert_array_equal(ops.valid_first_order(valid), [1, 3, 4, 0, 2, 5])


@pytest.mark.parametrize('chunk', [1, 4, 5, 22, 40])
def test_real_rows_equal_the_dense_function_and_only_chunks_with_real_rows_run(chunk):
  x, valid = _rows_and_valid()
  w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  out, ran = ops.map_valid_chunks(_skipping(w), x, valid, chunk=chunk)
  dense = _f(w, x)
  np.testing.assert_allclose(out[valid], dense[valid], atol=1e-6)
  assert bool(jnp.all(ran[valid] == 1))
  # Real rows sort first: exactly ceil(real / chunk) chunks run, so of the padding rows
  # only those sharing the last active chunk are computed; the rest are zeros.
  real = int(valid.sum())
  computed_padding = -(-real // chunk) * chunk - real
  assert int(ran.sum()) == min(real + computed_padding, x.shape[0])
  skipped = (ran == 0)
  np.testing.assert_array_equal(out[skipped], 0.0)
  np.testing.assert_allclose(out[~skipped], dense[~skipped], atol=1e-6)


def test_gradients_equal_the_dense_functions_on_the_real_rows():
  x, valid = _rows_and_valid(seed=2)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(5, 3)), jnp.float32)
  mask = valid[:, None].astype(jnp.float32)

  def chunked(w, x):
    out, _ = ops.map_valid_chunks(_skipping(w), x, valid, chunk=4)
    return jnp.sum(jnp.sin(out) * mask)

  def dense(w, x):
    return jnp.sum(jnp.sin(_f(w, x)) * mask)

  got = jax.grad(chunked, argnums=(0, 1))(w, x)
  want = jax.grad(dense, argnums=(0, 1))(w, x)
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_pytree_rows_and_all_padding():
  x, _ = _rows_and_valid(n=6)
  labels = jnp.arange(6)
  out = ops.map_valid_chunks(
      lambda active, rows: jax.lax.cond(active, lambda r: r[1] * 2,
                                        lambda r: jnp.zeros_like(r[1]), rows),
      (x, labels), jnp.zeros(6, bool), chunk=4)
  np.testing.assert_array_equal(out, 0)
  out = ops.map_valid_chunks(lambda active, rows: rows[1] * 2, (x, labels), jnp.ones(6, bool),
                             chunk=4)
  np.testing.assert_array_equal(out, 2 * labels)


def test_bad_input_is_named():
  x, valid = _rows_and_valid(n=6)
  with pytest.raises(ValueError, match='chunk must be positive'):
    ops.map_valid_chunks(lambda a, r: r, x, valid, chunk=0)
  with pytest.raises(ValueError, match='every rows leaf'):
    ops.map_valid_chunks(lambda a, r: r, x[:5], valid, chunk=2)
  with pytest.raises(ValueError, match='valid must be'):
    ops.valid_first_order(valid[None])
