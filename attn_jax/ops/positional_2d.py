"""2-D positions of image patches: grid coordinates, 2-D sinusoidal encodings, 2-D RoPE.

A patch's position is its (row, column) on the `grid_h x grid_w` patch grid; sequences of
patches run in raster order (row by row), so patch `i` sits at `(i // grid_w, i % grid_w)`.
Both encodings spend half of their channels on the row and half on the column, each half the
1-D encoding of `attn_jax.ops.positional` applied to that coordinate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.ops.positional import rope, sinusoidal


def grid_positions(grid_h: int, grid_w: int) -> jax.Array:
  """The (row, column) of each patch of a `grid_h x grid_w` grid in raster order: int32
  `[grid_h * grid_w, 2]`."""
  if grid_h <= 0 or grid_w <= 0:
    raise ValueError(f'grid must be positive, got {grid_h} x {grid_w}')
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing='ij')
  return jnp.stack([rows.ravel(), cols.ravel()], axis=-1).astype(jnp.int32)


def _check_positions(positions: jax.Array, what: str) -> jax.Array:
  positions = jnp.asarray(positions)
  if positions.ndim < 1 or positions.shape[-1] != 2:
    raise ValueError(f'{what}: positions must be [..., 2] (row, column), got {positions.shape}')
  return positions


def sinusoidal_2d(positions: jax.Array, dim: int, max_wavelength: float = 10_000.0,
                  dtype=jnp.float32) -> jax.Array:
  """2-D sinusoidal encodings: channels `[:dim/2]` are `ops.sinusoidal(row, dim/2)`, channels
  `[dim/2:]` the same of the column.

  Args:
    positions: int or float `[..., 2]` (row, column).
    dim: encoding size, a multiple of 4 (each half holds sin/cos pairs).

  Returns:
    `[..., dim]` of `dtype`.
  """
  if dim % 4:
    raise ValueError(f'sinusoidal_2d needs dim divisible by 4 (a sin/cos pair per frequency, '
                     f'for rows and columns), got {dim}')
  positions = _check_positions(positions, 'sinusoidal_2d')
  half = dim // 2
  return jnp.concatenate([sinusoidal(positions[..., 0], half, max_wavelength, dtype),
                          sinusoidal(positions[..., 1], half, max_wavelength, dtype)], axis=-1)


def rope_2d(x: jax.Array, positions: jax.Array, base: float = 100.0) -> jax.Array:
  """Axial 2-D rotary embedding (Heo et al. 2024, "Rotary Position Embedding for Vision
  Transformer", RoPE-Axial): the first half of each head's channels is rotated by the row, the
  second half by the column, each half with `ops.rope` (rotate-half pairing).

  The dot product of a query at (r1, c1) with a key at (r2, c2) then depends only on the
  offset (r1 - r2, c1 - c2). Position (0, 0) is the identity rotation.

  Args:
    x: `[batch, length, heads, head_dim]`, head_dim a multiple of 4.
    positions: int `[batch, length, 2]` or `[length, 2]`, (row, column) of each element.
    base: the frequency base of each half (Heo et al. use 100 for patch grids).

  Returns:
    `x`'s shape and dtype (rotated in float32).
  """
  if x.ndim != 4:
    raise ValueError(f'rope_2d expects [batch, length, heads, head_dim], got {x.shape}')
  head_dim = x.shape[-1]
  if head_dim % 4:
    raise ValueError(f'rope_2d needs head_dim divisible by 4 (a rotated pair per frequency, '
                     f'for rows and columns), got {head_dim}')
  positions = _check_positions(positions, 'rope_2d')
  if positions.ndim not in (2, 3) or positions.shape[-2] != x.shape[1]:
    raise ValueError(f'rope_2d: positions {positions.shape} must be [batch, length, 2] or '
                     f'[length, 2] for x {x.shape}')
  half = head_dim // 2
  return jnp.concatenate([rope(x[..., :half], positions[..., 0], base),
                          rope(x[..., half:], positions[..., 1], base)], axis=-1)
