"""Softmax attention: the public entry point and the dispatcher between implementations.

Layout (`shapes.py`): q `[batch, q_len, heads, head_dim]`, k `[batch, kv_len, kv_heads,
head_dim]`, v `[batch, kv_len, kv_heads, v_dim]`, with `heads` a multiple of `kv_heads`
(GQA; `kv_heads=1` is MQA). Masks broadcast to `[batch, heads, q_len, kv_len]`, True =
attend; biases are added to the logits. Softmax runs in float32 whatever the input dtype,
and a query that may attend to nothing gets a zero output row (never NaN).

Implementations: `dense.py` (XLA, materializes the logits), `blockwise.py` (online softmax
over key/value blocks, custom VJP), and cuDNN through `jax.nn.dot_product_attention` (GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from attn_jax.ops import blockwise
from attn_jax.ops import masks as masks_lib
from attn_jax.ops.dense import dense_attention
from attn_jax.ops.shapes import check_broadcastable, check_qkv, split_segment_ids

Implementation = Literal['dense', 'blockwise', 'cudnn'] | None
BiasFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# From this many logits per (batch, head) -- q_len * kv_len -- the dispatcher
# takes the blockwise path on CPU: the crossover where blockwise overtakes dense
# in `experiments/bench_attention.py --lengths 256,512,1024` (figures in the
# README, "Attention kernels on CPU"). Below it one block is the whole problem.
BLOCKWISE_MIN_LOGITS = 256 * 256
# Elsewhere (GPU/TPU without cuDNN's fused kernel) XLA's dense attention is fast
# and the blockwise loop is not benchmarked: switch only once the logits get big
# (2048^2 floats per head = 16 MiB).
BLOCKWISE_MIN_LOGITS_ACCELERATOR = 2048 * 2048


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
