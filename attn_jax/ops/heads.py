"""Head bookkeeping: split/merge the head axis and share k/v heads for GQA/MQA.

Layout follows `jax.nn.dot_product_attention`: `[batch, length, heads, head_dim]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """`[..., length, num_heads * head_dim]` -> `[..., length, num_heads, head_dim]`."""
  features = x.shape[-1]
  if features % num_heads:
    raise ValueError(
        f'split_heads: feature size {features} of shape {x.shape} is not divisible by '
        f'num_heads={num_heads}')
  return x.reshape(*x.shape[:-1], num_heads, features // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """`[..., length, heads, head_dim]` -> `[..., length, heads * head_dim]`."""
  if x.ndim < 2:
    raise ValueError(f'merge_heads: expected [..., heads, head_dim], got shape {x.shape}')
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def num_groups(num_q_heads: int, num_kv_heads: int) -> int:
  """Query heads per k/v head; raises unless `num_q_heads` is a multiple of `num_kv_heads`."""
  if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
    raise ValueError(
        f'query heads ({num_q_heads}) must be a positive multiple of key/value heads '
        f'({num_kv_heads})')
  return num_q_heads // num_kv_heads


def repeat_kv(x: jax.Array, num_q_heads: int) -> jax.Array:
  """Repeats k/v heads so that query head `h` reads k/v head `h // groups`.

  Args:
    x: `[batch, length, kv_heads, head_dim]`.
    num_q_heads: number of query heads, a multiple of `kv_heads`.

  Returns:
    `[batch, length, num_q_heads, head_dim]`. The attention ops never call this
    (they group query heads instead, which avoids the copy); it is the reference
    layout that GQA/MQA means.
  """
  groups = num_groups(num_q_heads, x.shape[-2])
  return jnp.repeat(x, groups, axis=-2) if groups > 1 else x
