"""Softmax attention: input checks, the dense (XLA) path, and the dispatcher.

Layout: q `[batch, q_len, heads, head_dim]`, k `[batch, kv_len, kv_heads, head_dim]`,
v `[batch, kv_len, kv_heads, v_dim]`, with `heads` a multiple of `kv_heads`
(GQA; `kv_heads=1` is MQA). Query head `h` reads k/v head `h // (heads // kv_heads)`.
Masks broadcast to `[batch, heads, q_len, kv_len]`, True = attend; biases are added
to the logits. Softmax runs in float32 whatever the input dtype, and a query that
may attend to nothing gets a zero output row (never NaN).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from attn_jax.ops import masks as masks_lib

Implementation = Literal['dense', 'blockwise', 'cudnn'] | None
BiasFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# From this many logits per (batch, head) -- q_len * kv_len -- the dispatcher
# takes the blockwise path on CPU. Measured with experiments/bench_attention.py
# (README, "Attention kernels on CPU"; 8 heads, head_dim 64, fp32): blockwise is
# already faster than dense at 256 tokens (fwd+bwd 4.5 vs 7.1 ms, causal 5.0 vs
# 7.3 ms), 2x at 1024 and 2.7x at 2048, with O(length) memory. Below it a single
# block is the whole problem and dense is as fast.
BLOCKWISE_MIN_LOGITS = 256 * 256
# Elsewhere (GPU/TPU without cuDNN's fused kernel) XLA's dense attention is fast
# and the blockwise loop is not measured here: switch only once the logits get
# big (2048^2 floats per head = 16 MiB).
BLOCKWISE_MIN_LOGITS_ACCELERATOR = 2048 * 2048


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


def masked_softmax(logits: jax.Array, mask: jax.Array | None,
                   rows_may_be_empty: bool = True) -> jax.Array:
  """Float32 softmax over the last axis; rows with no allowed entry become all zeros.

  Masked logits become the float32 minimum (finite, so a fully masked row gives a
  uniform softmax rather than NaN) and such rows are then zeroed; going through
  `jax.nn.softmax` keeps its cheaper custom derivative (~15% faster backward than
  differentiating exp/sum/divide). `rows_may_be_empty=False` (e.g. a plain causal
  mask, where every query sees key 0) skips the row check, a pass over the mask.
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  if not rows_may_be_empty:
    return weights
  return weights * jnp.any(mask, axis=-1, keepdims=True)


def dense_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                    segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                    bias_params=None, dropout_rate=0.0, dropout_rng=None, return_weights=False,
                    precision=None):
  """Materializes `[batch, heads, q_len, kv_len]` logits; see `dot_product_attention`."""
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  check_broadcastable('bias', bias, dims)
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else scale
  b, t, s, kh, g = dims.batch, dims.q_len, dims.kv_len, dims.kv_heads, dims.groups

  # Logits are [B, H, T, S] without GQA and [B, K, G, T, S] with it; a size-1
  # group axis alone costs ~17% forward+backward on CPU, so it is not added.
  def grouped(x):
    return x if g == 1 else to_grouped(x, dims)

  if g == 1:
    logits = jnp.einsum('bthd,bshd->bhts', query, key, precision=precision,
                        preferred_element_type=jnp.float32)
  else:
    # Query heads sharing a k/v head are stacked along the query axis, so both
    # matmuls are plain [q, d] x [d, kv] per (batch, kv head) and the logits come
    # out row-major as [B, K, G, T, S]: no k/v copies for GQA, and no transposed
    # copy of the logits (a 5-D einsum straight to [B, K, G, T, S] costs ~1.5x).
    stacked_q = query.reshape(b, t, kh, g, dims.head_dim).transpose(0, 2, 3, 1, 4)
    stacked_q = stacked_q.reshape(b, kh, g * t, dims.head_dim)
    logits = jnp.einsum('bkqd,bskd->bkqs', stacked_q, key, precision=precision,
                        preferred_element_type=jnp.float32).reshape(b, kh, g, t, s)
  logits = logits * jnp.float32(scale)
  if bias is not None:
    logits = logits + grouped(bias).astype(jnp.float32)
  if bias_fn is not None:
    q_pos = jnp.arange(t) + q_offset
    fn_bias = bias_fn(bias_params, q_pos, jnp.arange(s))[None]  # [1, heads|1, t, s]
    check_broadcastable('bias_fn output', fn_bias, dims)
    logits = logits + grouped(fn_bias)

  combined = masks_lib.combine_masks(
      mask,
      masks_lib.causal_mask(t, s, q_offset) if is_causal else None,
      masks_lib.local_mask(t, s, local_window, q_offset) if local_window is not None else None,
      masks_lib.segment_mask(q_seg, kv_seg) if q_seg is not None else None)
  # Only a plain causal mask with a non-negative static offset is known to leave
  # every query some key (key 0).
  only_causal = (is_causal and mask is None and local_window is None and q_seg is None
                 and isinstance(q_offset, int) and q_offset >= 0)
  weights = masked_softmax(logits, None if combined is None else grouped(combined),
                           rows_may_be_empty=not only_causal)

  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  if g == 1:
    out = jnp.einsum('bhts,bshd->bthd', weights.astype(value.dtype), value,
                     precision=precision, preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum('bkqs,bskd->bkqd', weights.astype(value.dtype).reshape(b, kh, g * t, s),
                     value, precision=precision, preferred_element_type=jnp.float32)
    out = out.reshape(b, kh, g, t, dims.v_dim).transpose(0, 3, 1, 2, 4)
  out = out.reshape(b, t, dims.heads, dims.v_dim).astype(query.dtype)
  if return_weights:
    return out, weights.reshape(b, dims.heads, t, s)
  return out


def _cudnn_attention(query, key, value, *, bias, mask, is_causal, scale, segment_ids,
                     local_window, q_offset):
  """cuDNN fused attention via `jax.nn.dot_product_attention` (GPU only)."""
  if not (isinstance(q_offset, int) and q_offset == 0):
    raise ValueError("implementation='cudnn' supports only q_offset=0")
  dims = check_qkv(query, key, value)
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  seg = masks_lib.segment_mask(q_seg, kv_seg) if q_seg is not None else None
  return jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=masks_lib.combine_masks(mask, seg), scale=scale,
      is_causal=is_causal, local_window_size=local_window, implementation='cudnn')


