"""Gated attention: an elementwise sigmoid gate on each head's attention output, computed from
the layer's input (Qiu et al. 2025, "Gated Attention for Large Language Models", the output
gate of the Qwen models): `Y'_h = Y_h * sigmoid(X W_g)_h`, before the output projection.

The gate is a `[features, heads, v_dim]` projection (`gate`) of the query input, so in cached
decoding it depends on the current token only and needs no cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def output_gate(dense, inputs_q: jax.Array, heads_out: jax.Array) -> jax.Array:
  """`heads_out` `[batch, q, heads, v_dim]` gated by `sigmoid(gate(inputs_q))`.

  Args:
    dense: the layer's `Projection` constructor (features, kernel axes, bias axes, name=).
    inputs_q: `[batch, q, features]`.
  """
  heads, v_dim = heads_out.shape[-2:]
  gate = dense((heads, v_dim), ('embed', 'heads', 'kv'), ('heads', 'kv'), name='gate')(inputs_q)
  return heads_out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(heads_out.dtype)
