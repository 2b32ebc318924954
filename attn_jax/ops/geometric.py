"""Concatenated geometric positional encoding: `m` sinusoid pairs of wavelengths `2 pi 2^j`,
appended to the token embedding instead of added to it.

    P(i, j) = [sin(i / 2^j), cos(i / 2^j)],   j = 0 .. m-1,

the sinusoids of Vaswani et al. 2017 with the frequencies in base 2 (one octave per pair, as
a binary counter's bits: pair `j` changes sign every `pi 2^j` positions). Concatenated, the
model reads position and content from separate channels (and `Embedder` projects the
`d_model + 2m` channels back to `d_model`), where adding them shares every channel between
the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def geometric_positions(positions: jax.Array, num_frequencies: int,
                        dtype=jnp.float32) -> jax.Array:
  """`P(i, j) = [sin(i / 2^j), cos(i / 2^j)]` for `j < num_frequencies`.

  Args:
    positions: int or float `[...]`.
    num_frequencies: `m`, the number of (sin, cos) pairs.

  Returns:
    `[..., 2m]` of `dtype`, channels `2j` (sine) and `2j + 1` (cosine) for frequency `j`.
  """
  if num_frequencies <= 0:
    raise ValueError(f'num_frequencies must be positive, got {num_frequencies}')
  inv = 2.0 ** -jnp.arange(num_frequencies, dtype=jnp.float32)  # [m]: 1, 1/2, 1/4, ...
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv
  enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., m, 2]
  return enc.reshape(*enc.shape[:-2], 2 * num_frequencies).astype(dtype)


def concat_geometric(x: jax.Array, positions: jax.Array | None, num_frequencies: int
                     ) -> jax.Array:
  """`[x_i ; P(i)]`: `x` `[batch, length, features]` -> `[batch, length, features + 2m]`.

  Args:
    positions: int `[batch, length]` or `[length]`; default `0..length-1`.
  """
  if x.ndim != 3:
    raise ValueError(f'concat_geometric expects [batch, length, features], got {x.shape}')
  if positions is None:
    positions = jnp.arange(x.shape[1])
  enc = geometric_positions(positions, num_frequencies, x.dtype)
  enc = jnp.broadcast_to(enc, x.shape[:2] + enc.shape[-1:])
  return jnp.concatenate([x, enc], axis=-1)
