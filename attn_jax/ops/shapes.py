"""Shapes of an attention call: the layout contract, checked at trace time.

Layout: q `[batch, q_len, heads, head_dim]`, k `[batch, kv_len, kv_heads, head_dim]`,
v `[batch, kv_len, kv_heads, v_dim]`, with `heads` a multiple of `kv_heads`
(GQA; `kv_heads=1` is MQA). Query head `h` reads k/v head `h // (heads // kv_heads)`.
Masks and biases broadcast to `[batch, heads, q_len, kv_len]`. A mismatch raises
`ValueError` naming the shapes. Used by every implementation (`dense`, `blockwise`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static sizes of one attention call."""
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  v_dim: int

  @property
  def groups(self) -> int:
    return self.heads // self.kv_heads


def check_qkv(query: jax.Array, key: jax.Array, value: jax.Array) -> Dims:
  """Validates q/k/v shapes (at trace time) and returns their sizes."""
  shapes = f'q {query.shape}, k {key.shape}, v {value.shape}'
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(f'q, k, v must be 4-D [batch, length, heads, head_dim]; got {shapes}')
  b, t, n, d = query.shape
  bk, s, kh, dk = key.shape
  bv, sv, vh, dv = value.shape
  if not b == bk == bv:
    raise ValueError(f'batch sizes differ: {shapes}')
  if d != dk:
    raise ValueError(f'head_dim of q ({d}) and k ({dk}) differ: {shapes}')
  if s != sv or kh != vh:
    raise ValueError(f'k and v must share kv_len and kv_heads: {shapes}')
  if kh == 0 or n % kh:
    raise ValueError(f'q heads ({n}) must be a multiple of k/v heads ({kh}): {shapes}')
  return Dims(b, t, s, n, kh, d, dv)


def check_broadcastable(name: str, x: jax.Array | None, dims: Dims) -> None:
  """`x` must be 4-D and broadcast to `[batch, heads, q_len, kv_len]`."""
  if x is None:
    return
  full = (dims.batch, dims.heads, dims.q_len, dims.kv_len)
  if x.ndim != 4 or any(a not in (1, f) for a, f in zip(x.shape, full, strict=True)):
    raise ValueError(
        f'{name} of shape {x.shape} does not broadcast to [batch, heads, q_len, kv_len] = {full}')


def split_segment_ids(segment_ids, dims: Dims) -> tuple[jax.Array | None, jax.Array | None]:
  """`segment_ids` is `[batch, len]` (self-attention) or a `(q_ids, kv_ids)` pair."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, tuple | list):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
  if q_seg.shape != (dims.batch, dims.q_len) or kv_seg.shape != (dims.batch, dims.kv_len):
    raise ValueError(
        f'segment ids {q_seg.shape} / {kv_seg.shape} must be [batch, q_len] = '
        f'{(dims.batch, dims.q_len)} / [batch, kv_len] = {(dims.batch, dims.kv_len)}')
  return q_seg, kv_seg


def to_grouped(x: jax.Array, dims: Dims) -> jax.Array:
  """`[B|1, heads|1, T, S]` -> `[B|1, kv_heads|1, groups|1, T, S]` matching grouped queries."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], dims.kv_heads, dims.groups, *x.shape[2:])
