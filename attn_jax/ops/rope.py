"""Rotary position embedding (Su et al. 2021) and the frequency scalings that extend a model's
context past the length it was trained at.

    inv_freq = ops.rope_frequencies(64, scaling=ops.RopeScaling('yarn', factor=4.0,
                                                                 original_max_position=4096))
    q = ops.rope(q, positions, rotary_dim=64, scaling=...)   # or apply_rotary(q, positions, ...)

Channel pairs are rotated by `position * inv_freq[i]`, with `inv_freq[i] = base^(-2i/d)` for the
`d = rotary_dim` rotated channels. Layouts: 'half' pairs channel `i` with `i + d/2` (GPT-NeoX,
Llama: "rotate half"), `interleaved=True` pairs `2i` with `2i + 1` (GPT-J, RoFormer). Partial
RoPE rotates only the first `rotary_dim` (or `fraction * head_dim`) channels and passes the
rest through (GPT-NeoX's `rotary_pct`).

Scalings (`RopeScaling.kind`), with `s = factor` and `L = original_max_position`:
    'linear'  position interpolation (Chen et al. 2023): every frequency / s.
    'ntk'     NTK-aware (bloc97 2023): base * s^(d / (d - 2)); high frequencies barely move,
              the lowest is interpolated by s.
    'yarn'    YaRN (Peng et al. 2023): by wavelength `lambda = 2 pi / inv_freq`, with
              `r = L / lambda` rotations over the training context, a ramp `gamma(r)` from 0
              (r <= beta_slow: interpolate, / s) to 1 (r >= beta_fast: keep); plus an attention
              temperature: the rotated channels of q and k are multiplied by
              `0.1 ln(s) + 1`, so their logits by its square (the paper's sqrt(1/t)).
    'llama3'  Llama 3.1: the same blend with the ramp between `r = low_freq_factor` and
              `r = high_freq_factor`, and no temperature.
YaRN's ramp is the paper's, on `r` itself; the reference implementation rounds the ramp's
ends to whole channel indices, so its frequencies differ slightly inside the ramp.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCALING_KINDS = ('none', 'linear', 'ntk', 'yarn', 'llama3')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE's frequencies change to run at `factor` times the training context.

  Attributes:
    kind: one of `SCALING_KINDS` (see the module docstring).
    factor: s, the context extension (1: no change).
    original_max_position: L, the training context ('yarn', 'llama3').
    beta_slow, beta_fast: YaRN's ramp ends alpha and beta in rotations over L.
    low_freq_factor, high_freq_factor: Llama 3.1's ramp ends, in the same unit.
    attention_factor: YaRN's q/k multiplier; default `0.1 ln(s) + 1`.
  """
  kind: str = 'none'
  factor: float = 1.0
  original_max_position: int | None = None
  beta_slow: float = 1.0
  beta_fast: float = 32.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  attention_factor: float | None = None

  def __post_init__(self):
    if self.kind not in SCALING_KINDS:
      raise ValueError(f'RopeScaling.kind must be one of {SCALING_KINDS}, got {self.kind!r}')
    if not self.factor > 0:
      raise ValueError(f'RopeScaling.factor must be positive, got {self.factor}')
    if self.kind == 'none' and self.factor != 1:
      raise ValueError(f"RopeScaling kind 'none' takes no factor (got {self.factor}); name a "
                       f'kind from {SCALING_KINDS[1:]}')
    if self.kind in ('yarn', 'llama3'):
      if not (isinstance(self.original_max_position, int) and self.original_max_position > 0):
        raise ValueError(f"RopeScaling kind {self.kind!r} needs original_max_position, the "
                         f'training context (a positive int), got {self.original_max_position}')
      lo, hi = self._ramp_ends()
      if not 0 <= lo < hi:
        raise ValueError(f'RopeScaling {self.kind!r}: ramp ends must satisfy 0 <= low < high, '
                         f'got {lo}, {hi}')

  def _ramp_ends(self) -> tuple[float, float]:
    """Where the blend goes from interpolating to keeping, in rotations over L."""
    if self.kind == 'yarn':
      return self.beta_slow, self.beta_fast
    return self.low_freq_factor, self.high_freq_factor


