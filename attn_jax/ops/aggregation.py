"""Backward aggregation: attention weights normalized over keys as usual, summed over queries.

Softmax attention gathers, for each query `i`, `O_i = sum_j alpha_ij v_j` with
`alpha_ij = softmax_j(q_i . k_j * scale)`. Backward aggregation keeps the same weights and
scatters instead: each key position `j` receives the values of the queries that attend to it,

    A_j = sum_i alpha_ij V_i                     (V: one value per *query* position)

one output per key position. It is the transpose of attention's aggregation (attention
computes `alpha v`, this computes `alpha^T V`), an ablation from issue #13 of this project:
does the direction of aggregation matter, if the weights are the same?

`alpha^T V` is exactly the gradient of attention with respect to its values: for any `v`,
`d/dv <attention(q, k, v), V> = alpha^T V`, since attention is linear in `v`. So
`backward_aggregation` runs `dot_product_attention`'s own backward pass (dense, or the
memory-efficient blockwise one that skips hidden blocks), and every mask, score function and
bias it takes applies unchanged. Its gradient is attention again: with `L = <A, G>` for a
cotangent `G` (one row per key),

    dL/dV = alpha G = attention(q, k, G)          dL/d(q, k, params) = the VJP of
                                                  attention(q, k, G) with cotangent V,

one forward and one first-order backward of the attention op, wrapped in a `jax.custom_vjp`
(the blockwise kernel's loops have data-dependent trip counts, so it cannot be differentiated
twice by autodiff).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attn_jax.ops.attention import dot_product_attention
from attn_jax.ops.heads import repeat_kv

_REFUSED = ('return_weights', 'return_lse', 'dropout_rate', 'dropout_rng')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _aggregate(attend, query, key, values, *consts):
  zeros = jnp.zeros(key.shape[:3] + values.shape[-1:], values.dtype)
  _, pullback = jax.vjp(lambda v: attend(query, key, v, *consts), zeros)
  return pullback(values.astype(query.dtype))[0]


def _aggregate_fwd(attend, query, key, values, *consts):
  return _aggregate(attend, query, key, values, *consts), (query, key, values, consts)


def _aggregate_bwd(attend, res, cotangent):
  query, key, values, consts = res
  cotangent = cotangent.astype(values.dtype)
  # <A, G> = <V, attention(q, k, G)>: attention(q, k, G) is dL/dV, and its VJP with V gives the
  # gradients of q, k and the hoisted parameters (a learned bias table, sinks).
  d_values, pullback = jax.vjp(lambda q, k, *c: attend(q, k, cotangent, *c), query, key, *consts)
  d_query, d_key, *d_consts = pullback(values.astype(d_values.dtype))
  return (d_query, d_key, d_values.astype(values.dtype), *d_consts)


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def backward_aggregation(query: jax.Array, key: jax.Array, values: jax.Array,
                         **attention_kwargs) -> jax.Array:
  """`A_j = sum_i alpha_ij V_i`: softmax weights over keys, summed over queries.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]` (GQA: repeated to the query heads, so each
      query head keeps its own weights).
    values: `[batch, q_len, heads, v_dim]`, one value per query position and query head.
    **attention_kwargs: the masks, score functions and options of
      `ops.dot_product_attention` (mask, is_causal, segment_ids, local_window, q_offset,
      bias, bias_fn/bias_params, mask_mod, score_mod, block_mask, sinks, scale,
      implementation, block_size, precision). A query that may see no key gives nothing; a
      key no query sees gets zeros. Not return_weights, return_lse or dropout.

  Returns:
    `[batch, kv_len, heads, v_dim]` in `values.dtype`: `A[:, j, h] = sum_i alpha[h, i, j]
    values[:, i, h]`. Differentiable in query, key, values and the floating arrays the mask
    and score functions close over (first order).
  """
  refused = [k for k in _REFUSED if attention_kwargs.get(k) not in (None, False, 0, 0.0)]
  if refused:
    raise ValueError(f'backward_aggregation takes no {refused}')
  if values.ndim != 4 or values.shape[:3] != query.shape[:3]:
    raise ValueError(f'values must be [batch, q_len, heads, v_dim] = {query.shape[:3]} + '
                     f'(v_dim,), one per query position and head; got {values.shape} for query '
                     f'{query.shape}')
  if key.ndim != 4 or query.shape[2] % max(key.shape[2], 1):
    raise ValueError(f'key {key.shape} must be [batch, kv_len, kv_heads, head_dim] with '
                     f'kv_heads dividing the {query.shape[2]} query heads')
  key = repeat_kv(key, query.shape[2])

  def attend(q, k, v):
    return dot_product_attention(q, k, v, **attention_kwargs)

  zeros = jnp.zeros(key.shape[:3] + values.shape[-1:], values.dtype)
  # Arrays the masks and score functions close over become explicit arguments, so that the
  # custom VJP can return their gradients.
  converted, consts = jax.closure_convert(attend, query, key, zeros)
  return _aggregate(converted, query, key, values, *consts).astype(values.dtype)
