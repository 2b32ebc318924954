"""Kernelized attention in linear time: linear attention (Katharopoulos et al. 2020) and the
Performer's FAVOR+ (Choromanski et al. 2021), the efficient baselines of the Long Range Arena
(Tay et al. 2021).

Both replace softmax's kernel `exp(q . k * scale)` by a dot product of positive feature maps,
`sim(q, k) = phi(q) . phi(k)`, so that the sums over keys factor out of the query loop:

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))

which costs `O(len * features * v_dim)` instead of `O(q_len * kv_len)`. Causal attention sums
over keys `j <= i` only: a prefix sum, computed per chunk of `block_size` keys (the products
inside a chunk are masked explicitly, the chunks before it enter through their summed state),
so memory is `O(len * chunk + len / chunk * features * v_dim)` per head rather than the
`O(len * features * v_dim)` of one prefix sum per position.

Feature maps:
  linear:    `phi(x) = elu(x) + 1` (Katharopoulos et al. 2020, "Transformers are RNNs").
  performer: positive orthogonal random features `phi(x) = exp(w_r . x - |x|^2 / 2) / sqrt(m)`,
             `r = 1..m`, of `x = q * scale^(1/2)` (and likewise k), whose dot products are
             unbiased estimates of `exp(q . k * scale)` (Choromanski et al. 2021, FAVOR+).

The functions take `dot_product_attention`'s arguments. What a factored sum over keys cannot
honour (biases, windows, mask/score functions, sinks, lse, dropout) raises a ValueError rather
than being ignored. Masks that depend on the query (packed segments, a `[.., q_len, kv_len]`
mask, causal masks against a key cache at an offset) are honoured on the quadratic path,
`implementation='dense'`, which builds the `[q_len, kv_len]` similarities; cached decoding takes
it (one query row against the cache: `O(kv_len)` per step, as softmax attention).
`implementation='blockwise'` is the linear-time path; `None` takes it whenever it applies.
Rows that see no key get zeros, as in softmax attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import masks as masks_lib
from attn_jax.ops.heads import repeat_kv
from attn_jax.ops.shapes import Dims, check_broadcastable, check_qkv, split_segment_ids

DEFAULT_CHUNK = 64  # Keys per chunk of the causal prefix sum.
IMPLEMENTATIONS = (None, 'dense', 'blockwise')
FeatureMap = Callable[[jax.Array], jax.Array]


def elu_features(x: jax.Array) -> jax.Array:
  """`elu(x) + 1`, float32, the feature map of Katharopoulos et al. 2020: positive, so every
  similarity is positive and normalizers are never zero for a visible key."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def performer_projection(rng: jax.Array, num_features: int, head_dim: int, *,
                         orthogonal: bool = True) -> jax.Array:
  """FAVOR+ random projection `w`: float32 `[num_features, head_dim]`.

  Rows are drawn from `N(0, I_head_dim)`; with `orthogonal` (the paper's ORF), each block of
  `head_dim` rows is orthogonalized (QR of a Gaussian matrix) and rescaled by the norms of
  independent Gaussian vectors, so every row keeps its `N(0, I)` marginal while the rows of a
  block are exactly orthogonal, which lowers the estimator's variance (Choromanski et al.
  2021, Theorem 2). Draw it once and pass it to `performer_attention`.
  """
  if num_features <= 0 or head_dim <= 0:
    raise ValueError(f'performer_projection: num_features={num_features} and '
                     f'head_dim={head_dim} must be positive')
  if not orthogonal:
    return jax.random.normal(rng, (num_features, head_dim), jnp.float32)
  num_blocks = -(-num_features // head_dim)
  block_rng, norm_rng = jax.random.split(rng)
  gaussian = jax.random.normal(block_rng, (num_blocks, head_dim, head_dim), jnp.float32)
  q, r = jnp.linalg.qr(gaussian)  # [blocks, d, d], orthonormal columns
  # Householder QR fixes the signs of R's diagonal, which biases Q's directions; flipping
  # each column by that sign makes Q Haar-distributed (Mezzadri 2007), so each row is uniform
  # on the sphere and the estimator stays unbiased.
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_rng, (num_features, head_dim)), axis=-1)
  return rows * norms[:, None]


