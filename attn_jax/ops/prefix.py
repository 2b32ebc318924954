"""Attention to the filled prefix of a fixed-size key/value buffer (a decoding cache).

A KV cache has a static size (the longest sequence it may hold), but at step `i` of decoding
only its first `i` slots hold keys. `prefix_attention` walks the buffer in chunks up to
`length` only (a `lax.fori_loop` with a traced trip count), attends to each chunk with
`dot_product_attention` and merges the chunks exactly with `merge_attention` (the online
softmax across chunks), so a step costs O(length) rather than O(buffer size).

Inference only: the loop's trip count is traced, so it has no reverse-mode derivative (train
with `dot_product_attention` over the whole sequence).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops.attention import dot_product_attention, merge_attention
from attn_jax.ops.shapes import check_broadcastable, check_qkv


def _slice_keys(x: jax.Array | None, start, size: int) -> jax.Array | None:
  """Chunk `[..., start:start+size]` of a `[..., S|1]` mask or bias (size-1 axes kept)."""
  if x is None or x.shape[-1] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)


def _shifted_mask(mask_mod, start):
  if mask_mod is None:
    return None
  return lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx + start, kv_idx + start)


def _shifted_score(score_mod, start):
  if score_mod is None:
    return None
  return lambda s, b, h, q_idx, kv_idx: score_mod(s, b, h, q_idx + start, kv_idx + start)


def prefix_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     length: int | jax.Array, chunk_size: int, mask: jax.Array | None = None,
                     bias: jax.Array | None = None, is_causal: bool = False,
                     q_offset: int | jax.Array = 0,
                     local_window: int | tuple[int, int] | None = None,
                     scale: float | None = None, mask_mod: Any = None, score_mod: Any = None,
                     sinks: jax.Array | None = None, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None, implementation: str | None = None,
                     precision: Any = None, return_lse: bool = False):
  """`dot_product_attention(query, key[:, :length], value[:, :length], ...)` in O(length).

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key / value: buffers `[batch, slots, kv_heads, head_dim|v_dim]`; `slots` must be a
      multiple of `chunk_size`. Slots from `length` on are never read.
    length: number of leading slots to attend to (int or traced int32 scalar), at most
      `slots`.
    chunk_size: slots per chunk; each chunk is one `dot_product_attention` call.
    mask / bias: broadcasting to `[batch, heads, q_len, slots]`, sliced per chunk.
    is_causal, q_offset, local_window, scale, mask_mod, score_mod, dropout_rate,
      dropout_rng, implementation, precision: as in `dot_product_attention`, in slot
      indices (the functions see absolute slot indices and query positions).
    sinks: float `[heads]`, joining every row's normalizer once.
    return_lse: also return the float32 row log-sum-exp `[batch, heads, q_len]` (sinks
      included; -inf for a row that sees nothing), for `merge_attention`.

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype`; a query that sees no key gets zeros;
    then the lse if asked.
  """
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  check_broadcastable('bias', bias, dims)
  if chunk_size <= 0 or dims.kv_len % chunk_size:
    raise ValueError(f'prefix_attention: the buffer has {dims.kv_len} slots, not a multiple of '
                     f'chunk_size={chunk_size}')
  if isinstance(length, int) and not 0 <= length <= dims.kv_len:
    raise ValueError(f'prefix_attention: length={length} is outside the buffer of '
                     f'{dims.kv_len} slots')
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs dropout_rng')
  batch, q_len, heads = dims.batch, dims.q_len, dims.heads
  num_chunks = (jnp.minimum(jnp.asarray(length, jnp.int32), dims.kv_len) + chunk_size - 1
                ) // chunk_size

  def chunk(c, carry):
    out, lse = carry
    start = c * chunk_size
    k = jax.lax.dynamic_slice_in_dim(key, start, chunk_size, axis=1)
    v = jax.lax.dynamic_slice_in_dim(value, start, chunk_size, axis=1)
    # Slots past `length` inside the last chunk are hidden; the keys' own indices shift by
    # `start`, so the causal/window offsets of the queries shift with them.
    filled = (start + jnp.arange(chunk_size) < length)[None, None, None, :]
    part_mask = filled if mask is None else _slice_keys(mask, start, chunk_size) & filled
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, c)
    part, part_lse = dot_product_attention(
        query, k, v, mask=part_mask, bias=_slice_keys(bias, start, chunk_size),
        is_causal=is_causal, q_offset=q_offset - start, local_window=local_window, scale=scale,
        mask_mod=_shifted_mask(mask_mod, start), score_mod=_shifted_score(score_mod, start),
        return_lse=True, dropout_rate=dropout_rate, dropout_rng=rng,
        implementation=implementation, precision=precision)
    return merge_attention(out, lse, part.astype(jnp.float32), part_lse)

  init = (jnp.zeros((batch, q_len, heads, value.shape[-1]), jnp.float32),
          jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32))
  out, lse = jax.lax.fori_loop(0, num_chunks, chunk, init)
  if sinks is not None:
    # The sink joins the normalizer once: scale each row by exp(lse) / (exp(lse) + exp(sink)).
    sinks = jnp.asarray(sinks, jnp.float32)
    if sinks.shape != (heads,):
      raise ValueError(f'sinks must be one logit per query head, [{heads}], got {sinks.shape}')
    keep = jax.nn.sigmoid(lse - sinks[None, :, None])  # [B, H, T]; 0 where lse = -inf
    out = out * jnp.swapaxes(keep, 1, 2)[..., None]
    lse = jnp.logaddexp(lse, sinks[None, :, None])
  return (out.astype(query.dtype), lse) if return_lse else out.astype(query.dtype)
