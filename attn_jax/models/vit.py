"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

    cfg = models.vit_config('tiny')                    # 8x8x1 images, 2x2 patches, 10 classes
    model = models.ViT(cfg)
    params = model.init(jax.random.key(0), images)['params']    # images float32 [b, 8, 8, 1]
    logits = model.apply({'params': params}, images)             # float32 [b, 10]
    logits, state = model.apply({'params': params}, images, capture_attention=True,
                                mutable=['intermediates'])
    maps = patch_attention_map(attention_weights(state['intermediates']), cfg)  # [b, 4, 4]

The image is cut into `patch_size` squares (`ops.patchify`), each projected to `d_model` (a
`[p, p, C, d_model]` kernel: a stride-p convolution written as one matmul); positions are added
to the patch embeddings ('learned', 'sinusoidal_2d') or applied inside attention ('rope_2d');
a class token is prepended (`pooling='cls'`) or the final states are averaged ('mean'). The
layers are the text encoder's (`transformer.EncoderLayer` stacked by `stack_layers`), so every
attention option and the unrolled / scanned / shared stacks carry over, and the layers sow
their attention weights under the names `models.names` lists (`encoder_self`).

Positions cover the patches only: the class token gets no learned or sinusoidal encoding (as in
big_vision), and under 'rope_2d' it sits at (0, 0), the identity rotation, so it is not rotated
(as in Heo et al. 2024); patch (r, c) is rotated by (r, c).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models import names
from attn_jax.models.attention import partitioned
from attn_jax.models.configs import ViTConfig
from attn_jax.models.layers import Dropout, make_norm
from attn_jax.models.transformer import EncoderLayer, stack_layers


class PatchEmbedding(nn.Module):
  """`[batch, H, W, C]` images -> `[batch, patches, d_model]` patch embeddings (raster order).

  Parameters: `kernel` `[p, p, C, d_model]` (a convolution kernel's layout and initializer,
  fan-in `p * p * C`) and `bias` `[d_model]`.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    p, d = cfg.patch_size, cfg.d_model
    kernel = self.param('kernel', partitioned(nn.initializers.lecun_normal(),
                                              (None, None, None, 'embed')),
                        (p, p, cfg.channels, d), jnp.float32)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('embed',)), (d,), jnp.float32)
    dtype = cfg.compute_dtype
    patches = ops.patchify(images.astype(dtype), p)  # [b, n, p * p * C]
    return patches @ kernel.reshape(-1, d).astype(dtype) + bias.astype(dtype)


class ViT(nn.Module):
  """Patch embedding + positions + encoder layers + pooling + linear head.

  `images` float `[batch, H, W, C]` (the config's `image_shape`) -> float32 logits
  `[batch, num_classes]`.
  """
  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               capture_attention: bool | None = None) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or tuple(images.shape[1:]) != cfg.image_shape:
      raise ValueError(f'images must be [batch, {", ".join(map(str, cfg.image_shape))}] '
                       f'(ViTConfig image_size={cfg.image_size}, channels={cfg.channels}), '
                       f'got {tuple(images.shape)}')
    capture = cfg.capture_attention if capture_attention is None else capture_attention
    x = PatchEmbedding(cfg, name='patch_embedding')(images)  # [b, n, d]
    grid = ops.grid_positions(*cfg.grid)  # [n, 2]: (row, column)
    if cfg.positional == 'learned':
      table = self.param('position', partitioned(nn.initializers.normal(0.02), (None, 'embed')),
                         (cfg.num_patches, cfg.d_model), jnp.float32)
      x = x + table.astype(x.dtype)
    elif cfg.positional == 'sinusoidal_2d':
      x = x + ops.sinusoidal_2d(grid, cfg.d_model, dtype=x.dtype)
    if cfg.pooling == 'cls':
      cls = self.param('cls', partitioned(nn.initializers.normal(0.02), ('embed',)),
                       (cfg.d_model,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])),
                           x], axis=1)  # [b, 1 + n, d]
      grid = jnp.concatenate([jnp.zeros((1, 2), grid.dtype), grid])  # (0, 0): not rotated
    # Only 'rope_2d' layers read positions; the others put none inside attention.
    positions = grid if cfg.positional == 'rope_2d' else None
    x = Dropout(cfg.dropout_rate)(x, deterministic=not train)
    # No mask, segments or padding: every patch is real.
    x = stack_layers(cfg, EncoderLayer, cfg.num_layers, x, None, None, positions,
                     deterministic=not train, capture=capture)
    if cfg.norm_position == 'pre':
      x = make_norm(cfg, 'final_norm')(x)
    pooled = x[:, 0] if cfg.pooling == 'cls' else jnp.mean(x.astype(jnp.float32), axis=1)
    pooled = Dropout(cfg.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(cfg.num_classes, name='head',
                    kernel_init=partitioned(nn.initializers.lecun_normal(), ('embed', None)),
                    bias_init=partitioned(nn.initializers.zeros, (None,)))(pooled).astype(
                        jnp.float32)


def attention_weights(intermediates: Any) -> list[jax.Array]:
  """The encoder self-attention weights a ViT sowed, first layer first: `[batch, heads, L, L]`
  each (L = patches, + 1 with the class token), from unrolled (`layer_<i>`) or stacked
  (`nn.scan`, a leading `[layers]` axis) layers."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    if names.ENCODER_SELF not in keys or names.ATTENTION_WEIGHTS not in keys:
      continue
    index = next((i for i in map(names.layer_index, keys) if i is not None), None)
    if index is None:  # a stack: [layers, batch, heads, L, L]
      found.extend((i, w) for i, w in enumerate(leaf))
    else:
      found.append((index, leaf))
  if not found:
    raise ValueError('no encoder self-attention weights in intermediates: apply the model with '
                     "capture_attention=True and mutable=['intermediates']")
  return [w for _, w in sorted(found, key=lambda item: item[0])]


def patch_attention_map(weights: Any, config: ViTConfig, method: str = 'rollout') -> jax.Array:
  """Where the pooled output looks: float32 `[batch, grid_h, grid_w]`, each map summing to 1.

  `weights` are the per-layer weights of `attention_weights`; `method` 'rollout' (attention
  rollout, Abnar & Zuidema 2020) or 'last' (the last layer's; with a class token, its row).
  See `ops.patch_attention`.
  """
  return ops.patch_attention(weights, grid=config.grid, cls_token=config.pooling == 'cls',
                             method=method)
