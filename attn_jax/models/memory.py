"""Learned memory key/value slots (persistent memory; Sukhbaatar et al. 2019, "Augmenting
Self-attention with Persistent Memory"; x-transformers' `num_mem_kv`).

`num_memory_kv` learned keys and values per key/value head join every query's softmax: no
causal, window, padding or user mask hides them, they carry no position (no RoPE, no position
bias), and they are the same at every decoding step (parameters, not cache). Only the soft-cap
applies to their logits, as it bounds every logit.

The sequence part (any path: dense, blockwise, the decode cache's prefix walk) and the memory
part are computed apart, each with its log-sum-exp, and merged exactly
(`ops.merge_attention`), so the masks of the sequence part never see the slots.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models.configs import AttentionConfig
from attn_jax.models.projection import partitioned


def attend(layer: nn.Module, core, query, key, value, *, config: AttentionConfig, scale,
           dropout_rate: float, dropout_rng, param_dtype):
  """Attention over the sequence's keys and the layer's memory slots together.

  Args:
    layer: the attention module, in which `memory_key`/`memory_value` `[slots, kv_heads,
      head_dim | v_dim]` are created (N(0, 1), as x-transformers).
    core: `core(q, k, v, return_lse=True) -> (out, weights | None, lse)`: the sequence part.
    query `[batch, q, heads, d]`, key `[batch, kv, kv_heads, d]`, value `[.., v_dim]`.
    scale: the logits' scale (None: `1/sqrt(d)`), as the sequence part's.

  Returns:
    `[batch, q, heads, v_dim]` in `query.dtype`, and the weights on the sequence's keys
    (`[batch, heads, q, kv]`, their share of the joint softmax) when `core` returns weights.
  """
  slots, kv_heads = config.num_memory_kv, key.shape[2]
  init = partitioned(nn.initializers.normal(1.0), (None, 'kv_heads', 'kv'))
  memory_key = layer.param('memory_key', init, (slots, kv_heads, key.shape[-1]), param_dtype)
  memory_value = layer.param('memory_value', init, (slots, kv_heads, value.shape[-1]),
                             param_dtype)
  out, weights, lse = core(query, key, value, return_lse=True)

  def batched(x):  # [slots, kv_heads, d] -> [batch, slots, kv_heads, d]
    return jnp.broadcast_to(x.astype(query.dtype)[None], (query.shape[0], *x.shape))

  cap = None if config.logit_softcap is None else ops.score_mods.soft_cap(config.logit_softcap)
  rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 7)
  memory_out, memory_lse = ops.dot_product_attention(
      query, batched(memory_key), batched(memory_value), scale=scale, score_mod=cap,
      return_lse=True, dropout_rate=dropout_rate if rng is not None else 0.0,
      dropout_rng=rng, implementation='dense')
  out, total = ops.merge_attention(out, lse, memory_out, memory_lse)
  if weights is not None:
    weights = weights * jnp.exp(lse - total)[..., None]
  return out, weights
