"""Images as sequences of patches, and attention maps back onto the patch grid.

    x = patchify(images, 4)                                   # [b, H/4 * W/4, 4 * 4 * C]
    r = attention_rollout(weights)                            # weights: per layer [b, h, L, L]
    m = patch_attention(weights, grid=(H // 4, W // 4), cls_token=True)   # [b, H/4, W/4]

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): each
layer's weights averaged over heads, the residual connection added as `0.5 A + 0.5 I` (rows
renormalized), and the layers multiplied, last on the left: row i of the result says how much
of token i's final state flows from each input token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

PATCH_MAP_METHODS = ('rollout', 'last')


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts `[batch, H, W, C]` images into non-overlapping `patch_size` squares, raster order.

  Returns:
    `[batch, (H / p) * (W / p), p * p * C]`; a patch's values in (row, column, channel) order,
    the order of a `[p, p, C, features]` convolution kernel flattened.
  """
  if images.ndim != 4:
    raise ValueError(f'images must be [batch, height, width, channels], got {images.shape}')
  b, h, w, c = images.shape
  p = patch_size
  if p <= 0 or h % p or w % p:
    raise ValueError(f'patch_size={p} does not divide the image size {h}x{w}')
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [b, gh, gw, p, p, c]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def _stack(weights: Sequence[jax.Array] | jax.Array) -> jax.Array:
  """Per-layer weights -> float32 `[layers, batch, heads, L, L]`."""
  w = jnp.stack([jnp.asarray(a) for a in weights]) if isinstance(weights, (list, tuple)) else (
      jnp.asarray(weights))
  if w.ndim != 5 or w.shape[-1] != w.shape[-2] or 0 in w.shape:
    raise ValueError(f'weights must be self-attention [layers, batch, heads, L, L] (or a list '
                     f'of [batch, heads, L, L]), got {w.shape}')
  return w.astype(jnp.float32)


def _rows_sum_to_one(a: jax.Array) -> jax.Array:
  return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)


def attention_rollout(weights: Sequence[jax.Array] | jax.Array, *,
                      residual: bool = True) -> jax.Array:
  """Attention rollout over layers (see the module docstring).

  Args:
    weights: per layer, first layer first: `[batch, heads, L, L]` each, or stacked
      `[layers, batch, heads, L, L]` (a scanned stack's sown weights).
    residual: add the identity for the residual connection (the paper's rollout).

  Returns:
    float32 `[batch, L, L]` whose rows sum to 1.
  """
  w = _stack(weights)
  eye = jnp.eye(w.shape[-1], dtype=jnp.float32)
  out = None
  for layer in w:
    a = jnp.mean(layer, axis=1)  # [b, L, L]
    a = _rows_sum_to_one(0.5 * a + 0.5 * eye if residual else a)
    out = a if out is None else jnp.einsum('bij,bjk->bik', a, out)
  return out


def patch_attention(weights: Sequence[jax.Array] | jax.Array, *, grid: tuple[int, int],
                    cls_token: bool, method: str = 'rollout') -> jax.Array:
  """How much the pooled output attends to each patch, on the patch grid.

  The pooled output is the class token's state (`cls_token`, token 0) or the mean of every
  token's. 'rollout' reads its row of `attention_rollout`; 'last' its row of the last layer's
  weights averaged over heads. The class token's own column is dropped and the map rescaled to
  sum to 1 over the patches.

  Args:
    weights: as `attention_rollout`; `L` = patches (+ 1 with `cls_token`).
    grid: (grid_h, grid_w), `grid_h * grid_w` patches in raster order.
    cls_token: token 0 is a class token.
    method: 'rollout' or 'last'.

  Returns:
    float32 `[batch, grid_h, grid_w]`, each map summing to 1.
  """
  if method not in PATCH_MAP_METHODS:
    raise ValueError(f'method={method!r}; allowed: {PATCH_MAP_METHODS}')
  w = _stack(weights)
  gh, gw = grid
  if w.shape[-1] != gh * gw + int(cls_token):
    raise ValueError(f'weights over {w.shape[-1]} tokens do not match a {gh}x{gw} grid '
                     f'{"+ a class token " if cls_token else ""}({gh * gw + int(cls_token)})')
  a = attention_rollout(w) if method == 'rollout' else _rows_sum_to_one(jnp.mean(w[-1], axis=1))
  row = a[:, 0] if cls_token else jnp.mean(a, axis=1)  # [b, L]
  patches = _rows_sum_to_one(row[:, 1:] if cls_token else row)
  return patches.reshape(-1, gh, gw)