def performer_features(x: jax.Array, projection: jax.Array, *, scale: float,
                       is_query: bool) -> jax.Array:
  """FAVOR+ positive random features of `x` `[batch, len, heads, head_dim]`: float32
  `[batch, len, heads, num_features]`,

      phi(x)_r = exp(w_r . x' - |x'|^2 / 2 - c) / sqrt(m),   x' = x * scale^(1/2),

  so that `E[phi(q) . phi(k)] = exp(q . k * scale) * exp(-c_q - c_k)`. The stabilizer `c` is a
  constant that cancels between numerator and denominator: the row's largest exponent for a
  query (one per query row), the largest over all keys and features for keys (one per
  batch row and head, so it is common to every key a query sees). It keeps `exp` from
  overflowing; no gradient flows through it, none is needed since it cancels.
  """
  if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
    raise ValueError(f'performer projection must be [num_features, head_dim={x.shape[-1]}], got '
                     f'{projection.shape}')
  x = x.astype(jnp.float32) * math.sqrt(scale)
  exponent = jnp.einsum('blhd,md->blhm', x, projection.astype(jnp.float32))
  exponent = exponent - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  axes = (-1,) if is_query else (1, 3)
  exponent = exponent - jax.lax.stop_gradient(jnp.max(exponent, axis=axes, keepdims=True))
  return jnp.exp(exponent) / math.sqrt(projection.shape[0])


def _refuse(name: str, **given: Any) -> None:
  """Raises for the `dot_product_attention` arguments a kernelized attention cannot honour."""
  def is_default(value):
    return value is None or value is False or (isinstance(value, int | float) and value == 0)

  used = [k for k, v in given.items() if not is_default(v)]
  if used:
    raise ValueError(f'{name} cannot honour {used}: its similarities are feature-map dot '
                     'products summed over keys, with no logits to bias, mask per block or '
                     'drop; use ops.dot_product_attention for them')


def _key_mask(mask: jax.Array | None, dims: Dims) -> jax.Array | None:
  """A mask that depends only on the key (q axis of size 1) as float `[B|1, S, H|1]`, else
  None for no mask."""
  if mask is None:
    return None
  return jnp.moveaxis(mask[:, :, 0, :], 1, 2).astype(jnp.float32)  # [B|1, S, H|1]


def _causal_chunked(phi_q, phi_k, value, chunk: int, precision) -> tuple[jax.Array, jax.Array]:
  """Causal numerator `[B, T, K, G, Dv]` and denominator `[B, T, K, G]` by chunks.

  `phi_q` `[B, T, K, G, M]`, `phi_k` `[B, T, K, M]` (masked keys already zero), `value`
  `[B, T, K, Dv]`, all float32. Within a chunk the similarities are masked to `j <= i`; the
  chunks before it contribute their summed `phi(k) v^T` and `phi(k)` (an exclusive cumsum over
  chunks).
  """
  b, t, kh, g, m = phi_q.shape
  dv = value.shape[-1]
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    phi_q = jnp.pad(phi_q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    phi_k = jnp.pad(phi_k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qc = phi_q.reshape(b, n, chunk, kh, g, m)
  kc = phi_k.reshape(b, n, chunk, kh, m)
  vc = value.reshape(b, n, chunk, kh, dv)
  # State entering chunk c: the sums over every earlier chunk.
  kv_sums = jnp.einsum('bncks,bnckd->bnksd', kc, vc, precision=precision)  # [B, N, K, M, Dv]
  k_sums = jnp.sum(kc, axis=2)  # [B, N, K, M]
  kv_state = jnp.cumsum(kv_sums, axis=1) - kv_sums
  k_state = jnp.cumsum(k_sums, axis=1) - k_sums
  num = jnp.einsum('bnckgs,bnksd->bnckgd', qc, kv_state, precision=precision)
  den = jnp.einsum('bnckgs,bnks->bnckg', qc, k_state, precision=precision)
  # Inside the chunk: explicit similarities, lower-triangular.
  sim = jnp.einsum('bnckgs,bnjks->bnkgcj', qc, kc, precision=precision)  # [B, N, K, G, C, C]
  sim = jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool)), sim, 0.0)
  num = num + jnp.einsum('bnkgcj,bnjkd->bnckgd', sim, vc, precision=precision)
  den = den + jnp.moveaxis(jnp.sum(sim, axis=-1), -1, 2)  # [B, N, C, K, G]
  num = num.reshape(b, n * chunk, kh, g, dv)[:, :t]
  den = den.reshape(b, n * chunk, kh, g)[:, :t]
  return num, den


