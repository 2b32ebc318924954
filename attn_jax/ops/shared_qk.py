"""Shared query-key attention (Kitaev et al. 2020, Reformer, Section 2 "Shared-QK Transformer").

One projection serves queries and keys: the keys are the queries, L2-normalized,

    logits_ij = q_i . q_j / |q_j| * scale        (scale 1 by default: see below)

and a position does not attend to itself unless it has no other visible key: its own logit
gets `-SELF_PENALTY`, as Reformer does, rather than a mask, so a position whose only visible
key is itself (the first token of a causal sequence) still attends to it with weight 1.

Scale: keys of unit length make `q . k_hat` the query's length times a cosine; HuggingFace's
Reformer (`_len_and_dim_norm`) takes that logit as it is, without `1/sqrt(head_dim)` (its keys
are RMS-normalized and then divided by `sqrt(head_dim)`, i.e. of unit length), and so does
`shared_qk_attention` unless given `scale`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn_jax.ops.attention import dot_product_attention
from attn_jax.ops.mods import ScoreMod
from attn_jax.ops.score_mods import chain

# Reformer's value: exp(-1e5) is 0 in float32, so the self-logit only counts when no other
# key is visible (then the softmax normalizes it back to weight 1).
SELF_PENALTY = 1e5


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / sqrt(|x|^2 + eps)` over the last axis (the head dimension), computed in float32 and
  returned in `x.dtype`; `eps` keeps a zero vector finite (and its gradient too)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def exclude_self(penalty: float = SELF_PENALTY) -> ScoreMod:
  """score_mod `score - penalty` where `q_idx == kv_idx` (a position's own key): it gets no
  weight unless it is the only visible key. Apply it last (after soft-capping, which would
  otherwise bound the penalty)."""
  def no_self(score, b, h, q_idx, kv_idx):
    del b, h
    return jnp.where(q_idx == kv_idx, score - penalty, score)

  return no_self


def shared_qk_attention(query: jax.Array, value: jax.Array, *, scale: float | None = 1.0,
                        score_mod: ScoreMod | None = None, **attention_kwargs):
  """Reformer's shared-QK attention: `softmax(q (q / |q|)^T * scale - penalty * I) v`.

  Args:
    query: `[batch, len, heads, head_dim]`; the keys are `l2_normalize(query)`, so queries and
      keys share their positions (self-attention; with `q_offset`, query `i` and key `i +
      q_offset` are the same position, as in cached decoding where the cache holds the
      normalized queries).
    value: `[batch, len, heads, v_dim]`.
    scale: logits scale (default 1, see the module docstring).
    score_mod: a user score function, applied before the self penalty.
    **attention_kwargs: the rest of `ops.dot_product_attention`'s arguments (masks, causal,
      implementation, ...).

  Returns:
    As `ops.dot_product_attention`.
  """
  if query.shape[:3] != value.shape[:3]:
    raise ValueError(f'shared_qk_attention: query {query.shape} and value {value.shape} must '
                     'share batch, length and heads (the keys are the queries)')
  return dot_product_attention(query, l2_normalize(query), value, scale=scale,
                               score_mod=chain(score_mod, exclude_self()), **attention_kwargs)
