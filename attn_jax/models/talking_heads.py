"""Talking-heads attention (Shazeer et al. 2020) in a layer: the two learned `[heads, heads]`
mixes, initialized to the identity (the layer starts as plain multi-head attention), and the
op `ops.talking_heads_attention`, which materializes the logits (the dense path only: the
config refuses `implementation='blockwise'`/'cudnn', sinks and memory slots with it)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.projection import partitioned


def _identity(rng, shape, dtype):
  del rng
  return jnp.eye(shape[0], dtype=dtype)


def mixes(layer: nn.Module, num_heads: int, param_dtype) -> tuple[jax.Array, jax.Array]:
  """`talking_heads_pre` and `talking_heads_post` `[heads, heads]`, created in `layer`:
  `P[g, h]` is how much of head g's logits (weights) head h takes."""
  init = partitioned(_identity, ('heads', None))
  return tuple(layer.param(name, init, (num_heads, num_heads), param_dtype)
               for name in ('talking_heads_pre', 'talking_heads_post'))
