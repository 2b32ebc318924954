"""RoPE layouts and long-context scalings against their formulas, written here in float64 NumPy
from the papers (and Meta's Llama 3.1 reference for its scaling); the rotation against explicit
rotation matrices; q.k invariant to a common shift of positions under every scaling.

Tolerances: frequencies 1e-6 relative (float32 of float64 constants); rotations 1e-5; the
relative-position check 1e-4 of |q||k| (float32 angles at positions up to ~300).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops


def _plain(d, base):
  """Su et al. 2021: theta_i = base^(-2i/d), i = 0 .. d/2 - 1."""
  return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def _ntk(d, base, s):
  """bloc97's NTK-aware scaling: the base becomes base * s^(d / (d - 2))."""
  return (base * s ** (d / (d - 2))) ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def _yarn(d, base, s, length, alpha=1.0, beta=32.0):
  """Peng et al. 2023, eq. (17)-(19): r = L / lambda, gamma ramps from 0 (r < alpha) to 1
  (r > beta); h(theta) = (1 - gamma) theta / s + gamma theta."""
  theta = _plain(d, base)
  r = length / (2 * np.pi / theta)
  gamma = np.where(r < alpha, 0.0, np.where(r > beta, 1.0, (r - alpha) / (beta - alpha)))
  return (1 - gamma) * theta / s + gamma * theta, gamma


def _llama3(d, base, factor, length, low, high):
  """Meta's `apply_scaling` (Llama 3.1), one frequency at a time."""
  low_freq_wavelen, high_freq_wavelen = length / low, length / high
  out = []
  for freq in _plain(d, base):
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / factor)
    else:
      smooth = (length / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.asarray(out)


def _scaling(kind, factor=4.0):
  return ops.RopeScaling(kind, factor=1.0 if kind == 'none' else factor,
                         original_max_position=64 if kind in ('yarn', 'llama3') else None)


def test_frequencies_match_each_formula():
  d, base = 64, 10_000.0
  np.testing.assert_allclose(ops.rope_frequencies(d, base), _plain(d, base), rtol=1e-6)
  np.testing.assert_allclose(ops.rope_frequencies(d, base, ops.RopeScaling('linear', 4.0)),
                             _plain(d, base) / 4.0, rtol=1e-6)
  np.testing.assert_allclose(ops.rope_frequencies(d, base, ops.RopeScaling('ntk', 4.0)),
                             _ntk(d, base, 4.0), rtol=1e-6)
  yarn = ops.RopeScaling('yarn', 16.0, original_max_position=4096)
  want, gamma = _yarn(d, base, 16.0, 4096)
  assert ((gamma > 0) & (gamma < 1)).sum() >= 4  # the ramp is exercised, and both ends
  assert (gamma == 0).any() and (gamma == 1).any()
  np.testing.assert_allclose(ops.rope_frequencies(d, base, yarn), want, rtol=1e-6)
  assert ops.rope_attention_factor(yarn) == pytest.approx(0.1 * math.log(16.0) + 1)
  llama = ops.RopeScaling('llama3', 8.0, original_max_position=8192, low_freq_factor=1.0,
                          high_freq_factor=4.0)
  want = _llama3(128, 500_000.0, 8.0, 8192, 1.0, 4.0)
  got = ops.rope_frequencies(128, 500_000.0, llama)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  ramp = (want != _plain(128, 500_000.0)) & (want != _plain(128, 500_000.0) / 8.0)
  assert ramp.sum() >= 3  # some frequencies are blended
  for kind in ('linear', 'ntk', 'llama3'):
    assert ops.rope_attention_factor(_scaling(kind)) == 1.0


@pytest.mark.parametrize('kind', ops.SCALING_KINDS)
def test_factor_one_is_plain_rope(kind):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 2, 16)), jnp.float32)
  pos = np.arange(9) * 7
  np.testing.assert_allclose(ops.rope(x, pos, scaling=_scaling(kind, factor=1.0)),
                             ops.rope(x, pos), atol=1e-6, rtol=1e-6)


