"""2-D positions against formulas written out here, RoPE-2D's relative property, patches and
attention rollout against naive loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops


def test_grid_positions_are_rows_then_columns():
  np.testing.assert_array_equal(ops.grid_positions(2, 3),
                                [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
  with pytest.raises(ValueError, match='0 x 3'):
    ops.grid_positions(0, 3)


def test_sinusoidal_2d_rows_in_the_first_half_columns_in_the_second():
  positions, dim = np.array([[0, 0], [2, 5], [7, 1]]), 12
  got = np.asarray(ops.sinusoidal_2d(positions, dim, max_wavelength=50.0))
  half = dim // 2
  for n, (row, col) in enumerate(positions):
    for offset, p in ((0, row), (half, col)):
      for i in range(half // 2):
        angle = p / 50.0 ** (2 * i / half)
        np.testing.assert_allclose(got[n, offset + 2 * i], math.sin(angle), atol=1e-5)
        np.testing.assert_allclose(got[n, offset + 2 * i + 1], math.cos(angle), atol=1e-5)
  with pytest.raises(ValueError, match='divisible by 4.*10'):
    ops.sinusoidal_2d(positions, 10)
  with pytest.raises(ValueError, match=r'\[\.\.\., 2\].*\(3,\)'):
    ops.sinusoidal_2d(np.arange(3), 8)


def _rope_2d_reference(x, positions, base):
  """Each half of a head is a set of complex pairs (x_k, x_{k + d/4}) of that half, rotated by
  the row (first half) or column (second half) times base^(-4k/d)."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  out = []
  for h, coordinate in ((x[..., :d // 2], 0), (x[..., d // 2:], 1)):
    q = d // 4
    z = h[..., :q] + 1j * h[..., q:]
    freq = base ** (-2 * np.arange(q) / (d // 2))
    angle = np.asarray(positions)[..., coordinate][..., None, None] * freq  # [b, l, 1, q]
    z = z * np.exp(1j * angle)
    out += [z.real, z.imag]
  return np.concatenate([out[0], out[1], out[2], out[3]], axis=-1)


def test_rope_2d_against_complex_rotation_and_origin_is_identity():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  positions = jax.random.randint(jax.random.key(1), (2, 5, 2), 0, 6)
  np.testing.assert_allclose(ops.rope_2d(x, positions, base=100.0),
                             _rope_2d_reference(x, positions, 100.0), atol=1e-5)
  shared = positions[0]  # [length, 2] broadcasts over the batch
  np.testing.assert_allclose(ops.rope_2d(x, shared), _rope_2d_reference(x, shared[None], 100.0),
                             atol=1e-5)
  np.testing.assert_array_equal(ops.rope_2d(x, jnp.zeros((5, 2), jnp.int32)), x)


def test_rope_2d_scores_depend_only_on_the_2d_offset():
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 16))

  def score(q_pos, k_pos):
    rq = ops.rope_2d(q, jnp.array([q_pos]))
    rk = ops.rope_2d(k, jnp.array([k_pos]))
    return float(jnp.sum(rq * rk))

  base = score((1, 2), (3, 0))
  for shift in ((4, 1), (0, 7), (5, 5)):
    moved = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 0 + shift[1]))
    np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-5)
  # Rows and columns are distinct directions: swapping the offset's axes changes the score.
  assert abs(score((2, 1), (0, 3)) - base) > 1e-3


def test_rope_2d_bad_input():
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match='divisible by 4.*got 6'):
    ops.rope_2d(jnp.zeros((1, 4, 2, 6)), jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r'\(3, 2\).*\(1, 4, 2, 8\)'):
    ops.rope_2d(x, jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r'\[\.\.\., 2\]'):
    ops.rope_2d(x, jnp.zeros((4,)))


def test_patchify_against_a_loop_over_patches():
  images = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  got = np.asarray(ops.patchify(jnp.asarray(images), 2))
  assert got.shape == (2, 6, 12)
  for b in range(2):
    for n, (r, c) in enumerate(np.asarray(ops.grid_positions(2, 3))):
      np.testing.assert_array_equal(got[b, n], images[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2].ravel())
  with pytest.raises(ValueError, match='patch_size=4 does not divide the image size 4x6'):
    ops.patchify(jnp.asarray(images), 4)


def _naive_rollout(weights):
  out = np.eye(weights[0].shape[-1])[None]
  for w in weights:
    a = np.asarray(w, np.float64).mean(axis=1)
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
    a = a / a.sum(-1, keepdims=True)
    out = a @ out
  return out


def test_attention_rollout_rows_sum_to_one_and_match_a_naive_product():
  logits = jax.random.normal(jax.random.key(3), (3, 2, 4, 5, 5))  # [layers, b, heads, L, L]
  weights = jax.nn.softmax(logits, axis=-1)
  rollout = ops.attention_rollout(list(weights))
  np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(rollout, _naive_rollout(weights), atol=1e-5)
  np.testing.assert_allclose(ops.attention_rollout(weights), rollout, atol=1e-6)  # stacked
  with pytest.raises(ValueError, match=r'\[layers, batch, heads, L, L\].*\(2, 4, 5, 5\)'):
    ops.attention_rollout(weights[0])


def test_patch_attention_follows_the_class_token_to_its_patch():
  # Every layer: the class token (0) attends only to patch 5 (token 6); patches to themselves.
  length, target = 1 + 3 * 3, 6
  w = np.tile(np.eye(length, dtype=np.float32), (2, 1, 2, 1, 1))  # [layers, b, heads, L, L]
  w[:, :, :, 0] = 0.0
  w[:, :, :, 0, target] = 1.0
  for method in ('last', 'rollout'):
    m = np.asarray(ops.patch_attention(w, grid=(3, 3), cls_token=True, method=method))
    assert m.shape == (1, 3, 3)
    np.testing.assert_allclose(m.sum(), 1.0, atol=1e-6)
    assert np.unravel_index(m[0].argmax(), (3, 3)) == (1, 2)  # patch 5 = row 1, column 2
  mean_pool = ops.patch_attention(w[..., 1:, 1:], grid=(3, 3), cls_token=False)
  np.testing.assert_allclose(mean_pool, np.full((1, 3, 3), 1 / 9), atol=1e-6)
  with pytest.raises(ValueError, match='10 tokens do not match a 3x3 grid'):
    ops.patch_attention(w, grid=(3, 3), cls_token=False)
  with pytest.raises(ValueError, match="method='cls'"):
    ops.patch_attention(w, grid=(3, 3), cls_token=True, method='cls')
