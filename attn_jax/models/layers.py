"""Transformer building blocks besides attention: norms, feed-forward, embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models.attention import partitioned
from attn_jax.models.configs import TransformerConfig


def make_norm(config: TransformerConfig, name: str) -> nn.Module:
  """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) over the last axis."""
  scale_init = partitioned(nn.initializers.ones, ('embed',))
  if config.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.compute_dtype, scale_init=scale_init,
                      name=name)
  return nn.LayerNorm(epsilon=config.norm_eps, dtype=config.compute_dtype, scale_init=scale_init,
                      bias_init=partitioned(nn.initializers.zeros, ('embed',)), name=name)


class Dropout(nn.Module):
  """`nn.Dropout`'s interface (`Dropout(rate)(x, deterministic=...)`, the 'dropout' RNG
  stream) on `ops.dropout`, which draws its mask at a quarter of the random-bit cost."""
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return ops.dropout(x, self.rate, self.make_rng(self.rng_collection))


class FeedForward(nn.Module):
  """Position-wise FFN: `W2 act(W1 x)`, or SwiGLU `W2 (silu(W1 x) * W3 x)` (Shazeer 2020).

  Input and output `[batch, length, d_model]`; the hidden layer is `d_ff` wide.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    cfg = self.config

    def dense(features, names, name):
      return nn.Dense(features, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, name=name,
                      kernel_init=partitioned(nn.initializers.lecun_normal(), names),
                      bias_init=partitioned(nn.initializers.zeros, names[1:]))

    hidden = dense(cfg.d_ff, ('embed', 'mlp'), 'wi')(x)
    if cfg.activation == 'relu':
      hidden = nn.relu(hidden)
    elif cfg.activation == 'gelu':
      hidden = nn.gelu(hidden)
    elif cfg.activation == 'swiglu':
      hidden = nn.silu(hidden) * dense(cfg.d_ff, ('embed', 'mlp'), 'wi_gate')(x)
    else:  # Configs are validated; a hand-built one may not be.
      raise ValueError(f'unknown activation {cfg.activation!r}')
    hidden = Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    return dense(x.shape[-1], ('mlp', 'embed'), 'wo')(hidden)


class Embedder(nn.Module):
  """Token embedding scaled by `sqrt(d_model)` (as in the 2017 paper), plus added positions,
  or with `positional='concat_geometric'` the geometric encoding appended to it and the
  `d_model + 2m` channels projected back to `d_model` (`position_projection`).

  `attend` gives tied output logits `x E^T` `[..., vocab]` in float32.
  """
  config: TransformerConfig
  vocab_size: int

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        self.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, name='token',
        embedding_init=partitioned(nn.initializers.normal(cfg.d_model ** -0.5),
                                   ('vocab', 'embed')))
    if cfg.positional == 'learned':
      self.position_table = self.param(
          'position', partitioned(ops.learned_positional_init('normal'), (None, 'embed')),
          (cfg.max_len, cfg.d_model), jnp.float32)
    if cfg.positional == 'concat_geometric':
      self.position_projection = nn.Dense(
          cfg.d_model, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
          kernel_init=partitioned(nn.initializers.lecun_normal(), (None, 'embed')),
          bias_init=partitioned(nn.initializers.zeros, ('embed',)))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """`tokens` int `[batch, length]`, `positions` int `[batch, length]` (default 0..L-1)
    -> `[batch, length, d_model]` in the compute dtype."""
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [batch, length], got shape {tokens.shape}')
    x = self.embedding(tokens) * jnp.sqrt(cfg.d_model).astype(cfg.compute_dtype)
    if positions is None:
      positions = jnp.arange(tokens.shape[1])
    if cfg.positional == 'sinusoidal':
      x = x + ops.sinusoidal(positions, cfg.d_model, dtype=x.dtype)
    elif cfg.positional == 'learned':
      if tokens.shape[1] > cfg.max_len:
        raise ValueError(f'sequence length {tokens.shape[1]} exceeds the learned position '
                         f'table (max_len={cfg.max_len})')
      x = x + ops.learned_positional(self.position_table, positions).astype(x.dtype)
    elif cfg.positional == 'concat_geometric':
      x = self.position_projection(ops.concat_geometric(x, positions, cfg.geometric_frequencies))
    return x

  def attend(self, x: jax.Array) -> jax.Array:
    # As one [tokens, d] x [d, vocab] matmul: on a 3-D x, XLA:CPU transposes the whole
    # [batch, length, vocab] logits gradient for the embedding's gradient (measured: the
    # projection's forward+backward 1.76x slower at 32 x 64 tokens, vocabulary 8,000).
    flat = x.reshape(-1, x.shape[-1])
    return self.embedding.attend(flat).reshape(*x.shape[:-1], -1).astype(jnp.float32)


def shift_right(targets: jax.Array, segmentation: jax.Array | None = None,
                positions: jax.Array | None = None, bos_id: int = 1) -> jax.Array:
  """Teacher-forcing inputs: targets shifted right, BOS at 0 and at every segment start.

  Args:
    targets: int `[batch, length]`.
    segmentation: int `[batch, length]` packed segment ids (0 = padding).
    positions: int `[batch, length]` per-segment positions (a segment starts at 0).

  Returns:
    int `[batch, length]`: `out[:, i]` is the token that precedes `targets[:, i]`.
  """
  shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  start = jnp.zeros(targets.shape, bool).at[:, 0].set(True)
  if positions is not None:
    start = start | (positions == 0)
  if segmentation is not None:
    previous = jnp.pad(segmentation, ((0, 0), (1, 0)))[:, :-1]
    start = start | (segmentation != previous)
  return jnp.where(start, bos_id, shifted).astype(targets.dtype)
