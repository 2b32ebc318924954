"""Attention variants of issue #13 against references written here from their formulas: linear
attention and Performer (every path, masks, causal prefix sums, GQA, cached decoding), shared
query-key attention, backward aggregation (dense and blockwise, masks, a learned table's
gradient), the concatenated geometric encoding; and the arguments each refuses by name.

Values against float64 NumPy loops (2e-5); gradients against autodiff of the materialized
formula in JAX (1e-4 relative to the largest entry), one jitted program per case.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from attn_jax.ops import mask_mods as mm
from attn_jax.ops import score_mods as sm

B, H, KV_HEADS, D = 2, 4, 2, 8  # GQA: two query heads per key/value head
GRAD_TOL = 1e-4
LENGTHS = np.array([13, 7])  # real keys per batch row (key padding)


def _qkv(t, s, seed=0, heads=H, kv_heads=KV_HEADS, dv=D):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((B, t, heads, D), (B, s, kv_heads, D), (B, s, kv_heads, dv)))


def _loss(fn, *args):
  out = fn(*args)
  return jnp.sum(out * jnp.cos(out)), out  # a non-linear loss: cotangents vary per element


def _check_grads(grads, want_grads):
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    scale = max(1.0, float(jnp.max(jnp.abs(ref))))
    np.testing.assert_allclose(got, ref, atol=GRAD_TOL * scale, rtol=GRAD_TOL)


def _visible(t, s, *, causal=False, offset=0, lengths=None):
  """bool [B, T, S]: key padding and causality by absolute positions."""
  vis = np.ones((B, t, s), bool)
  if causal:
    vis &= np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + offset
  if lengths is not None:
    vis &= np.arange(s)[None, None, :] < np.asarray(lengths)[:, None, None]
  return vis


# --- Linear attention and Performer ----------------------------------------------------------


def _np_kernel_reference(phi_q, phi_k, v, visible):
  """float64 `out_i = sum_j w_ij v_j / sum_j w_ij`, `w_ij = phi_q_i . phi_k_j` over visible
  keys; GQA by index arithmetic; zeros for a row that sees nothing."""
  phi_q, phi_k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  b, t, h, _ = phi_q.shape
  groups = h // phi_k.shape[2]
  out = np.zeros((b, t, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      w = phi_q[bi, :, hi] @ phi_k[bi, :, hi // groups].T * visible[bi]
      den = w.sum(-1, keepdims=True)
      out[bi, :, hi] = np.where(den > 0, w @ v[bi, :, hi // groups] / np.where(den > 0, den, 1),
                                0.0)
  return out


def _np_elu1(x):
  x = np.asarray(x, np.float64)
  return np.where(x > 0, x + 1.0, np.exp(x))


def _np_favor(x, w, scale):
  """The FAVOR+ features from the paper's formula, without a stabilizer."""
  x = np.asarray(x, np.float64) * math.sqrt(scale)
  w = np.asarray(w, np.float64)
  return np.exp(x @ w.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / math.sqrt(w.shape[0])


def _jax_kernel_naive(phi_q, phi_k, v, visible):
  """The formula materialized in JAX (autodiff gives the reference gradients)."""
  groups = phi_q.shape[2] // phi_k.shape[2]
  k_h, v_h = jnp.repeat(phi_k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  w = jnp.einsum('bthm,bshm->bhts', phi_q, k_h) * visible[:, None]
  den = w.sum(-1)
  w = w / jnp.where(den > 0, den, 1.0)[..., None]
  return jnp.einsum('bhts,bshd->bthd', w, v_h)


PROJECTION = ops.performer_projection(jax.random.key(7), 24, D)

# name: (kind, t, s, causal, q_offset, with key padding, implementation, block_size)
KERNEL_CASES = {
    'linear_padding_gqa_blockwise': ('linear', 13, 13, False, 0, True, 'blockwise', None),
    'linear_causal_chunks_blockwise': ('linear', 19, 19, True, 0, True, 'blockwise', 4),
    'linear_cache_offset_auto': ('linear', 3, 13, True, 6, True, None, None),
    'performer_padding_blockwise': ('performer', 13, 13, False, 0, True, 'blockwise', None),
    'performer_causal_chunks_auto': ('performer', 19, 19, True, 0, False, None, 8),
}


@pytest.mark.parametrize('name', sorted(KERNEL_CASES))
def test_kernelized_attention_matches_its_formula_in_values_and_gradients(name):
  kind, t, s, causal, offset, padded, impl, block = KERNEL_CASES[name]
  q, k, v = _qkv(t, s)
  lengths = LENGTHS if padded else None
  visible = _visible(t, s, causal=causal, offset=offset, lengths=lengths)
  mask = None if lengths is None else ops.padding_mask(jnp.asarray(lengths), length=s)
  scale = 1.0 / math.sqrt(D)
  if kind == 'linear':
    def features(x, is_query):
      return ops.elu_features(x)
    run = functools.partial(ops.linear_attention)
  else:
    def features(x, is_query):
      return ops.performer_features(x, PROJECTION, scale=scale, is_query=is_query)
    run = functools.partial(ops.performer_attention, projection=PROJECTION)

  def op(q, k, v):
    return run(q, k, v, mask=mask, is_causal=causal, q_offset=offset, implementation=impl,
               block_size=block)

  def naive(q, k, v):
    return _jax_kernel_naive(features(q, True), features(k, False), v, jnp.asarray(visible))

  @jax.jit  # one program: compiling is what costs time here
  def both(q, k, v):
    return [jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2), has_aux=True)(q, k, v)
            for fn in (naive, op)]

  (want_grads, want), (grads, got) = both(q, k, v)
  phi_q = _np_elu1(q) if kind == 'linear' else _np_favor(q, PROJECTION, scale)
  phi_k = _np_elu1(k) if kind == 'linear' else _np_favor(k, PROJECTION, scale)
  reference = _np_kernel_reference(phi_q, phi_k, v, visible)
  np.testing.assert_allclose(got, reference, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(want, reference, atol=2e-5, rtol=2e-5)
  _check_grads(grads, want_grads)


def test_linear_attention_decoding_against_a_key_cache_equals_the_full_forward():
  # The model's cached decoding: keys written into a longer cache, unwritten slots masked,
  # queries at the cache index (q_offset), first a 3-token prefill and then one at a time.
  t, cache_len = 9, 12
  q, k, v = _qkv(t, t, seed=3)

  @jax.jit
  def full_and_cached(q, k, v):
    full = ops.linear_attention(q, k, v, is_causal=True)  # the chunked prefix-sum path
    k_cache = jnp.zeros((B, cache_len, KV_HEADS, D)).at[:, :t].set(k)
    v_cache = jnp.zeros((B, cache_len, KV_HEADS, D)).at[:, :t].set(v)
    steps = []
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, t)]:
      written = (jnp.arange(cache_len) < stop)[None, None, None, :]
      steps.append(ops.linear_attention(q[:, start:stop], k_cache, v_cache, is_causal=True,
                                        q_offset=start, mask=written))
    return full, jnp.concatenate(steps, axis=1)

  full, cached = full_and_cached(q, k, v)
  np.testing.assert_allclose(cached, full, atol=1e-5)