def _ramp(rotations: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """0 below `lo` rotations over the training context, 1 above `hi`, linear between."""
  return np.clip((rotations - lo) / (hi - lo), 0.0, 1.0)


def rope_frequencies(rotary_dim: int, base: float = 10_000.0,
                     scaling: RopeScaling | None = None) -> jax.Array:
  """float32 `[rotary_dim // 2]`: the angle per position unit of each rotated channel pair.

  Computed in float64 NumPy (they are constants of the model) and returned as float32.
  """
  if rotary_dim % 2 or rotary_dim <= 0:
    raise ValueError(f'rotary_dim must be even and positive, got {rotary_dim}')
  scaling = scaling or RopeScaling()
  s = float(scaling.factor)
  if scaling.kind == 'ntk':
    base = base * s ** (rotary_dim / (rotary_dim - 2)) if rotary_dim > 2 else base
  inv_freq = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  if scaling.kind == 'linear':
    inv_freq = inv_freq / s
  elif scaling.kind in ('yarn', 'llama3'):
    rotations = scaling.original_max_position * inv_freq / (2 * math.pi)  # L / wavelength
    keep = _ramp(rotations, *scaling._ramp_ends())
    inv_freq = (1.0 - keep) * inv_freq / s + keep * inv_freq
  return jnp.asarray(inv_freq, jnp.float32)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
  """What the rotated channels of q and k are multiplied by: YaRN's `0.1 ln(s) + 1` (or its
  `attention_factor`), 1 for the other scalings."""
  if scaling is None or scaling.kind != 'yarn':
    return 1.0
  if scaling.attention_factor is not None:
    return float(scaling.attention_factor)
  return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, *,
                 interleaved: bool = False, attention_factor: float = 1.0) -> jax.Array:
  """Rotates the first `2 * len(inv_freq)` channels of `x` by `positions * inv_freq`.

  Args:
    x: `[batch, length, heads, head_dim]`.
    positions: int or float `[batch, length]` or `[length]`.
    inv_freq: float `[rotary_dim // 2]` (`rope_frequencies`).
    interleaved: pairs `(2i, 2i + 1)` (GPT-J) instead of `(i, i + rotary_dim / 2)` (NeoX).
    attention_factor: multiplies the rotated channels (YaRN's temperature).

  Returns:
    `x`'s shape and dtype; the rotation is computed in float32.
  """
  rotary_dim = 2 * inv_freq.shape[0]
  positions = jnp.asarray(positions)
  if positions.ndim == 1:
    positions = positions[None]
  if positions.shape[-1] != x.shape[1]:
    raise ValueError(f'rope: positions {positions.shape} do not match x {x.shape}')
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [b, l, 1, d/2]
  cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
  x_rot, x_pass = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  if interleaved:
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    rotated = rotated.reshape(x_rot.shape)
  else:
    x1, x2 = x_rot[..., :rotary_dim // 2], x_rot[..., rotary_dim // 2:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


def rope(x: jax.Array, positions: jax.Array | None = None, base: float = 10_000.0,
         rotary_dim: int | None = None, *, fraction: float | None = None,
         interleaved: bool = False, scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary position embedding; by default the "rotate-half" layout on every channel.

  Dot products of rotated q and k depend only on the position difference, under every
  layout and scaling (the YaRN factor scales them uniformly).

  Args:
    x: `[batch, length, heads, head_dim]`.
    positions: int `[batch, length]` or `[length]`; defaults to `0..length-1` (pass
      `sequence_layout.layout_positions` for a context-parallel layout).
    base: the frequency base (10,000 in the paper).
    rotary_dim: rotate only the first `rotary_dim` channels (partial RoPE); even.
    fraction: or give the rotated share of `head_dim` (GPT-NeoX's rotary_pct = 0.25).
    interleaved: GPT-J's pairs `(2i, 2i + 1)`.
    scaling: a `RopeScaling` for a longer context than training's.

  Returns:
    `x`'s shape and dtype; the rotation is computed in float32.
  """
  if x.ndim != 4:
    raise ValueError(f'rope expects [batch, length, heads, head_dim], got {x.shape}')
  head_dim = x.shape[-1]
  if fraction is not None:
    if rotary_dim is not None:
      raise ValueError('give rotary_dim or fraction, not both')
    if not 0 < fraction <= 1:
      raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    rotary_dim = int(head_dim * fraction)
  rotary_dim = head_dim if rotary_dim is None else rotary_dim
  if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
    raise ValueError(f'rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}')
  positions = jnp.arange(x.shape[1]) if positions is None else positions
  return apply_rotary(x, positions, rope_frequencies(rotary_dim, base, scaling),
                      interleaved=interleaved, attention_factor=rope_attention_factor(scaling))