def choose_implementation(query, key, *, return_weights: bool, dropout_rate: float,
                          bias_fn, q_offset) -> str:
  """The path `implementation=None` takes; see `dot_product_attention`."""
  if return_weights:
    return 'dense'
  on_gpu = jax.default_backend() == 'gpu'
  cudnn_ok = (on_gpu and query.dtype in (jnp.bfloat16, jnp.float16) and query.shape[-1] <= 128
              and query.shape[-1] % 8 == 0 and dropout_rate == 0.0 and bias_fn is None
              and isinstance(q_offset, int) and q_offset == 0)
  if cudnn_ok:
    return 'cudnn'
  threshold = BLOCKWISE_MIN_LOGITS if jax.default_backend() == 'cpu' else (
      BLOCKWISE_MIN_LOGITS_ACCELERATOR)
  if query.shape[1] * key.shape[1] >= threshold:
    return 'blockwise'
  return 'dense'


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    local_window: int | tuple[int, int] | None = None,
    q_offset: int | jax.Array = 0,
    bias_fn: BiasFn | None = None,
    bias_params: Any = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
    implementation: Implementation = None,
    block_size: int | tuple[int, int] | None = None,
    precision: Any = None,
):
  """Scaled dot-product attention `softmax(q k^T * scale + bias) v`.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    value: `[batch, kv_len, kv_heads, v_dim]`.
    bias: additive logits bias broadcasting to `[batch, heads, q_len, kv_len]`.
    mask: bool, broadcasting to `[batch, heads, q_len, kv_len]`; True = attend.
    is_causal: key `j` visible to query `i` iff `j <= i + q_offset`.
    scale: logits scale; default `1/sqrt(head_dim)`.
    segment_ids: int `[batch, len]` for packed self-attention, or a
      `(q_segment_ids, kv_segment_ids)` pair; attend only within equal ids.
    local_window: `(left, right)` (or symmetric int): query `i` sees keys
      `i + q_offset - left ... i + q_offset + right`.
    q_offset: absolute position of query 0 relative to key 0 (int or traced
      scalar): the cache index during incremental decoding.
    bias_fn: position bias `fn(bias_params, q_positions [q], kv_positions [kv])
      -> [heads|1, q, kv]` (see `positional.alibi_bias`,
      `positional.relative_position_bias`); the blockwise path evaluates it per
      block and differentiates `bias_params`.
    dropout_rate: attention-weight dropout; needs `dropout_rng`.
    return_weights: also return float32 weights `[batch, heads, q_len, kv_len]`
      (forces the dense path).
    implementation: 'dense' (XLA, materializes logits), 'blockwise'
      (memory-efficient online softmax, `blockwise.py`), 'cudnn' (GPU fused
      kernel through `jax.nn.dot_product_attention`), or None: cuDNN on GPU for
      bf16/fp16 inputs it supports, else blockwise once `q_len * kv_len` reaches
      `BLOCKWISE_MIN_LOGITS` (CPU; `BLOCKWISE_MIN_LOGITS_ACCELERATOR` elsewhere),
      else dense.
    block_size: blockwise `(q_block, kv_block)` or one int for both.

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype`, and the weights if asked.
    With dropout the dense and blockwise paths draw different (equally valid)
    dropout masks.
  """
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  check_broadcastable('bias', bias, dims)
  if mask is not None and mask.dtype != jnp.bool_:
    raise ValueError(f'mask must be boolean (True = attend), got dtype {mask.dtype}; '
                     'pass additive masks as bias=')
  local_window = masks_lib.normalize_window(local_window)
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}')
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs dropout_rng')
  if implementation is None:
    implementation = choose_implementation(
        query, key, return_weights=return_weights, dropout_rate=dropout_rate, bias_fn=bias_fn,
        q_offset=q_offset)
  common = dict(bias=bias, mask=mask, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                local_window=local_window, q_offset=q_offset)
  if implementation == 'dense':
    return dense_attention(query, key, value, **common, bias_fn=bias_fn, bias_params=bias_params,
                           dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                           return_weights=return_weights, precision=precision)
  if return_weights:
    raise ValueError(f"return_weights needs implementation='dense', got {implementation!r}")
  if implementation == 'blockwise':
    from attn_jax.ops import blockwise  # Late import: blockwise imports this module.
    return blockwise.blockwise_attention(
        query, key, value, **common, bias_fn=bias_fn, bias_params=bias_params,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, block_size=block_size,
        precision=precision)
  if implementation == 'cudnn':
    if bias_fn is not None or dropout_rate > 0.0:
      raise ValueError("implementation='cudnn' supports neither bias_fn nor dropout")
    return _cudnn_attention(query, key, value, **common)
  raise ValueError(
      f"implementation must be 'dense', 'blockwise', 'cudnn' or None, got {implementation!r}")
