"""Positional information: absolute encodings (sinusoidal, learned), rotary (RoPE, whose home
with its layouts and long-context scalings is `rope.py`; re-exported here), and additive
position biases (ALiBi, T5 relative buckets).

The biases share one signature, `fn(params, q_positions, kv_positions) -> [heads, q, kv]`
with float32 output, so `dot_product_attention(bias_fn=..., bias_params=...)` can
evaluate them block by block (the blockwise path never builds the full
`[q_len, kv_len]` bias).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from attn_jax.ops.rope import rope as rope  # re-exported: positional.rope is public


def sinusoidal(positions: jax.Array, dim: int, max_wavelength: float = 10_000.0,
               dtype=jnp.float32) -> jax.Array:
  """Sinusoidal encodings of Vaswani et al. 2017.

  Channel `2i` is `sin(p / max_wavelength^(2i/dim))`, channel `2i+1` the matching cosine.

  Args:
    positions: int or float `[...]`.
    dim: even encoding size.
    max_wavelength: the longest wavelength (the paper's 10,000).

  Returns:
    `[..., dim]` of `dtype`.
  """
  if dim % 2:
    raise ValueError(f'sinusoidal encodings need an even dim, got {dim}')
  inv_freq = max_wavelength ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  enc = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., dim/2, 2]
  return enc.reshape(*enc.shape[:-2], dim).astype(dtype)


def add_sinusoidal(x: jax.Array, positions: jax.Array | None = None, *,
                   mode: Literal['add', 'concat'] = 'add', dim: int | None = None,
                   max_wavelength: float = 10_000.0) -> jax.Array:
  """Adds (or concatenates) sinusoidal encodings to `x` `[batch, length, features]`.

  Args:
    positions: int `[batch, length]` or `[length]`; defaults to `0..length-1`
      (pass per-segment positions for packed sequences).
    mode: 'add' (encoding size = features) or 'concat' (appends `dim` channels).
  """
  if x.ndim != 3:
    raise ValueError(f'add_sinusoidal expects [batch, length, features], got {x.shape}')
  if positions is None:
    positions = jnp.arange(x.shape[1])
  if mode == 'add':
    return x + sinusoidal(positions, x.shape[-1], max_wavelength, x.dtype)
  if mode == 'concat':
    if dim is None:
      raise ValueError("mode='concat' needs dim, the number of encoding channels to append")
    enc = sinusoidal(positions, dim, max_wavelength, x.dtype)
    enc = jnp.broadcast_to(enc, x.shape[:2] + (dim,))
    return jnp.concatenate([x, enc], axis=-1)
  raise ValueError(f"mode must be 'add' or 'concat', got {mode!r}")


def learned_positional_init(kind: Literal['normal', 'sinusoidal'] = 'normal',
                            stddev: float = 0.02, max_wavelength: float = 10_000.0):
  """Initializer for a learned `[max_length, dim]` position table.

  'normal' is the BERT/GPT-2 choice; 'sinusoidal' starts the table at the fixed
  encodings (as the flax WMT example does) and lets training move it.
  """
  if kind == 'normal':
    return jax.nn.initializers.normal(stddev)
  if kind == 'sinusoidal':
    def init(key, shape, dtype=jnp.float32):
      del key
      if len(shape) != 2:
        raise ValueError(f'position table must be [max_length, dim], got {shape}')
      return sinusoidal(jnp.arange(shape[0]), shape[1], max_wavelength, dtype)
    return init
  raise ValueError(f"kind must be 'normal' or 'sinusoidal', got {kind!r}")


def learned_positional(table: jax.Array, positions: jax.Array) -> jax.Array:
  """Looks up `table [max_length, dim]` at int `positions [...]` -> `[..., dim]`.

  Raises (at trace time, for static shapes) when the table is too short: a silent
  clamp would give every position past the end the same encoding.
  """
  positions = jnp.asarray(positions)
  if isinstance(positions, jax.core.Tracer) or positions.size == 0:
    return jnp.take(table, positions, axis=0)
  if int(positions.max()) >= table.shape[0]:
    raise ValueError(
        f'position {int(positions.max())} is past the learned table of {table.shape[0]} entries')
  return jnp.take(table, positions, axis=0)


def alibi_slopes(num_heads: int) -> jax.Array:
  """ALiBi head slopes (Press et al. 2022): float32 `[num_heads]`.

  For `n` a power of two, slope `h` is `2^(-8(h+1)/n)`; otherwise the slopes of
  the next lower power of two followed by every other slope of twice that many.
  """
  if num_heads <= 0:
    raise ValueError(f'num_heads must be positive, got {num_heads}')

  def power_of_two(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  lower = 2 ** math.floor(math.log2(num_heads))
  slopes = power_of_two(lower)
  if lower != num_heads:
    slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(slopes: jax.Array, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """ALiBi bias `-slope * |q_pos - kv_pos|`: float32 `[heads, q, kv]`.

  On the causal part this is the paper's `slope * (k - q)`; the absolute value
  makes the same bias usable for bidirectional attention.
  """
  distance = jnp.abs(q_positions[:, None] - kv_positions[None, :]).astype(jnp.float32)
  return -slopes.astype(jnp.float32)[:, None, None] * distance


def relative_position_buckets(relative_position: jax.Array, *, bidirectional: bool = True,
                              num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
  """T5 buckets (Raffel et al. 2020) of `relative_position = kv_pos - q_pos`.

  Half the buckets (per direction, if bidirectional) hold exact small distances,
  the rest grow logarithmically up to `max_distance`; farther distances share the
  last bucket.

  Returns:
    int32 of `relative_position`'s shape, values in `[0, num_buckets)`.
  """
  distance = -jnp.asarray(relative_position, jnp.int32)  # > 0: key lies in the past.
  bucket = jnp.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    bucket += (distance < 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


def relative_position_bias(table: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
                           *, bidirectional: bool = True, max_distance: int = 128) -> jax.Array:
  """T5 relative bias from a learned `table [num_buckets, heads]`: float32 `[heads, q, kv]`.

  Use with `functools.partial` to fix `bidirectional`/`max_distance` before passing
  it as `bias_fn` to the attention op.
  """
  buckets = relative_position_buckets(
      kv_positions[None, :] - q_positions[:, None], bidirectional=bidirectional,
      num_buckets=table.shape[0], max_distance=max_distance)
  bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [q, kv, heads]
  return jnp.moveaxis(bias, -1, 0)
