"""Softmax attention: the public entry point and the dispatcher between implementations.

Layout (`shapes.py`): q `[batch, q_len, heads, head_dim]`, k `[batch, kv_len, kv_heads,
head_dim]`, v `[batch, kv_len, kv_heads, v_dim]`, with `heads` a multiple of `kv_heads`
(GQA; `kv_heads=1` is MQA). Masks broadcast to `[batch, heads, q_len, kv_len]`, True =
attend; biases are added to the logits. Softmax runs in float32 whatever the input dtype,
and a query that may attend to nothing gets a zero output row (never NaN).

Implementations: `dense.py` (XLA, materializes the logits), `blockwise.py` (online softmax
over key/value blocks, custom VJP), cuDNN through `jax.nn.dot_product_attention` (GPU), and
`kernels/` (fused Pallas flash attention for GPU and TPU, open to mask/score functions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from attn_jax.ops import blockwise, kernels, keywords
from attn_jax.ops import masks as masks_lib
from attn_jax.ops.block_mask import BlockMask
from attn_jax.ops.dense import dense_attention
from attn_jax.ops.mods import MaskMod, ScoreMod
from attn_jax.ops.shapes import Dims, check_broadcastable, check_qkv, split_segment_ids

Implementation = Literal['dense', 'blockwise', 'cudnn', 'pallas'] | None
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


def _visible_rows(dims: Dims, *, mask, is_causal, local_window, segment_ids, q_offset):
  """bool `[B|1, T|1, H|1]`: whether each query row may see some key, or None when every
  row is known to (no mask; a plain causal mask from position 0; self-attention segments)."""
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  self_segments = q_seg is None or (segment_ids is not None
                                    and not isinstance(segment_ids, tuple | list))
  plain_causal = isinstance(q_offset, int) and q_offset >= 0 and local_window is None
  if mask is None and self_segments and (plain_causal or not is_causal) and (
      local_window is None):
    return None
  combined = keywords.keyword_mask(dims, mask=mask, is_causal=is_causal,
                                   local_window=local_window, segment_ids=segment_ids,
                                   q_offset=q_offset)
  return jnp.swapaxes(jnp.any(combined, axis=-1), 1, 2)  # [B|1, T|1, H|1]


def fused_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                    segment_ids=None, local_window=None, q_offset=0, implementation='cudnn'):
  """cuDNN's fused kernel through `jax.nn.dot_product_attention`, keeping attn_jax's promise
  that a query which may attend to nothing gets zeros: `jax.nn` (and cuDNN) return the mean
  of the values for such a row, so those rows are zeroed here. `implementation='xla'` runs
  the same wrapper on any backend (the tests check the zero rows on CPU)."""
  if not (isinstance(q_offset, int) and q_offset == 0):
    raise ValueError("implementation='cudnn' supports only q_offset=0")
  dims = check_qkv(query, key, value)
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  seg = masks_lib.segment_mask(q_seg, kv_seg) if q_seg is not None else None
  out = jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=masks_lib.combine_masks(mask, seg), scale=scale,
      is_causal=is_causal, local_window_size=local_window, implementation=implementation)
  visible = _visible_rows(dims, mask=mask, is_causal=is_causal, local_window=local_window,
                          segment_ids=segment_ids, q_offset=q_offset)
  return out if visible is None else jnp.where(visible[..., None], out, 0).astype(out.dtype)


def choose_implementation(query, key, *, return_weights: bool, dropout_rate: float,
                          bias_fn, q_offset, open_attention: bool = False,
                          backend: str | None = None, pallas_ok: bool = False) -> str:
  """The path `implementation=None` takes; see `dot_product_attention`.

  Args:
    open_attention: the call uses a mask/score function, a block mask, sinks or asks for the
      lse, which cuDNN does not implement.
    backend: 'cpu' | 'gpu' | 'tpu'; default `jax.default_backend()` (tests pass one).
    pallas_ok: the fused Pallas kernels take the call (`kernels.unsupported_reason` is None);
      on GPU and TPU they then run every open-attention call and every long one.
  """
  if return_weights:
    return 'dense'
  backend = backend or jax.default_backend()
  cudnn_ok = (backend == 'gpu' and query.dtype in (jnp.bfloat16, jnp.float16)
              and query.shape[-1] <= 128 and query.shape[-1] % 8 == 0 and dropout_rate == 0.0
              and bias_fn is None and not open_attention
              and isinstance(q_offset, int) and q_offset == 0)
  if cudnn_ok:
    return 'cudnn'
  long = query.shape[1] * key.shape[1] >= BLOCKWISE_MIN_LOGITS_ACCELERATOR
  if pallas_ok and backend in ('gpu', 'tpu') and (open_attention or long):
    return 'pallas'
  threshold = BLOCKWISE_MIN_LOGITS if backend == 'cpu' else BLOCKWISE_MIN_LOGITS_ACCELERATOR
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
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    sinks: jax.Array | None = None,
    return_lse: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_weights: bool = False,
    implementation: Implementation = None,
    block_size: int | tuple[int, int] | None = None,
    precision: Any = None,
):
  """Scaled dot-product attention `softmax(score_mod(q k^T * scale + bias)) v`.

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
    mask_mod: `mask_mod(b, h, q_idx, kv_idx) -> bool`, written for scalars of
      absolute positions (see `mods.py`, `mask_mods.py`); ANDed with the masks above.
    score_mod: `score_mod(score, b, h, q_idx, kv_idx) -> score` on the scaled logit,
      after `bias`/`bias_fn` (see `score_mods.py`); floating arrays it closes over get
      gradients.
    block_mask: a prebuilt `ops.block_mask(mask_mod, ...)`, reused across calls; then
      no other mask argument (nor `q_offset`) is given here.
    sinks: float `[heads]`, one learned logit per head that joins every row's softmax
      denominator and carries no value (attention sinks, as in gpt-oss).
    return_lse: also return the float32 row log-sum-exp `[batch, heads, q_len]` of the
      softmax denominator (-inf for a row that sees nothing), for `merge_attention`.
    dropout_rate: attention-weight dropout; needs `dropout_rng`.
    return_weights: also return float32 weights `[batch, heads, q_len, kv_len]`
      (forces the dense path).
    implementation: 'dense' (XLA, materializes logits), 'blockwise'
      (memory-efficient online softmax that skips the blocks a mask hides,
      `blockwise.py`), 'cudnn' (GPU fused kernel through
      `jax.nn.dot_product_attention`, rows that see nothing zeroed), 'pallas' (fused
      flash attention with the mask/score functions inside, Triton on GPU and Mosaic on
      TPU, interpreted on CPU; `kernels/`), or None: cuDNN on GPU for bf16/fp16 inputs it
      supports without mask/score functions; on GPU/TPU the Pallas kernels for every other
      open-attention call they take and once `q_len * kv_len` reaches
      `BLOCKWISE_MIN_LOGITS_ACCELERATOR`; else blockwise once `q_len * kv_len` reaches
      `BLOCKWISE_MIN_LOGITS` (CPU; `BLOCKWISE_MIN_LOGITS_ACCELERATOR` elsewhere), else
      dense.
    block_size: blockwise `(q_block, kv_block)` or one int for both; for 'pallas' the
      block mask's visit block (default `kernels.VISIT_BLOCK`).

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype`, then the weights and the lse if
    asked. A query that may attend to nothing gets zeros on every path. With dropout
    the dense and blockwise paths draw different (equally valid) dropout masks.
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
  # A position bias takes the score-function path, whatever the implementation.
  score_mod = keywords.with_position_bias(score_mod, bias_fn, bias_params)
  bias_fn = bias_params = None
  open_attention = (mask_mod is not None or score_mod is not None or block_mask is not None
                    or sinks is not None or return_lse)
  common = dict(bias=bias, mask=mask, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                local_window=local_window, q_offset=q_offset)
  opened = dict(mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask, sinks=sinks,
                return_lse=return_lse)
  if implementation is None:
    pallas_ok = False
    if not return_weights and jax.default_backend() in ('gpu', 'tpu'):
      pallas_ok = kernels.unsupported_reason(
          query, key, value, **common, mask_mod=mask_mod, score_mod=score_mod,
          block_mask=block_mask, sinks=sinks, bias_fn=bias_fn, bias_params=bias_params,
          dropout_rate=dropout_rate, block_size=block_size, precision=precision) is None
    implementation = choose_implementation(
        query, key, return_weights=return_weights, dropout_rate=dropout_rate, bias_fn=bias_fn,
        q_offset=q_offset, open_attention=open_attention, pallas_ok=pallas_ok)
  if implementation == 'dense':
    if block_mask is not None:
      blockwise.check_block_mask_call(block_mask, dims, mask=mask, is_causal=is_causal,
                                      local_window=local_window, segment_ids=segment_ids,
                                      mask_mod=mask_mod, q_offset=q_offset, block_size=None)
    return dense_attention(query, key, value, **common, **opened, bias_fn=bias_fn,
                           bias_params=bias_params, dropout_rate=dropout_rate,
                           dropout_rng=dropout_rng, return_weights=return_weights,
                           precision=precision)
  if return_weights:
    raise ValueError(f"return_weights needs implementation='dense', got {implementation!r}")
  if implementation == 'blockwise':
    return blockwise.blockwise_attention(
        query, key, value, **common, **opened, bias_fn=bias_fn, bias_params=bias_params,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, block_size=block_size,
        precision=precision)
  if implementation == 'cudnn':
    if bias_fn is not None or dropout_rate > 0.0 or open_attention:
      raise ValueError("implementation='cudnn' supports no bias_fn, dropout, mask_mod, "
                       'score_mod, block_mask, sinks or return_lse')
    return fused_attention(query, key, value, **common)
  if implementation == 'pallas':
    return kernels.pallas_attention(
        query, key, value, **common, **opened, bias_fn=bias_fn, bias_params=bias_params,
        dropout_rate=dropout_rate, block_size=block_size, precision=precision)
  raise ValueError("implementation must be 'dense', 'blockwise', 'cudnn', 'pallas' or None, "
                   f'got {implementation!r}')


def merge_attention(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Exactly combines attention over two disjoint key sets into attention over their union:
  the building block of chunked, ring and cached attention.

  Each part is `dot_product_attention(..., return_lse=True)` over its keys: softmax over the
  union reweights each part's output by its share of the joint normalizer,
  `exp(lse_part - lse)`. Differentiable in all four inputs. (Give attention sinks to one
  part only, or their mass is counted twice.)

  Args:
    out_a, out_b: `[batch, q_len, heads, v_dim]`.
    lse_a, lse_b: float32 `[batch, heads, q_len]`, -inf where a part saw no key.

  Returns:
    `(out [batch, q_len, heads, v_dim] in out_a's dtype, lse [batch, heads, q_len])`; a row
    that saw nothing in either part gets zeros and -inf.
  """
  if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
    raise ValueError(f'merge_attention: parts differ: out {out_a.shape} vs {out_b.shape}, lse '
                     f'{lse_a.shape} vs {lse_b.shape}')
  b, t, h = out_a.shape[:3]
  if lse_a.shape != (b, h, t):
    raise ValueError(f'merge_attention: lse must be [batch, heads, q_len] = {(b, h, t)}, got '
                     f'{lse_a.shape}')
  lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
  peak = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  w_a, w_b = jnp.exp(lse_a - peak), jnp.exp(lse_b - peak)
  total = w_a + w_b
  seen = total > 0.0
  total = jnp.where(seen, total, 1.0)  # the wheres keep gradients finite for empty rows
  lse = jnp.where(seen, jnp.log(total) + peak, -jnp.inf)
  share = lambda w: jnp.swapaxes(w / total, 1, 2)[..., None]  # noqa: E731  [B, T, H, 1]
  out = share(w_a) * out_a.astype(jnp.float32) + share(w_b) * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype), lse