def _normalize(num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den`, zeros where a row saw no key (`den == 0`), with finite gradients."""
  seen = den > 0.0
  return jnp.where(seen[..., None], num / jnp.where(seen, den, 1.0)[..., None], 0.0)


def kernel_attention(phi_q: jax.Array, phi_k: jax.Array, value: jax.Array, *,
                     mask: jax.Array | None = None, is_causal: bool = False,
                     segment_ids=None, q_offset: int | jax.Array = 0,
                     return_weights: bool = False, implementation: str | None = None,
                     block_size: int | None = None, precision: Any = None):
  """Attention with similarities `phi_q . phi_k` (nonnegative features, float32).

  Args:
    phi_q: `[batch, q_len, heads, features]`.
    phi_k: `[batch, kv_len, kv_heads, features]`, `heads % kv_heads == 0` (GQA).
    value: `[batch, kv_len, kv_heads, v_dim]`.
    mask / is_causal / segment_ids / q_offset: as in `dot_product_attention`.
    return_weights: also return the normalized similarities float32 `[batch, heads, q_len,
      kv_len]` (quadratic path).
    implementation: 'blockwise' (linear time: sums over keys, causal by chunked prefix sums;
      needs a mask of the key alone, no segments, and for causal attention `q_len == kv_len`
      at `q_offset=0`), 'dense' (quadratic: any mask), or None (blockwise where it applies).
    block_size: chunk length of the causal prefix sum (default `DEFAULT_CHUNK`).

  Returns:
    float32 `[batch, q_len, heads, v_dim]` (and the weights).
  """
  dims = check_qkv(phi_q, phi_k, value)
  check_broadcastable('mask', mask, dims)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} for kernelized '
                     f'attention, got {implementation!r}')
  b, t, s, h, kh, g = dims.batch, dims.q_len, dims.kv_len, dims.heads, dims.kv_heads, dims.groups
  query_mask = mask is not None and mask.shape[2] > 1
  static_start = isinstance(q_offset, int) and q_offset == 0
  linear_ok = not (query_mask or segment_ids is not None or return_weights
                   or (is_causal and not (static_start and t == s)))
  if implementation == 'blockwise' and not linear_ok:
    raise ValueError(
        "implementation='blockwise' (the linear-time path) needs a mask of the key alone "
        '(shape [batch|1, heads|1, 1, kv_len]), no segment_ids, no return_weights, and for '
        'causal attention q_len == kv_len at q_offset=0; '
        f"got mask {None if mask is None else mask.shape}, segment_ids "
        f"{'given' if segment_ids is not None else None}, return_weights={return_weights}, "
        f'q_len={t}, kv_len={s}, q_offset={q_offset!r}; use implementation=None or \'dense\'')
  phi_q, phi_k = phi_q.astype(jnp.float32), phi_k.astype(jnp.float32)
  v32 = value.astype(jnp.float32)

  if implementation == 'dense' or not linear_ok:
    q_seg, kv_seg = split_segment_ids(segment_ids, dims)
    full = masks_lib.combine_masks(
        mask, masks_lib.causal_mask(t, s, q_offset) if is_causal else None,
        masks_lib.segment_mask(q_seg, kv_seg) if q_seg is not None else None)
    sim = jnp.einsum('bthm,bshm->bhts', phi_q, repeat_kv(phi_k, h), precision=precision)
    if full is not None:
      sim = jnp.where(full, sim, 0.0)
    den = jnp.sum(sim, axis=-1)  # [B, H, T]
    seen = den > 0.0
    weights = jnp.where(seen[..., None], sim / jnp.where(seen, den, 1.0)[..., None], 0.0)
    out = jnp.einsum('bhts,bshd->bthd', weights, repeat_kv(v32, h), precision=precision)
    return (out, weights) if return_weights else out

  keep = _key_mask(mask, dims)
  if keep is not None:
    # A hidden key contributes to no sum: zero features. (Heads of the mask are query heads;
    # a per-head key mask under GQA would need per-query-head sums, hence the check.)
    if keep.shape[-1] > 1 and g > 1:
      raise ValueError(f'a per-head key mask {mask.shape} with grouped k/v heads needs '
                       "implementation='dense'")
    phi_k = phi_k * keep[..., None]
  phi_qg = phi_q.reshape(b, t, kh, g, -1)
  if is_causal:
    num, den = _causal_chunked(phi_qg, phi_k, v32, min(block_size or DEFAULT_CHUNK, t),
                               precision)
  else:
    kv = jnp.einsum('bskm,bskd->bkmd', phi_k, v32, precision=precision)  # [B, K, M, Dv]
    num = jnp.einsum('btkgm,bkmd->btkgd', phi_qg, kv, precision=precision)
    den = jnp.einsum('btkgm,bkm->btkg', phi_qg, jnp.sum(phi_k, axis=1), precision=precision)
  return _normalize(num, den).reshape(b, t, h, -1)


def _check_common(name: str, query, key, value, *, bias, local_window, bias_fn, mask_mod,
                  score_mod, block_mask, sinks, return_lse, dropout_rate, mask):
  _refuse(name, bias=bias, local_window=local_window, bias_fn=bias_fn, mask_mod=mask_mod,
          score_mod=score_mod, block_mask=block_mask, sinks=sinks, return_lse=return_lse,
          dropout_rate=dropout_rate)
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  if mask is not None and mask.dtype != jnp.bool_:
    raise ValueError(f'mask must be boolean (True = attend), got dtype {mask.dtype}')
  return dims


def linear_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                     segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                     bias_params=None, mask_mod=None, score_mod=None, block_mask=None,
                     sinks=None, return_lse=False, dropout_rate=0.0, dropout_rng=None,
                     return_weights=False, implementation=None, block_size=None,
                     precision=None, feature_map: FeatureMap = elu_features):
  """Linear attention (Katharopoulos et al. 2020), `dot_product_attention`'s signature:

      out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j),  phi(x) = elu(x) + 1

  over the keys `j` visible to query `i` (causal: `j <= i + q_offset`; key padding masks).

  Args:
    query: `[batch, q_len, heads, head_dim]`; key `[batch, kv_len, kv_heads, head_dim]`;
      value `[batch, kv_len, kv_heads, v_dim]` (GQA when `kv_heads < heads`).
    mask, is_causal, segment_ids, q_offset, return_weights, precision: as in
      `dot_product_attention`; see the module docstring for which take the quadratic path.
    implementation: 'blockwise' (linear time), 'dense' (quadratic) or None (blockwise where
      it applies); block_size: the causal chunk length.
    feature_map: `phi`, float32 out (default `elu_features`).
    scale, bias, local_window, bias_fn, mask_mod, score_mod, block_mask, sinks, return_lse,
      dropout_rate: not meaningful here; anything but the default raises ValueError
      (`scale`: the feature map has no temperature).

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype` (and float32 weights `[batch, heads,
    q_len, kv_len]` with `return_weights`).
  """
  del bias_params, dropout_rng  # Meaningless without bias_fn / dropout, which are refused.
  _check_common('linear_attention', query, key, value, bias=bias, local_window=local_window,
                bias_fn=bias_fn, mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask,
                sinks=sinks, return_lse=return_lse, dropout_rate=dropout_rate, mask=mask)
  if scale is not None:
    raise ValueError(f'linear_attention takes no scale (got {scale}): its feature map has no '
                     'temperature')
  result = kernel_attention(feature_map(query), feature_map(key), value, mask=mask,
                            is_causal=is_causal, segment_ids=segment_ids, q_offset=q_offset,
                            return_weights=return_weights, implementation=implementation,
                            block_size=block_size, precision=precision)
  return _cast(result, query.dtype)


def performer_attention(query, key, value, *, projection, bias=None, mask=None,
                        is_causal=False, scale=None, segment_ids=None, local_window=None,
                        q_offset=0, bias_fn=None, bias_params=None, mask_mod=None,
                        score_mod=None, block_mask=None, sinks=None, return_lse=False,
                        dropout_rate=0.0, dropout_rng=None, return_weights=False,
                        implementation=None, block_size=None, precision=None):
  """Performer attention, FAVOR+ (Choromanski et al. 2021): softmax attention
  `softmax(q k^T * scale) v` estimated with positive random features,

      out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j),
      phi(x)_r = exp(w_r . x' - |x'|^2/2) / sqrt(m),  x' = x * scale^(1/2),

  unbiased for the kernel `exp(q . k * scale)`; more features, less variance.

  Args:
    projection: float `[num_features, head_dim]`, `performer_projection(rng, m, head_dim)`
      (shared by all heads; fixed, or redrawn by the caller).
    scale: the softmax temperature being approximated; default `1/sqrt(head_dim)`.
    Everything else as `linear_attention` (same refusals, same paths).

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype` (and float32 weights with
    `return_weights`).
  """
  del bias_params, dropout_rng
  dims = _check_common('performer_attention', query, key, value, bias=bias,
                       local_window=local_window, bias_fn=bias_fn, mask_mod=mask_mod,
                       score_mod=score_mod, block_mask=block_mask, sinks=sinks,
                       return_lse=return_lse, dropout_rate=dropout_rate, mask=mask)
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else float(scale)
  if scale <= 0:
    raise ValueError(f'performer_attention: scale={scale} must be positive')
  phi_q = performer_features(query, projection, scale=scale, is_query=True)
  phi_k = performer_features(key, projection, scale=scale, is_query=False)
  result = kernel_attention(phi_q, phi_k, value, mask=mask, is_causal=is_causal,
                            segment_ids=segment_ids, q_offset=q_offset,
                            return_weights=return_weights, implementation=implementation,
                            block_size=block_size, precision=precision)
  return _cast(result, query.dtype)


def _cast(result, dtype):
  if isinstance(result, tuple):
    return (result[0].astype(dtype), *result[1:])
  return result.astype(dtype)