def test_performer_approximates_softmax_attention_with_many_features():
  # FAVOR+ is an unbiased estimator of the softmax kernel: with 4096 orthogonal features the
  # output is close to exact attention (a loose bound: the estimate is random).
  q, k, v = _qkv(12, 12, seed=1, heads=2, kv_heads=2)
  q, k = q * 0.3, k * 0.3  # moderate logits, where the estimator's variance is small
  # (max error <= 0.025 for four projection seeds; 0.05-0.09 at q, k * 0.5)
  projection = ops.performer_projection(jax.random.key(0), 4096, D)

  @jax.jit
  def both(q, k, v):
    return (ops.performer_attention(q, k, v, projection=projection, is_causal=True),
            ops.dot_product_attention(q, k, v, is_causal=True))

  approx, exact = both(q, k, v)
  assert float(jnp.max(jnp.abs(approx - exact))) < 0.05
  # Orthogonal blocks: rows within a block of head_dim are exactly orthogonal.
  block = np.asarray(projection[:D], np.float64)
  gram = block @ block.T
  np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-3)


def test_kernelized_attention_refuses_what_it_cannot_honour():
  q, k, v = _qkv(6, 6)
  with pytest.raises(ValueError, match=r"cannot honour \['mask_mod'\]"):
    ops.linear_attention(q, k, v, mask_mod=mm.causal())
  with pytest.raises(ValueError, match=r"cannot honour \['bias_fn', 'sinks'\]"):
    ops.performer_attention(q, k, v, projection=PROJECTION, bias_fn=ops.alibi_bias,
                            sinks=jnp.zeros(H))
  with pytest.raises(ValueError, match='takes no scale'):
    ops.linear_attention(q, k, v, scale=0.5)
  with pytest.raises(ValueError, match="implementation='blockwise' .* needs a mask of the key"):
    ops.linear_attention(q, k, v, mask=jnp.ones((1, 1, 6, 6), bool), implementation='blockwise')
  with pytest.raises(ValueError, match='implementation must be one of'):
    ops.linear_attention(q, k, v, implementation='cudnn')

  @jax.jit
  def quadratic(q, k, v):
    # Query-dependent masks and packed segments take the quadratic path: same values there.
    ids = jnp.asarray(np.repeat([[1, 2]], 3, axis=1).repeat(B, axis=0))
    packed = ops.linear_attention(q, k, v, segment_ids=ids, is_causal=True)
    first = ops.linear_attention(q[:, :3], k[:, :3], v[:, :3], is_causal=True)
    _, weights = ops.linear_attention(q, k, v, is_causal=True, return_weights=True)
    return packed, first, weights

  packed, first, weights = quadratic(q, k, v)
  np.testing.assert_allclose(packed[:, :3], first, atol=1e-6)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0


