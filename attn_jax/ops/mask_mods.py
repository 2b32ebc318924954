"""Ready-made mask functions `mask_mod(b, h, q_idx, kv_idx) -> bool` (True = may attend).

Combine them with `and_masks` / `or_masks`, pass one to `ops.dot_product_attention(...,
mask_mod=...)`, or build a reusable `ops.block_mask(...)` from it. Positions are absolute
(`q_idx` includes the call's `q_offset`). Causal masks and sliding windows are `Band`s, so
the blocks they hide are found from block corners alone; the others are evaluated once per
element when a block mask is built, and again only inside partly visible blocks.

    causal()                            kv <= q
    sliding_window(left, right=0)       q - left <= kv <= q + right
    chunked(size)                       q and kv in the same chunk (Llama 4's local layers)
    prefix_lm(prefix)                   causal, plus the first `prefix` keys for every query
    document(q_ids, kv_ids=None)        same document / segment id (packed sequences)
    padding(lengths, q_lengths=None)    keys (and queries) before each row's length
    dilated(stride)                     (q - kv) % stride == 0 (Sparse Transformer, strided)
    global_tokens(n)                    the first n positions see and are seen by all
    global_and_window(n, window)        Longformer / BigBird: global tokens plus a window
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.ops.mods import Band, MaskMod, and_masks, or_masks


def causal() -> Band:
  """Key `kv_idx` visible to query `q_idx` iff `kv_idx <= q_idx`."""
  return Band(None, 0)


def sliding_window(left: int, right: int = 0) -> Band:
  """`q_idx - left <= kv_idx <= q_idx + right`: `left` keys back, `right` ahead (inclusive).

  `sliding_window(w - 1)` and `causal()` together give a causal window of `w` keys
  (Mistral's); `sliding_window(w, w)` a bidirectional one (Longformer's local attention).
  """
  if left < 0 or right < 0:
    raise ValueError(f'sliding_window: left={left} and right={right} must be >= 0')
  return Band(-int(left), int(right))


def chunked(chunk_size: int) -> MaskMod:
  """Query and key in the same chunk of `chunk_size` positions: Llama 4's chunked local
  attention (pair with `causal()`), a block-diagonal mask."""
  if chunk_size <= 0:
    raise ValueError(f'chunked: chunk_size={chunk_size} must be positive')

  def chunked_mask(b, h, q_idx, kv_idx):
    del b, h
    return q_idx // chunk_size == kv_idx // chunk_size

  return chunked_mask


def prefix_lm(prefix_length) -> MaskMod:
  """Prefix LM (T5, UniLM): keys in the prefix are visible to every query, the rest causally.

  Args:
    prefix_length: int, or int `[batch]` for a prefix per row.
  """
  prefix = jnp.asarray(prefix_length, jnp.int32)
  if prefix.ndim > 1:
    raise ValueError(f'prefix_lm: prefix_length must be an int or [batch], got {prefix.shape}')

  def in_prefix(b, h, q_idx, kv_idx):
    del h, q_idx
    return kv_idx < (prefix[b] if prefix.ndim else prefix)

  return or_masks(in_prefix, causal())


def document(q_segment_ids, kv_segment_ids=None) -> MaskMod:
  """Packed sequences: attend only within the same document (segment id).

  Args:
    q_segment_ids: int `[batch, q_len]`, the id of each query position's document.
    kv_segment_ids: int `[batch, kv_len]`; default the same ids (self-attention).
  """
  q_ids = jnp.asarray(q_segment_ids)
  kv_ids = q_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  if q_ids.ndim != 2 or kv_ids.ndim != 2 or q_ids.shape[0] != kv_ids.shape[0]:
    raise ValueError(f'document: segment ids must be [batch, q_len] and [batch, kv_len], got '
                     f'{q_ids.shape} and {kv_ids.shape}')

  def same_document(b, h, q_idx, kv_idx):
    del h
    return q_ids[b, q_idx] == kv_ids[b, kv_idx]

  return same_document


def padding(lengths, q_lengths=None) -> MaskMod:
  """Keys at or past each row's length are hidden (and, with `q_lengths`, queries too, whose
  rows then come out as zeros).

  Args:
    lengths: int `[batch]`, the number of real keys per row.
    q_lengths: int `[batch]`, the number of real queries per row (default: all real).
  """
  kv_len = jnp.asarray(lengths, jnp.int32)
  q_len = None if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
  if kv_len.ndim != 1 or (q_len is not None and q_len.shape != kv_len.shape):
    raise ValueError(f'padding: lengths must be [batch], got {kv_len.shape}'
                     + ('' if q_len is None else f' and q_lengths {q_len.shape}'))

  def not_padding(b, h, q_idx, kv_idx):
    del h
    visible = kv_idx < kv_len[b]
    return visible if q_len is None else visible & (q_idx < q_len[b])

  return not_padding


def dilated(stride: int) -> MaskMod:
  """`(q_idx - kv_idx) % stride == 0`: every `stride`-th key. The Sparse Transformer's strided
  pattern (Child et al. 2019) is `and_masks(causal(), or_masks(sliding_window(stride - 1),
  dilated(stride)))`."""
  if stride <= 0:
    raise ValueError(f'dilated: stride={stride} must be positive')

  def every_stride(b, h, q_idx, kv_idx):
    del b, h
    return (q_idx - kv_idx) % stride == 0

  return every_stride


def global_tokens(num_global: int) -> MaskMod:
  """The first `num_global` positions attend to everything and everything attends to them
  (Longformer's global attention, BigBird's ITC global tokens)."""
  if num_global < 0:
    raise ValueError(f'global_tokens: num_global={num_global} must be >= 0')

  def is_global(b, h, q_idx, kv_idx):
    del b, h
    return (q_idx < num_global) | (kv_idx < num_global)

  return is_global


def global_and_window(num_global: int, window: int) -> MaskMod:
  """Longformer / BigBird (without random keys): global tokens plus a bidirectional window of
  `window` keys on each side."""
  return or_masks(global_tokens(num_global), sliding_window(window, window))


__all__ = ['and_masks', 'causal', 'chunked', 'dilated', 'document', 'global_and_window',
           'global_tokens', 'or_masks', 'padding', 'prefix_lm', 'sliding_window']
