"""The dense (XLA) attention path: materializes `[batch, heads, q_len, kv_len]` logits.

Softmax runs in float32 whatever the input dtype, and a query that may attend to nothing
gets a zero output row (never NaN). Layout and arguments as `attention.dot_product_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax.ops import dropout as dropout_lib
from attn_jax.ops import keywords
from attn_jax.ops import masks as masks_lib
from attn_jax.ops import scores as scores_lib
from attn_jax.ops.mods import Mod
from attn_jax.ops.shapes import check_broadcastable, check_qkv, to_grouped


def masked_softmax(logits: jax.Array, mask: jax.Array | None,
                   rows_may_be_empty: bool = True) -> jax.Array:
  """Float32 softmax over the last axis; rows with no allowed entry become all zeros.

  Masked logits become the float32 minimum (finite, so a fully masked row gives a
  uniform softmax rather than NaN) and such rows are then zeroed; going through
  `jax.nn.softmax` keeps its custom derivative, cheaper in the backward than
  differentiating exp/sum/divide (`experiments/bench_attention.py --passes fwd+bwd`).
  `rows_may_be_empty=False` (e.g. a plain causal mask, where every query sees key 0)
  skips the row check, a pass over the mask.
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  if not rows_may_be_empty:
    return weights
  return weights * jnp.any(mask, axis=-1, keepdims=True)


def _sink_softmax(logits, mask, sinks):
  """Float32 softmax whose denominator also holds one logit per head, the sink (gpt-oss's
  attention sinks): `exp(l_j) / (exp(s) + sum_j exp(l_j))`; the sink carries no value, so
  the weights of a row sum to less than one and a row with no visible key gets zeros.

  `logits` `[B, H, T, S]`, `mask` broadcasting to it or None, `sinks` `[H]`.
  """
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None],
                          logits.shape[:3] + (1,))
  return jax.nn.softmax(jnp.concatenate([sink, logits], axis=-1), axis=-1)[..., 1:]


def _log_sum_exp(logits, mask, sinks):
  """float32 `[B, H, T]` log of each row's softmax denominator (-inf: nothing visible)."""
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None],
                            logits.shape[:3] + (1,))
    logits = jnp.concatenate([sink, logits], axis=-1)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.exp(logits - peak), axis=-1)
  seen = total > 0.0  # the where keeps an empty row's gradient 0, not NaN
  return jnp.where(seen, jnp.log(jnp.where(seen, total, 1.0)) + peak[..., 0], -jnp.inf)


def apply_score_mod(logits: jax.Array, score_mod, q_offset=0) -> jax.Array:
  """float32 `score_mod(logit, b, h, q_idx, kv_idx)` on every logit `[B, H, T, S]` (queries at
  positions `q_offset + i`, keys at `j`)."""
  b, h, t, s = logits.shape
  mod, consts = Mod.of_score(score_mod)
  return mod.grid(consts, jnp.arange(b), jnp.arange(h), jnp.arange(t) + q_offset,
                  jnp.arange(s), score=logits).astype(jnp.float32)


def visible_mask(dims, *, mask=None, is_causal=False, local_window=None, segment_ids=None,
                 q_offset=0, mask_mod=None, block_mask=None) -> tuple[jax.Array | None, bool]:
  """Which keys each query may see, from every mask argument of `dot_product_attention`:
  bool `[B|1, H|1, T, S]` (None: all), and whether a row may see nothing (only a plain causal
  mask with a static offset >= 0 is known to leave every query key 0)."""
  t, s = dims.q_len, dims.kv_len
  user_mask = None
  if mask_mod is not None:
    mod, consts = Mod.of_mask(mask_mod)
    user_mask = mod.grid(consts, jnp.arange(dims.batch), jnp.arange(dims.heads),
                         jnp.arange(t) + q_offset, jnp.arange(s))
  if block_mask is not None:
    user_mask = block_mask.dense()  # [Bm, Hm, T, S]: hidden blocks are False already
  combined = masks_lib.combine_masks(
      keywords.keyword_mask(dims, mask=mask, is_causal=is_causal, local_window=local_window,
                            segment_ids=segment_ids, q_offset=q_offset),
      user_mask)
  only_causal = (is_causal and mask is None and local_window is None and segment_ids is None
                 and user_mask is None and isinstance(q_offset, int) and q_offset >= 0)
  return combined, not only_causal


def dense_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                    segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                    bias_params=None, mask_mod=None, score_mod=None, block_mask=None,
                    sinks=None, return_lse=False, dropout_rate=0.0, dropout_rng=None,
                    return_weights=False, precision=None):
  """Materializes `[batch, heads, q_len, kv_len]` logits; see `dot_product_attention`."""
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  check_broadcastable('bias', bias, dims)
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else scale
  b, t, s, kh, g = dims.batch, dims.q_len, dims.kv_len, dims.kv_heads, dims.groups

  # Logits are [B, H, T, S] without GQA and [B, K, G, T, S] with it (a free reshape of
  # what `scaled_dot_scores` returns); a size-1 group axis alone costs extra work on
  # XLA:CPU, so it is not added.
  def grouped(x):
    return x if g == 1 else to_grouped(x, dims)

  logits = grouped(scores_lib.scaled_dot_scores(query, key, scale=scale, precision=precision))
  if bias is not None:
    logits = logits + grouped(bias).astype(jnp.float32)
  score_mod = keywords.with_position_bias(score_mod, bias_fn, bias_params)
  if block_mask is not None:
    q_offset = block_mask.q_offset
  if score_mod is not None:
    logits = grouped(apply_score_mod(logits.reshape(b, dims.heads, t, s), score_mod, q_offset))
  combined, rows_may_be_empty = visible_mask(
      dims, mask=mask, is_causal=is_causal, local_window=local_window, segment_ids=segment_ids,
      q_offset=q_offset, mask_mod=mask_mod, block_mask=block_mask)
  grouped_mask = None if combined is None else grouped(combined)
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (dims.heads,):
      raise ValueError(f'sinks must be one logit per query head, [{dims.heads}], got '
                       f'{sinks.shape}')
    flat_mask = None if combined is None else combined
    weights = grouped(_sink_softmax(logits.reshape(b, dims.heads, t, s), flat_mask, sinks))
  else:
    weights = masked_softmax(logits, grouped_mask, rows_may_be_empty=rows_may_be_empty)
  lse = None
  if return_lse:
    lse = _log_sum_exp(logits.reshape(b, dims.heads, t, s), combined, sinks)

  if dropout_rate > 0.0:
    weights = dropout_lib.dropout(weights, dropout_rate, dropout_rng)
  if g == 1:
    out = jnp.einsum('bhts,bshd->bthd', weights.astype(value.dtype), value,
                     precision=precision, preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum('bkqs,bskd->bkqd', weights.astype(value.dtype).reshape(b, kh, g * t, s),
                     value, precision=precision, preferred_element_type=jnp.float32)
    out = out.reshape(b, kh, g, t, dims.v_dim).transpose(0, 3, 1, 2, 4)
  out = out.reshape(b, t, dims.heads, dims.v_dim).astype(query.dtype)
  extras = ([weights.reshape(b, dims.heads, t, s)] if return_weights else []) + (
      [lse] if return_lse else [])
  return (out, *extras) if extras else out