# --- Shared query-key attention (Reformer) ---------------------------------------------------


def _np_shared_qk(q, v, visible):
  q, v = np.asarray(q, np.float64), np.asarray(v, np.float64)
  k = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
  out = np.zeros(q.shape[:3] + v.shape[-1:])
  for bi in range(q.shape[0]):
    for hi in range(q.shape[2]):
      logits = q[bi, :, hi] @ k[bi, :, hi].T - 1e5 * np.eye(q.shape[1])
      for i in range(q.shape[1]):
        if visible[bi, i].any():
          row = np.where(visible[bi, i], logits[i], -np.inf)
          p = np.exp(row - row.max())
          out[bi, i, hi] = p / p.sum() @ v[bi, :, hi]
  return out


def test_shared_qk_attention_matches_reformer_and_lets_a_lone_position_see_itself():
  t = 11
  q, _, v = _qkv(t, t, heads=H, kv_heads=H)
  visible = _visible(t, t, causal=True, lengths=LENGTHS)
  mask = ops.padding_mask(jnp.asarray(LENGTHS), length=t)

  def op(impl, q, v):
    return ops.shared_qk_attention(q, v, is_causal=True, mask=mask, implementation=impl,
                                   block_size=4)

  def naive(q, v):
    k = q / jnp.sqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6)
    logits = jnp.einsum('bthd,bshd->bhts', q, k) - 1e5 * jnp.eye(t)
    logits = jnp.where(jnp.asarray(visible)[:, None], logits, -jnp.inf)
    return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)

  @jax.jit
  def all_three(q, v):
    return [jax.grad(functools.partial(_loss, fn), argnums=(0, 1), has_aux=True)(q, v)
            for fn in (naive, functools.partial(op, 'dense'),
                       functools.partial(op, 'blockwise'))]

  (want_grads, _), *paths = all_three(q, v)
  reference = _np_shared_qk(q, v, visible)
  for grads, got in paths:
    np.testing.assert_allclose(got, reference, atol=2e-5, rtol=2e-5)
    _check_grads(grads, want_grads)
    # Position 0 sees only itself: weight 1 on its own value despite the penalty.
    np.testing.assert_allclose(got[:, 0], v[:, 0], atol=1e-5)


# --- Backward aggregation --------------------------------------------------------------------


