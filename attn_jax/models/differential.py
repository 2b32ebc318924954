"""Differential attention (Ye et al. 2024, "Differential Transformer", ICLR 2025).

Each head splits its query and key into halves `[q1; q2]`, `[k1; k2]` (head_dim / 2 channels
each, so the parameters equal multi-head attention's) and attends twice with the same values:

    DiffAttn(X) = (softmax(q1 k1^T / sqrt(d/2)) - lambda softmax(q2 k2^T / sqrt(d/2))) V
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))          (l = 1, 2, ...: the layer's depth)

then normalizes each head's output on its own (RMSNorm over the head's channels, one learned
scale shared by the heads: the paper's GroupNorm with a group per head) and scales it by
`1 - lambda_init`. The learned vectors `lq1, lk1, lq2, lk2` (`[head_dim / 2]`, N(0, 0.1)) and
lambda are per layer, shared by the heads, as in the authors' code.

Because `A V` is linear in `A`, each map is one ordinary attention call (`core`): every mask,
score function, sink and cache path works unchanged; the decode cache holds the full keys
(both halves, each rotated on its own by RoPE: `per_half`) and the values once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.projection import partitioned

LAMBDA_PARAMS = ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')


def lambda_init(layer_index) -> jax.Array:
  """`0.8 - 0.6 exp(-0.3 (l - 1))` for the layer at 0-based `layer_index = l - 1` (an int, or
  a traced int32 scalar under `nn.scan`)."""
  return 0.8 - 0.6 * jnp.exp(-0.3 * jnp.asarray(layer_index, jnp.float32))


def per_half(rotate, x: jax.Array) -> jax.Array:
  """`rotate` (RoPE) on each half of every head of `x` `[batch, len, heads, head_dim]` as a
  head of its own: q1 k1^T and q2 k2^T then depend on relative positions only."""
  b, n, h, d = x.shape
  return rotate(x.reshape(b, n, 2 * h, d // 2)).reshape(b, n, h, d)


def attend(layer: nn.Module, core, query, key, value, *, layer_index, dtype, param_dtype):
  """Differential attention of `query` `[batch, q, heads, d]`, `key` `[batch, kv, kv_heads, d]`,
  `value` `[batch, kv, kv_heads, d_v]`; creates the lambda vectors and the norm in `layer`.

  Args:
    core: `core(q, k, v, part=) -> (out, weights | None, lse | None)`, the layer's attention.
    layer_index: 0-based depth (int or traced int32 scalar).

  Returns:
    `[batch, q, heads, d_v]` in `dtype`, and the float32 differential weights
    `[batch, heads, q, kv]` when `core` returns weights (else None).
  """
  half = query.shape[-1] // 2
  init = partitioned(nn.initializers.normal(0.1), ('kv',))
  lq1, lk1, lq2, lk2 = (layer.param(name, init, (half,), param_dtype).astype(jnp.float32)
                        for name in LAMBDA_PARAMS)
  start = lambda_init(layer_index)
  lam = jnp.exp(jnp.sum(lq1 * lk1)) - jnp.exp(jnp.sum(lq2 * lk2)) + start
  out1, weights1, _ = core(query[..., :half], key[..., :half], value, part=0)
  out2, weights2, _ = core(query[..., half:], key[..., half:], value, part=1)
  out = out1.astype(jnp.float32) - lam * out2.astype(jnp.float32)
  norm = nn.RMSNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                    scale_init=partitioned(nn.initializers.ones, ('kv',)), name='diff_norm')
  out = (norm(out) * (1.0 - start)).astype(dtype)
  weights = None if weights1 is None else weights1 - lam * weights2
  return out, weights
