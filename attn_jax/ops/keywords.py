"""The keyword arguments of `dot_product_attention` as one mask and one score function.

Every implementation sees a call's built-in masks (`mask`, `is_causal`, `local_window`,
`segment_ids`, `q_offset`) and position biases (`bias_fn`) through this module, in one of two
forms:

- `keyword_mask(...)`: one bool array `[B|1, H|1, T, S]` (the dense, cuDNN and kernelized
  paths, which materialize the logits anyway);
- `keyword_mask_mod(...)`: one `mask_mod` with the user's function ANDed in (the blockwise
  loop, the fused kernels and ring attention, which evaluate masks per block); causal masks
  and windows stay `Band`s, so hidden blocks are found from block corners;
- `with_position_bias(score_mod, bias_fn, bias_params)`: a `bias_fn` as the first score
  function, so position biases take the score-function path on every implementation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import mask_mods, score_mods
from attn_jax.ops import masks as masks_lib
from attn_jax.ops.mods import and_masks
from attn_jax.ops.shapes import Dims, split_segment_ids


def keyword_mask(dims: Dims, *, mask=None, is_causal: bool = False, local_window=None,
                 segment_ids=None, q_offset: Any = 0) -> jax.Array | None:
  """The built-in mask arguments as one bool array broadcasting to `[B, H, T, S]` (None: no
  mask); `local_window` as normalized `(left, right)` or None."""
  t, s = dims.q_len, dims.kv_len
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  return masks_lib.combine_masks(
      mask,
      masks_lib.causal_mask(t, s, q_offset) if is_causal else None,
      masks_lib.local_mask(t, s, local_window, q_offset) if local_window is not None else None,
      masks_lib.segment_mask(q_seg, kv_seg) if q_seg is not None else None)


def _array_mask(mask: jax.Array, q_offset) -> Any:
  """A dense bool `[B|1, H|1, T|1, S|1]` mask as a mask_mod (queries indexed from `q_offset`)."""
  def from_array(b, h, q_idx, kv_idx):
    return mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0,
                q_idx - q_offset if mask.shape[2] > 1 else 0,
                kv_idx if mask.shape[3] > 1 else 0]
  return from_array


def _segment_mask(q_seg: jax.Array, kv_seg: jax.Array, q_offset) -> Any:
  """Packed segments as a mask_mod (query ids indexed from `q_offset`)."""
  def same_segment(b, h, q_idx, kv_idx):
    del h
    return q_seg[b, q_idx - q_offset] == kv_seg[b, kv_idx]
  return same_segment


def keyword_mask_mod(*, dims: Dims, mask=None, is_causal: bool = False, local_window=None,
                     segment_ids=None, mask_mod=None, q_offset: Any = 0) -> Any:
  """The built-in mask arguments and a user `mask_mod` as one mask_mod (None: no mask)."""
  q_seg, kv_seg = split_segment_ids(segment_ids, dims)
  window = masks_lib.normalize_window(local_window)
  return and_masks(
      mask_mods.causal() if is_causal else None,
      mask_mods.sliding_window(*window) if window is not None else None,
      _segment_mask(q_seg, kv_seg, q_offset) if q_seg is not None else None,
      _array_mask(mask, q_offset) if mask is not None else None,
      mask_mod)


def position_bias_score(bias_fn, bias_params) -> Any:
  """A `bias_fn(params, q_positions, kv_positions) -> [heads|1, q, kv]` as a score_mod."""
  def with_bias(score, b, h, q_idx, kv_idx):
    del b
    bias = bias_fn(bias_params, q_idx[None], kv_idx[None])  # [heads|1, 1, 1]
    return score + bias[jnp.minimum(h, bias.shape[0] - 1), 0, 0].astype(jnp.float32)
  return with_bias


def with_position_bias(score_mod: Any, bias_fn: Any, bias_params: Any) -> Any:
  """The score function of a call: its `bias_fn` first (if any), then `score_mod` (which may
  cap the sum)."""
  bias = position_bias_score(bias_fn, bias_params) if bias_fn is not None else None
  return score_mods.chain(bias, score_mod)