def _np_backward_aggregation(q, k, values, visible, score=None):
  """float64 `A_j = sum_i alpha_ij V_i`, alpha the softmax over visible keys of each query."""
  q, k, values = (np.asarray(x, np.float64) for x in (q, k, values))
  b, t, h, _ = q.shape
  s, groups = k.shape[1], h // k.shape[2]
  out = np.zeros((b, s, h, values.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      logits = q[bi, :, hi] @ k[bi, :, hi // groups].T / math.sqrt(q.shape[-1])
      if score is not None:
        logits = logits + score[hi]
      for i in range(t):
        if visible[bi, i].any():
          row = np.where(visible[bi, i], logits[i], -np.inf)
          p = np.exp(row - row.max())
          out[bi, :, hi] += np.outer(p / p.sum(), values[bi, i, hi])
  return out


TABLE = np.random.default_rng(9).normal(size=(8, H)).astype(np.float32)


def _t5_grid(table, t, s, offset):
  """The T5 bias `table[bucket(kv - q), h]` as `[H, T, S]` for queries at `offset + i`, from
  the library's bucketing (its own test checks it against the paper)."""
  relative = jnp.arange(s)[None, :] - (offset + jnp.arange(t))[:, None]
  buckets = ops.relative_position_buckets(relative, num_buckets=table.shape[0], max_distance=16)
  return jnp.moveaxis(table[buckets], -1, 0)


# name: (t, s, causal, q_offset, with key padding, with a learned T5 table, implementation)
AGGREGATION_CASES = {
    'causal_blockwise_skips_blocks': (21, 21, True, 0, False, False, 'blockwise'),
    'cross_lengths_offset_t5_blockwise': (7, 13, True, 4, True, True, 'blockwise'),
    't5_padding_gqa_dense': (9, 9, False, 0, True, True, 'dense'),
}


@pytest.mark.parametrize('name', sorted(AGGREGATION_CASES))
def test_backward_aggregation_matches_alpha_transposed_in_values_and_gradients(name):
  t, s, causal, offset, padded, learned, impl = AGGREGATION_CASES[name]
  q, k, _ = _qkv(t, s, seed=2)
  values = jnp.asarray(np.random.default_rng(4).normal(size=(B, t, H, 5)), jnp.float32)
  lengths = np.minimum(LENGTHS, s) if padded else None
  visible = _visible(t, s, causal=causal, offset=offset, lengths=lengths)
  mask = None if lengths is None else ops.padding_mask(jnp.asarray(lengths), length=s)
  table = jnp.asarray(TABLE)

  def op(q, k, values, table):
    score_mod = sm.t5_bias(table, max_distance=16) if learned else None
    return ops.backward_aggregation(q, k, values, mask=mask, is_causal=causal, q_offset=offset,
                                    score_mod=score_mod, implementation=impl, block_size=4)

  def naive(q, k, values, table):
    groups = H // KV_HEADS
    logits = jnp.einsum('bthd,bshd->bhts', q, jnp.repeat(k, groups, axis=2)) / math.sqrt(D)
    if learned:
      logits = logits + _t5_grid(table, t, s, offset)
    vis = jnp.asarray(visible)[:, None]
    weights = jax.nn.softmax(jnp.where(vis, logits, -1e30), axis=-1) * vis
    return jnp.einsum('bhts,bthd->bshd', weights, values)

  @jax.jit
  def both(q, k, values, table):
    return [jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2, 3), has_aux=True)(
        q, k, values, table) for fn in (naive, op)]

  (want_grads, want), (grads, got) = both(q, k, values, table)
  assert got.shape == (B, s, H, 5)
  score = None
  if learned:
    score = np.asarray(_t5_grid(table, t, s, offset), np.float64)
  np.testing.assert_allclose(got, _np_backward_aggregation(q, k, values, visible, score),
                             atol=2e-5, rtol=2e-5)
  _check_grads(grads, want_grads)
  if padded:  # keys no query may see receive nothing
    hidden = np.arange(s)[None, :] >= lengths[:, None]
    assert hidden.any() and np.all(np.asarray(got)[hidden] == 0.0)
  if learned:  # the table's gradient flows through the custom VJP
    assert float(jnp.abs(grads[0][3]).max()) > 0.0


def test_backward_aggregation_refuses_weights_and_dropout():
  q, k, _ = _qkv(5, 5)
  values = jnp.ones((B, 5, H, 3))
  with pytest.raises(ValueError, match=r"takes no \['return_weights'\]"):
    ops.backward_aggregation(q, k, values, return_weights=True)
  with pytest.raises(ValueError, match='one per query position and head'):
    ops.backward_aggregation(q, k, values[:, :4])


# --- Concatenated geometric positional encoding ----------------------------------------------


def test_geometric_positions_follow_the_formula_and_concatenate():
  positions = np.array([0, 1, 5, 37])
  got = np.asarray(ops.geometric_positions(jnp.asarray(positions), 6))
  for j in range(6):
    np.testing.assert_allclose(got[:, 2 * j], np.sin(positions / 2.0 ** j), atol=1e-6)
    np.testing.assert_allclose(got[:, 2 * j + 1], np.cos(positions / 2.0 ** j), atol=1e-6)
  x = jnp.ones((2, 4, 3))
  out = ops.concat_geometric(x, jnp.asarray(positions), 6)
  assert out.shape == (2, 4, 15)
  np.testing.assert_array_equal(out[0, :, :3], 1.0)
  np.testing.assert_allclose(out[1, :, 3:], got, atol=1e-6)
  with pytest.raises(ValueError, match='num_frequencies must be positive'):
    ops.geometric_positions(jnp.arange(3), 0)