def _rotation(positions, inv_freq, head_dim, interleaved, factor):
  """Explicit [len, head_dim, head_dim] matrices: a 2x2 rotation per channel pair, identity on
  the channels past the rotated ones."""
  half = len(inv_freq)
  pairs = [(2 * i, 2 * i + 1) if interleaved else (i, i + half) for i in range(half)]
  mats = np.tile(np.eye(head_dim), (len(positions), 1, 1))
  for n, p in enumerate(positions):
    for (a, b), w in zip(pairs, inv_freq, strict=True):
      c, s = np.cos(p * w) * factor, np.sin(p * w) * factor
      mats[n, a, a], mats[n, a, b], mats[n, b, a], mats[n, b, b] = c, -s, s, c
  return mats


@pytest.mark.parametrize('interleaved,kw', [
    (False, dict()),
    (True, dict()),
    (True, dict(fraction=0.5)),
    (False, dict(rotary_dim=4, scaling=ops.RopeScaling('yarn', 4.0, original_max_position=64))),
])
def test_layouts_match_rotation_matrices(interleaved, kw):
  head_dim = 12
  x = np.random.default_rng(1).normal(size=(2, 5, 3, head_dim))
  pos = np.array([0, 3, 11, 40, 97])
  got = ops.rope(jnp.asarray(x, jnp.float32), pos, base=100.0, interleaved=interleaved, **kw)
  rotary = kw.get('rotary_dim') or int(head_dim * kw.get('fraction', 1.0))
  scaling = kw.get('scaling')
  freq = np.asarray(ops.rope_frequencies(rotary, 100.0, scaling), np.float64)
  mats = _rotation(pos, freq, head_dim, interleaved, ops.rope_attention_factor(scaling))
  want = np.einsum('lij,blhj->blhi', mats, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got[..., rotary:], np.asarray(x, np.float32)[..., rotary:])


@pytest.mark.parametrize('kind', ops.SCALING_KINDS)
@pytest.mark.parametrize('interleaved', [False, True])
def test_scores_depend_only_on_relative_position(kind, interleaved):
  rng = np.random.default_rng(2)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  scaling = _scaling(kind)

  def score(m, n):
    rot = lambda x, p: ops.rope(x, jnp.array([p]), scaling=scaling,  # noqa: E731
                                interleaved=interleaved, fraction=0.75)
    return float(jnp.sum(rot(q, m) * rot(k, n)))

  tol = 1e-4 * float(jnp.linalg.norm(q) * jnp.linalg.norm(k)) * ops.rope_attention_factor(
      scaling) ** 2
  assert score(37, 5) == pytest.approx(score(37 + 250, 5 + 250), abs=tol)
  assert score(37, 5) != pytest.approx(score(37, 6), abs=tol)


def test_bad_options_are_rejected():
  x = jnp.zeros((1, 2, 1, 8))
  with pytest.raises(ValueError, match='kind must be one of'):
    ops.RopeScaling('dynamic')
  with pytest.raises(ValueError, match='needs original_max_position'):
    ops.RopeScaling('yarn', 4.0)
  with pytest.raises(ValueError, match='ramp ends'):
    ops.RopeScaling('llama3', 8.0, original_max_position=8192, low_freq_factor=4.0,
                    high_freq_factor=1.0)
  with pytest.raises(ValueError, match='factor must be positive'):
    ops.RopeScaling('linear', 0.0)
  with pytest.raises(ValueError, match='rotary_dim or fraction'):
    ops.rope(x, rotary_dim=4, fraction=0.5)
  with pytest.raises(ValueError, match='rotary_dim must be even'):
    ops.rope(x, fraction=0.375)  # 3 of 8 channels
  with pytest.raises(ValueError, match="kind 'none' takes no factor"):
    ops.RopeScaling(factor=2.0)
  with pytest.raises(TypeError):
    ops.RopeScaling(kind='linear', facter=2.0)  # typos fail loudly
