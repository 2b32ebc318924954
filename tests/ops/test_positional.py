import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops


def test_sinusoidal_matches_paper_formula():
  pos, dim = np.arange(7), 10
  got = ops.sinusoidal(pos, dim)
  for p in pos:
    for i in range(dim // 2):
      angle = p / 10_000 ** (2 * i / dim)
      np.testing.assert_allclose(got[p, 2 * i], math.sin(angle), atol=1e-5)
      np.testing.assert_allclose(got[p, 2 * i + 1], math.cos(angle), atol=1e-5)
  # A different max wavelength changes the frequencies.
  assert not np.allclose(ops.sinusoidal(pos, dim, max_wavelength=100.0), got)
  with pytest.raises(ValueError, match='even'):
    ops.sinusoidal(pos, 5)


def test_add_sinusoidal_add_and_concat():
  x = jnp.ones((2, 5, 6))
  np.testing.assert_allclose(ops.add_sinusoidal(x), np.broadcast_to(
      1.0 + ops.sinusoidal(jnp.arange(5), 6)[None], x.shape))
  cat = ops.add_sinusoidal(x, mode='concat', dim=4)
  assert cat.shape == (2, 5, 10)
  np.testing.assert_allclose(cat[1, :, 6:], ops.sinusoidal(jnp.arange(5), 4))
  packed = jnp.array([[0, 1, 2, 0, 1]] * 2)  # positions restart per segment
  np.testing.assert_allclose(ops.add_sinusoidal(x, packed)[:, 3], ops.add_sinusoidal(x)[:, 0])
  with pytest.raises(ValueError, match='dim'):
    ops.add_sinusoidal(x, mode='concat')


def test_learned_positional_init_and_lookup():
  table = ops.learned_positional_init('normal', stddev=0.02)(jax.random.key(0), (16, 8))
  assert table.shape == (16, 8) and 0.01 < float(jnp.std(table)) < 0.03
  sin_table = ops.learned_positional_init('sinusoidal')(jax.random.key(0), (16, 8))
  np.testing.assert_allclose(sin_table, ops.sinusoidal(jnp.arange(16), 8))
  np.testing.assert_allclose(ops.learned_positional(table, jnp.array([[3, 0]])),
                             table[jnp.array([[3, 0]])])
  with pytest.raises(ValueError, match='past the learned table'):
    ops.learned_positional(table, jnp.arange(17))


def _rope_reference(x, positions, base):
  """Rotation of complex pairs (x_i, x_{i+d/2}) by position * base^(-2i/d)."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  freq = base ** (-2 * np.arange(half) / x.shape[-1])
  z = z * np.exp(1j * np.asarray(positions)[None, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_against_complex_rotation_and_relative_property():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
  pos = np.arange(6) + 3
  np.testing.assert_allclose(ops.rope(x, pos, base=100.0), _rope_reference(x, pos, 100.0),
                             atol=1e-5)
  # <rope(q, m), rope(k, n)> depends only on m - n.
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  def score(m, n):
    return float(jnp.sum(ops.rope(q, jnp.array([m])) * ops.rope(k, jnp.array([n]))))
  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-4)
  # Norm preserving; partial rotary leaves the tail untouched.
  np.testing.assert_allclose(jnp.linalg.norm(ops.rope(x), axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  partial = ops.rope(x, rotary_dim=4)
  np.testing.assert_array_equal(partial[..., 4:], x[..., 4:])
  bf16 = ops.rope(x.astype(jnp.bfloat16), pos)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf16.astype(jnp.float32), _rope_reference(x, pos, 10_000.0),
                             atol=5e-2)
  with pytest.raises(ValueError, match='rotary_dim'):
    ops.rope(x, rotary_dim=3)


def test_alibi_slopes_and_bias():
  np.testing.assert_allclose(ops.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  # 6 heads: the 4-head slopes, then the odd-indexed... every other of the 8-head slopes.
  want6 = [2.0 ** (-8 * (i + 1) / 4) for i in range(4)] + [2.0 ** (-8 * (i + 1) / 8)
                                                          for i in (0, 2)]
  np.testing.assert_allclose(ops.alibi_slopes(6), want6)
  bias = ops.alibi_bias(ops.alibi_slopes(2), jnp.arange(3), jnp.arange(4))
  assert bias.shape == (2, 3, 4)
  np.testing.assert_allclose(bias[0], -0.0625 * np.abs(np.arange(3)[:, None] - np.arange(4)))


def _t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's bucketing, written out scalar by scalar."""
  n = -rel
  ret = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_buckets_against_scalar_reference(bidirectional):
  rel = np.arange(-300, 301)
  got = ops.relative_position_buckets(jnp.asarray(rel), bidirectional=bidirectional,
                                      num_buckets=32, max_distance=128)
  want = [_t5_bucket(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)
  assert int(got.max()) < 32


def test_relative_position_bias_lookup_and_grad():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), jnp.float32)
  fn = functools.partial(ops.relative_position_bias, bidirectional=True, max_distance=16)
  bias = fn(table, jnp.arange(4), jnp.arange(5))
  assert bias.shape == (3, 4, 5)
  buckets = ops.relative_position_buckets(jnp.arange(5)[None] - jnp.arange(4)[:, None],
                                          num_buckets=8, max_distance=16)
  np.testing.assert_allclose(bias[2], table[buckets, 2])
  grad = jax.grad(lambda t: fn(t, jnp.arange(4), jnp.arange(5)).sum())(table)
  counts = np.bincount(np.asarray(buckets).ravel(), minlength=8)
  np.testing.assert_allclose(grad, np.repeat(counts[:, None], 3, axis=1))
