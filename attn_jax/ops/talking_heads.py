"""Talking-heads attention (Shazeer et al. 2020): heads exchange information through learned
`[heads, heads]` mixes of the logits before the softmax and of the weights after it.

    out = talking_heads_attention(q, k, v, pre_softmax=p_l, post_softmax=p_w, is_causal=True)

Both mixes act on whole `[q_len, kv_len]` maps, so the logits and the weights are materialized
(the dense path: no blockwise or fused kernel can take this attention). The order per head
`h` is: `J = q k^T * scale` for every head; `L_h = sum_g J_g P_l[g, h]`; the score function
(position biases, soft-cap, ...) on `L_h` as head `h`'s logits; masks; softmax; `W'_h = sum_g
W_g P_w[g, h]`; the mask again; dropout; `W'_h v_{kv(h)}`. Masks apply after the first mix,
so a masked logit never enters a softmax, and again after the second, so a head never reads a
key its own mask hides (another head's weight there, under a head-dependent mask).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attn_jax.ops import dropout as dropout_lib
from attn_jax.ops import scores as scores_lib
from attn_jax.ops.dense import apply_score_mod, masked_softmax, visible_mask
from attn_jax.ops.shapes import check_broadcastable, check_qkv


def talking_heads_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                            pre_softmax: jax.Array, post_softmax: jax.Array,
                            mask: jax.Array | None = None, is_causal: bool = False,
                            scale: float | None = None, segment_ids=None, local_window=None,
                            q_offset=0, mask_mod=None, score_mod=None,
                            dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                            return_weights: bool = False, precision=None):
  """Talking-heads attention; arguments as `dot_product_attention`'s.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]`; value `[batch, kv_len, kv_heads, v_dim]`.
    pre_softmax: float `[heads, heads]`, `P_l[g, h]`: how much of head g's logits head h
      takes (the identity gives plain attention).
    post_softmax: float `[heads, heads]`, `P_w[g, h]`, the same for the weights.

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype` (a row that sees nothing: zeros), and the
    mixed float32 weights `[batch, heads, q_len, kv_len]` with `return_weights`.
  """
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  for name, mix in (('pre_softmax', pre_softmax), ('post_softmax', post_softmax)):
    if mix.shape != (dims.heads, dims.heads):
      raise ValueError(f'talking heads: {name} must be [heads, heads] = '
                       f'{(dims.heads, dims.heads)}, got {mix.shape}')
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs dropout_rng')
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else scale
  logits = scores_lib.scaled_dot_scores(query, key, scale=scale, precision=precision)
  logits = jnp.einsum('bgts,gh->bhts', logits, pre_softmax.astype(jnp.float32),
                      precision=precision)  # [B, H, T, S]
  if score_mod is not None:
    logits = apply_score_mod(logits, score_mod, q_offset)
  visible, rows_may_be_empty = visible_mask(
      dims, mask=mask, is_causal=is_causal, local_window=local_window, segment_ids=segment_ids,
      q_offset=q_offset, mask_mod=mask_mod)
  weights = masked_softmax(logits, visible, rows_may_be_empty=rows_may_be_empty)
  weights = jnp.einsum('bgts,gh->bhts', weights, post_softmax.astype(jnp.float32),
                       precision=precision)
  if visible is not None:
    weights = jnp.where(visible, weights, 0.0)
  if dropout_rate > 0.0:
    weights = dropout_lib.dropout(weights, dropout_rate, dropout_rng)
  b, t, s, kh, g = dims.batch, dims.q_len, dims.kv_len, dims.kv_heads, dims.groups
  grouped = weights.reshape(b, kh, g * t, s).astype(value.dtype)  # query head h -> kv head h//g
  out = jnp.einsum('bkqs,bskd->bkqd', grouped, value, precision=precision,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, kh, g, t, dims.v_dim).transpose(0, 3, 1, 2, 4)
  out = out.reshape(b, t, dims.heads, dims.v_dim).astype(query.dtype)
  return (out, weights) if return_weights else out
