"""Value residual learning (Zhou et al. 2024, "Value Residual Learning For Alleviating Attention
Concentration In Transformers", ResFormer): every self-attention layer's values are mixed with
the first layer's, `V'_n = l1 V_n + l2 V_1` (the paper's 0.5/0.5 as the learned scalars'
initial values; layer 1 keeps its own values, and its pair goes unused).

The first layer's values travel through the stack with the hidden states: `StackState` is
what `transformer.stack_layers` carries from layer to layer besides them when an option needs
it (`needs_stack_state`). Unrolled, its `index` is a Python int; under `nn.scan` (and ALBERT's
shared layer) it is an int32 scalar of the scan carry and `first_values` starts as zeros, so
one traced layer serves every depth (`jnp.where(index == 0, ...)`). Values are per token, so
in cached decoding layer 1's values of the tokens being decoded are all a later layer needs;
each layer caches its mixed values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models.configs import AttentionConfig
from attn_jax.models.projection import partitioned


class StackState(NamedTuple):
  """What a layer stack passes on besides the hidden states.

  Attributes:
    index: the layer's 0-based depth: an int (unrolled) or an int32 scalar (`nn.scan`).
    first_values: layer 0's self-attention values `[batch, len, kv_heads, head_dim]` (zeros
      before layer 0 under `nn.scan`), or None when `value_residual` is off.
  """
  index: Any
  first_values: jax.Array | None


def needs_stack_state(config: AttentionConfig) -> bool:
  """Whether a layer needs its depth (differential attention's lambda_init) or the first
  layer's values (value residual)."""
  return config.kind == 'differential' or config.value_residual


def initial_state(config: AttentionConfig, x: jax.Array, head_dim: int, scanned: bool
                  ) -> StackState:
  """The state before layer 0, for hidden states `x` `[batch, len, d_model]`."""
  first = None
  if config.value_residual:  # without a value projection the values are x split in heads
    dim = head_dim if config.value_projection else x.shape[-1] // config.kv_heads
    first = jnp.zeros((*x.shape[:2], config.kv_heads, dim), x.dtype)
  return StackState(jnp.zeros((), jnp.int32) if scanned else 0, first)


def mix(layer: nn.Module, values: jax.Array, stack: StackState | None, param_dtype
        ) -> tuple[jax.Array, jax.Array]:
  """This layer's values mixed with the first layer's; and the first layer's values for the
  next layer. Creates the learned pair `value_residual` `[2]` in `layer`."""
  if stack is None or stack.first_values is None:
    raise ValueError('value_residual=True needs the stack state (the first layer values): '
                     'call the attention through transformer.stack_layers, or pass stack=')
  lambdas = layer.param('value_residual', partitioned(nn.initializers.constant(0.5), (None,)),
                        (2,), param_dtype).astype(values.dtype)
  mixed = lambdas[0] * values + lambdas[1] * stack.first_values.astype(values.dtype)
  if isinstance(stack.index, int):
    return (values, values) if stack.index == 0 else (mixed, stack.first_values)
  first = stack.index == 0
  return jnp.where(first, values, mixed), jnp.where(first, values, stack.first_values)


def advance(stack: StackState | None, first_values: jax.Array | None) -> StackState | None:
  """The state after a layer that returned `first_values` (None: unchanged values)."""
  if stack is None:
    return None
  return StackState(stack.index + 1,
                    stack.first_values if first_values is None else first_values)
