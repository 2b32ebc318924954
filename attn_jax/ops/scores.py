"""Attention score (compatibility) functions: every way attn_jax turns a query and a key into
a logit. The Transformer's scaled dot product (`scaled_dot_scores`, which the dense path of
`dot_product_attention` calls) and the RNN attention scores of Luong (dot, general) and
Bahdanau (additive) live here. The blockwise path computes the same scaled dot product per
block, inside its kernel.

All take queries `[..., q_len, heads, d_q]` and keys `[..., kv_len, kv_heads, d_k]`
(use `heads=1` for single-head/RNN attention) and return logits
`[..., heads, q_len, kv_len]` in float32 unless `dtype` says otherwise. The dot products
accept grouped keys (`heads` a multiple of `kv_heads`: GQA/MQA, query head `h` reads key
head `h // (heads // kv_heads)`); the others need `kv_heads == heads`. Parameters are
explicit arguments so the functions stay pure; `attn_jax.models` owns them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_qk(name: str, q: jax.Array, k: jax.Array, same_dim: bool = True,
              grouped: bool = False) -> None:
  if q.ndim < 3 or k.ndim != q.ndim:
    raise ValueError(
        f'{name}: expected q [..., q_len, heads, dim] and k [..., kv_len, heads, dim] of equal '
        f'rank >= 3, got {q.shape} and {k.shape}')
  heads, kv_heads = q.shape[-2], k.shape[-2]
  heads_ok = heads == kv_heads or (grouped and kv_heads > 0 and heads % kv_heads == 0)
  if q.shape[:-3] != k.shape[:-3] or not heads_ok:
    raise ValueError(f'{name}: batch/head dims of q {q.shape} and k {k.shape} differ' + (
        ' (q heads must be a multiple of k heads)' if grouped else ''))
  if same_dim and q.shape[-1] != k.shape[-1]:
    raise ValueError(f'{name}: head_dim of q {q.shape} and k {k.shape} differ')


def dot_scores(q: jax.Array, k: jax.Array, *, dtype=jnp.float32, precision=None) -> jax.Array:
  """`q . k` (Luong "dot"): `[..., heads, q_len, kv_len]`; k may have fewer (grouped) heads."""
  _check_qk('dot_scores', q, k, grouped=True)
  *lead, t, heads, d = q.shape
  s, kv_heads = k.shape[-3], k.shape[-2]
  if heads == kv_heads:
    return jnp.einsum('...qhd,...khd->...hqk', q, k, precision=precision,
                      preferred_element_type=dtype)
  # Query heads sharing a key head are stacked along the query axis, so the product is a
  # plain [g*q, d] x [d, kv] matmul per key head: no copies of k, and the result comes out
  # row-major as [..., kv_heads, groups, q, kv], i.e. [..., heads, q, kv] after a free reshape.
  g = heads // kv_heads
  n = len(lead)
  stacked = q.reshape(*lead, t, kv_heads, g, d)
  stacked = jnp.moveaxis(stacked, n, n + 2).reshape(*lead, kv_heads, g * t, d)
  logits = jnp.einsum('...kqd,...skd->...kqs', stacked, k, precision=precision,
                      preferred_element_type=dtype)
  return logits.reshape(*lead, heads, t, s)


def scaled_dot_scores(q: jax.Array, k: jax.Array, *, scale: float | None = None,
                      dtype=jnp.float32, precision=None) -> jax.Array:
  """`q . k * scale`, scale `1/sqrt(head_dim)` by default (Vaswani et al. 2017)."""
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  return dot_scores(q, k, dtype=dtype, precision=precision) * scale


def general_scores(q: jax.Array, k: jax.Array, w: jax.Array, *, dtype=jnp.float32,
                   precision=None) -> jax.Array:
  """Bilinear `q W k^T` (Luong et al. 2015, "general").

  Args:
    w: `[d_q, d_k]` shared by all heads, or `[heads, d_q, d_k]`.
  """
  _check_qk('general_scores', q, k, same_dim=False)
  d_q, d_k, heads = q.shape[-1], k.shape[-1], q.shape[-2]
  if w.shape not in ((d_q, d_k), (heads, d_q, d_k)):
    raise ValueError(
        f'general_scores: w must be [{d_q}, {d_k}] or [{heads}, {d_q}, {d_k}] for q {q.shape} '
        f'and k {k.shape}, got {w.shape}')
  qw_eq = '...qhd,de->...qhe' if w.ndim == 2 else '...qhd,hde->...qhe'
  qw = jnp.einsum(qw_eq, q, w, precision=precision, preferred_element_type=dtype)
  return jnp.einsum('...qhe,...khe->...hqk', qw, k.astype(dtype), precision=precision)


def additive_scores(q: jax.Array, k: jax.Array, w_q: jax.Array, w_k: jax.Array, v: jax.Array,
                    *, dtype=jnp.float32, precision=None) -> jax.Array:
  """Additive/concat `v^T tanh(W_q q + W_k k)` (Bahdanau et al. 2014).

  Materializes `[..., q_len, kv_len, heads, attn_dim]`; meant for RNN-size inputs
  (one decoder step against an encoder memory), not long sequences.

  Args:
    w_q: `[d_q, attn_dim]`; w_k: `[d_k, attn_dim]`; v: `[attn_dim]`.
  """
  _check_qk('additive_scores', q, k, same_dim=False)
  if (w_q.shape[0] != q.shape[-1] or w_k.shape[0] != k.shape[-1] or w_q.ndim != 2
      or w_k.ndim != 2 or w_q.shape[1] != w_k.shape[1] or v.shape != (w_q.shape[1],)):
    raise ValueError(
        f'additive_scores: need w_q [{q.shape[-1]}, a], w_k [{k.shape[-1]}, a], v [a]; got '
        f'w_q {w_q.shape}, w_k {w_k.shape}, v {v.shape}')
  q_proj = jnp.einsum('...qhd,da->...qha', q, w_q, precision=precision,
                      preferred_element_type=dtype)
  k_proj = jnp.einsum('...khd,da->...kha', k, w_k, precision=precision,
                      preferred_element_type=dtype)
  hidden = jnp.tanh(q_proj[..., :, None, :, :] + k_proj[..., None, :, :, :])  # [..., q, k, h, a]
  scores = jnp.einsum('...qkha,a->...qkh', hidden, v.astype(dtype), precision=precision)
  return jnp.moveaxis(scores, -1, -3)  # [..., h, q, k]
