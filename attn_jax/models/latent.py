"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", Sec. 2.1).

Keys and values come from one low-rank latent per token, `c_KV = norm(W_DKV h)` (rank
`kv_lora_rank`), up-projected per head: `k_C = W_UK c_KV`, `v = W_UV c_KV`. RoPE does not
commute with `W_UK`, so position enters through a decoupled part: `qk_rope_head_dim` extra
channels per query head and one key part shared by every head, `k_R = RoPE(W_KR h)`. Each
head's query is `[q_C; RoPE(q_R)]` (from `h`, or from a compressed `c_Q` of rank
`q_lora_rank`), its key `[k_C; k_R]`, and the logits are scaled by
`1/sqrt(head_dim + qk_rope_head_dim)`.

Training (`naive`) materializes the per-head keys and values and runs ordinary attention.
Decoding (`absorbed`) caches only `[c_KV; k_R]` per token and folds `W_UK` into the query,
`q_C^T W_UK c_KV = (W_UK^T q_C)^T c_KV`, and `W_UV` into the output, `sum_j a_j W_UV c_j =
W_UV sum_j a_j c_j`: attention runs as one key/value head (MQA) over the latent,
`q' = [W_UK^T q_C; RoPE(q_R)]`, `k' = [c_KV; k_R]`, `v' = c_KV`, and `output` maps the result
back through `W_UV`. The two give the same logits (`tests/models/test_latent.py`).

Cache per token and layer: `kv_lora_rank + qk_rope_head_dim` numbers, against
`2 * kv_heads * head_dim` for MHA/GQA (`cache_elements_per_token`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.models.configs import AttentionConfig
from attn_jax.models.projection import Projection, default_kernel_init, partitioned


def _flat_init(init):
  """`init` on the kernel flattened to `[fan_in, prod(rest)]`, reshaped back: the fan-in of a
  `[rank, heads, head_dim]` up-projection is `rank`, not what a 3-D initializer would infer."""
  def flat(rng, shape, dtype):
    return init(rng, (shape[0], int(np.prod(shape[1:]))), dtype).reshape(shape)
  return flat


def rotate_tail(rotate, x: jax.Array, channels: int) -> jax.Array:
  """`rotate` (RoPE at the call's positions) on the last `channels` channels of `x`
  `[batch, len, heads, dim]` only: the decoupled RoPE part of MLA's queries and keys."""
  return jnp.concatenate([x[..., :-channels], rotate(x[..., -channels:])], axis=-1)


def cache_elements_per_token(config: AttentionConfig, head_dim: int) -> int:
  """Numbers a self-attention layer caches per token for keys and values: MLA's latent and
  shared RoPE key, or MHA/GQA/MQA's keys and values."""
  if config.kind == 'latent':
    return config.kv_lora_rank + config.qk_rope_head_dim
  return 2 * config.kv_heads * head_dim


class LatentProjections(nn.Module):
  """MLA's projections and their two uses (see the module docstring).

  Attributes:
    config: the attention options (`kv_lora_rank`, `q_lora_rank`, `qk_rope_head_dim`).
    head_dim: channels per head of `q_C`, `k_C` and the values.
  """
  config: AttentionConfig
  head_dim: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init

  def setup(self):
    cfg, d = self.config, self.head_dim
    heads, rank, rope = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dense = functools.partial(Projection, kernel_init=self.kernel_init, use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.RMSNorm, epsilon=1e-6, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             scale_init=partitioned(nn.initializers.ones, (None,)))
    query_axes = ('heads', 'kv')
    if cfg.q_lora_rank:
      self.query_down = dense((cfg.q_lora_rank,), ('embed', None), (None,))
      self.query_norm = norm()
      self.query = dense((heads, d + rope), (None,) + query_axes, query_axes)
    else:
      self.query = dense((heads, d + rope), ('embed',) + query_axes, query_axes)
    self.kv_down = dense((rank,), ('embed', None), (None,))
    self.kv_norm = norm()
    self.key_rope = dense((rope,), ('embed', 'kv'), ('kv',))
    # No biases on the up-projections: they are folded into the query and the output.
    up = partitioned(_flat_init(self.kernel_init), (None, 'heads', 'kv'))
    self.key_up = self.param('key_up', up, (rank, heads, d), self.param_dtype)
    self.value_up = self.param('value_up', up, (rank, heads, d), self.param_dtype)

  @property
  def scale(self) -> float:
    """The logits' scale: `1/sqrt` of the per-head query/key size before absorption."""
    return 1.0 / math.sqrt(self.head_dim + self.config.qk_rope_head_dim)

  def _queries(self, x: jax.Array) -> jax.Array:
    """`[batch, len, features]` -> `[q_C; q_R]` `[batch, len, heads, head_dim + rope]`."""
    if self.config.q_lora_rank:
      return self.query(self.query_norm(self.query_down(x)))
    return self.query(x)

  def _latent(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`c_KV` `[batch, len, kv_lora_rank]` and the unrotated `k_R` `[batch, len, rope]`."""
    return self.kv_norm(self.kv_down(x)), self.key_rope(x)

  def _up(self, name: str) -> jax.Array:
    return jnp.asarray(getattr(self, name), self.dtype)

  def naive(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-head queries and keys `[batch, len, heads, head_dim + rope]` (RoPE still to apply
    to their last `rope` channels) and values `[batch, len, heads, head_dim]`."""
    query = self._queries(x)
    latent, key_rope = self._latent(x)
    key_c = jnp.einsum('bsr,rhd->bshd', latent, self._up('key_up'))
    shared = jnp.broadcast_to(key_rope[:, :, None, :], (*key_c.shape[:3], key_rope.shape[-1]))
    value = jnp.einsum('bsr,rhd->bshd', latent, self._up('value_up'))
    return query, jnp.concatenate([key_c, shared], axis=-1), value

  def absorbed(self, x: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """The decoding form: queries `[W_UK^T q_C; q_R]` `[batch, len, heads, rank + rope]` and one
    key head `[c_KV; k_R]` `[batch, len, 1, rank + rope]` (RoPE still to apply to the last
    `rope` channels of both). The values are the key's first `rank` channels
    (`latent_values`), so nothing else is returned or cached."""
    query = self._queries(x)
    q_c, q_rope = query[..., :self.head_dim], query[..., self.head_dim:]
    q_latent = jnp.einsum('bthd,rhd->bthr', q_c, self._up('key_up'))
    latent, key_rope = self._latent(x)
    key = jnp.concatenate([latent, key_rope], axis=-1)[:, :, None, :]
    return jnp.concatenate([q_latent, q_rope], axis=-1), key, None

  def latent_values(self, key: jax.Array) -> jax.Array:
    """The absorbed form's values, `c_KV`: the first `kv_lora_rank` channels of its keys."""
    return key[..., :self.config.kv_lora_rank]

  def output(self, latent_out: jax.Array) -> jax.Array:
    """Absorbed attention output `[batch, len, heads, rank]` -> `W_UV` applied per head,
    `[batch, len, heads, head_dim]`."""
    return jnp.einsum('bthr,rhd->bthd', latent_out.astype(self.dtype), self._up('value_up'))
