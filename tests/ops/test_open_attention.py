"""Open attention: every mask and score function, alone and combined, on the dense and the
blockwise path, against a reference written here from the formulas (values and gradients);
block masks visit exactly the blocks with a visible pair; sinks, lse and merge_attention.

Tolerances: fp32 values 2e-5 against a float64 NumPy reference and 1e-5 between paths;
gradients 1e-4 relative to the largest entry; bf16 inputs 3e-2.
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
from tests.ops import reference

B, H, KV_HEADS, D = 2, 4, 2, 8  # GQA: two query heads per key/value head
GRAD_TOL = 1e-4


def _qkv(t, s, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype)
               for shape in ((B, t, H, D), (B, s, KV_HEADS, D), (B, s, KV_HEADS, D)))


def _grids(t, s, offset):
  """NumPy index grids [B, H, T, S] of batch, head, absolute query and key positions."""
  return np.meshgrid(np.arange(B), np.arange(H), np.arange(t) + offset, np.arange(s),
                     indexing='ij')


def _t5_buckets(relative, num_buckets, max_distance, bidirectional):
  """T5's bucketing of `kv - q`, written from the paper's description: half the buckets per
  direction, of which half hold exact distances and the rest grow logarithmically."""
  distance = -np.asarray(relative)
  bucket = np.zeros_like(distance)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (distance < 0) * num_buckets
    distance = np.abs(distance)
  else:
    distance = np.maximum(distance, 0)
  exact = num_buckets // 2
  with np.errstate(divide='ignore'):
    log_bucket = exact + (np.log(np.maximum(distance, 1) / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).astype(np.int64)
  return bucket + np.where(distance < exact, distance, np.minimum(log_bucket, num_buckets - 1))


# Each case: lengths, q_offset, block sizes, then (mask_mod, reference mask of the grids),
# (score_mod builder of params, reference score of (logits, grids, params)), params, sinks.
IDS = np.sort(np.random.default_rng(5).integers(0, 4, size=(B, 64)), axis=1)
LENGTHS, Q_LENGTHS = np.array([30, 17]), np.array([33, 12])
PREFIX = np.array([5, 11])
SLOPES = np.asarray(ops.alibi_slopes(H))
TABLE = np.random.default_rng(6).normal(size=(16, H)).astype(np.float32)


def _case(t, s, offset=0, block=(8, 16), mask=(None, None), score=(None, None), params=None,
          sinks=False):
  return dict(t=t, s=s, offset=offset, block=block, mask=mask, score=score, params=params or {},
              sinks=sinks)


CASES = {
    'causal': _case(37, 37, mask=(mm.causal(), lambda b, h, q, k: k <= q)),
    'window_q_ne_kv_offset': _case(
        13, 29, offset=9, block=(4, 8),
        mask=(mm.sliding_window(5, 2), lambda b, h, q, k: (k >= q - 5) & (k <= q + 2))),
    'chunked_causal': _case(
        37, 37, mask=(mm.and_masks(mm.chunked(8), mm.causal()),
                      lambda b, h, q, k: (q // 8 == k // 8) & (k <= q))),
    'prefix_lm': _case(
        29, 29, mask=(mm.prefix_lm(PREFIX), lambda b, h, q, k: (k < PREFIX[b]) | (k <= q))),
    'document_causal': _case(
        41, 41, block=(8, 8),
        mask=(mm.and_masks(mm.document(IDS[:, :41]), mm.causal()),
              lambda b, h, q, k: (IDS[b, q] == IDS[b, k]) & (k <= q))),
    'padding_hides_rows': _case(
        33, 33, mask=(mm.padding(LENGTHS, Q_LENGTHS),
                      lambda b, h, q, k: (k < LENGTHS[b]) & (q < Q_LENGTHS[b]))),
    'sparse_transformer_strided': _case(
        35, 35, block=(8, 8),
        mask=(mm.and_masks(mm.causal(), mm.or_masks(mm.sliding_window(2), mm.dilated(3))),
              lambda b, h, q, k: (k <= q) & ((k >= q - 2) | ((q - k) % 3 == 0)))),
    'global_and_window': _case(
        31, 31, mask=(mm.global_and_window(3, 4),
                      lambda b, h, q, k: (q < 3) | (k < 3) | (np.abs(q - k) <= 4))),
    'alibi_causal': _case(
        23, 23, block=(8, 8), mask=(mm.causal(), lambda b, h, q, k: k <= q),
        score=(lambda p: sm.alibi(p['slopes']),
               lambda x, g, p: x - p['slopes'][g[1]] * jnp.abs(g[2] - g[3])),
        params={'slopes': SLOPES}),
    't5_table_gets_gradients': _case(
        19, 21, offset=2, block=(8, 8),
        score=(lambda p: sm.t5_bias(p['table'], max_distance=32),
               lambda x, g, p: x + p['table'][_t5_buckets(g[3] - g[2], 16, 32, True), g[1]]),
        params={'table': TABLE}),
    'soft_cap_document': _case(
        27, 27, block=(8, 8),
        mask=(mm.document(IDS[:, :27]), lambda b, h, q, k: IDS[b, q] == IDS[b, k]),
        score=(lambda p: sm.soft_cap(2.0), lambda x, g, p: 2.0 * jnp.tanh(x / 2.0))),
    'alibi_cap_sinks': _case(
        21, 21, block=(8, 8), mask=(mm.causal(), lambda b, h, q, k: k <= q),
        score=(lambda p: sm.chain(sm.alibi(p['slopes']), sm.soft_cap(3.0)),
               lambda x, g, p: 3.0 * jnp.tanh((x - p['slopes'][g[1]] * jnp.abs(g[2] - g[3]))
                                              / 3.0)),
        params={'slopes': SLOPES}, sinks=True),
    'sinks_with_hidden_rows': _case(
        33, 33, mask=(mm.padding(LENGTHS, Q_LENGTHS),
                      lambda b, h, q, k: (k < LENGTHS[b]) & (q < Q_LENGTHS[b])), sinks=True),
}


def _naive(q, k, v, params, sinks, case):
  """The formula, materialized: softmax over visible keys (and the sink) of the scored logits."""
  t, s, offset = case['t'], case['s'], case['offset']
  grids = _grids(t, s, offset)
  groups = H // KV_HEADS
  k_h, v_h = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q.astype(jnp.float32), k_h.astype(jnp.float32))
  logits = logits / math.sqrt(D)
  if case['score'][1] is not None:
    logits = case['score'][1](logits, grids, params)
  visible = np.ones((B, H, t, s), bool)
  if case['mask'][1] is not None:
    visible = np.broadcast_to(case['mask'][1](*grids), (B, H, t, s))
  logits = jnp.where(visible, logits, -jnp.inf)
  if sinks is not None:
    column = jnp.broadcast_to(sinks[None, :, None, None], (B, H, t, 1))
    logits = jnp.concatenate([column, logits], axis=-1)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  if sinks is not None:
    weights = weights[..., 1:]
  return jnp.einsum('bhts,bshd->bthd', weights, v_h.astype(jnp.float32))


def _ops(impl, q, k, v, params, sinks, case):
  score_mod = case['score'][0](params) if case['score'][0] is not None else None
  return ops.dot_product_attention(
      q, k, v, mask_mod=case['mask'][0], score_mod=score_mod, sinks=sinks,
      q_offset=case['offset'], implementation=impl,
      block_size=case['block'] if impl == 'blockwise' else None)


def _loss(fn, q, k, v, params, sinks):
  out = fn(q, k, v, params, sinks)
  return jnp.sum(out * jnp.cos(out)), out  # a non-linear loss: cotangents vary per element


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_function_matches_the_formula_in_values_and_gradients(name):
  case = CASES[name]
  q, k, v = _qkv(case['t'], case['s'])
  params = jax.tree.map(jnp.asarray, case['params'])
  sinks = jnp.linspace(-1.0, 1.5, H) if case['sinks'] else None
  argnums = (0, 1, 2, 3) + ((4,) if case['sinks'] else ())

  @jax.jit
  def all_three(q, k, v, params, sinks):
    results = []
    for fn in (functools.partial(_naive, case=case),
               functools.partial(_ops, 'dense', case=case),
               functools.partial(_ops, 'blockwise', case=case)):
      results.append(jax.grad(functools.partial(_loss, fn), argnums=argnums, has_aux=True)(
          q, k, v, params, sinks))
    return results

  (want_grads, want), (dense_grads, dense), (block_grads, block) = all_three(q, k, v, params,
                                                                             sinks)
  np.testing.assert_allclose(dense, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(block, dense, atol=1e-5, rtol=1e-5)
  for grads in (dense_grads, block_grads):
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
      scale = max(1.0, float(jnp.max(jnp.abs(ref))))
      np.testing.assert_allclose(got, ref, atol=GRAD_TOL * scale, rtol=GRAD_TOL)
  if case['mask'][1] is not None and case['score'][0] is None and not case['sinks']:
    # Masks alone: also the float64 NumPy reference (GQA by index arithmetic).
    mask = np.broadcast_to(case['mask'][1](*_grids(case['t'], case['s'], case['offset'])),
                           (B, H, case['t'], case['s']))
    np.testing.assert_allclose(block, reference.reference_attention(q, k, v, mask=mask),
                               atol=2e-5, rtol=2e-5)
  if name in ('padding_hides_rows', 'sinks_with_hidden_rows'):
    hidden = np.arange(case['t'])[None, :] >= Q_LENGTHS[:, None]  # [B, T]
    assert hidden.any() and np.all(np.asarray(block)[hidden] == 0.0)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(block_grads))


def test_bf16_document_mask_with_soft_cap():
  case = CASES['soft_cap_document']
  q, k, v = _qkv(case['t'], case['s'], dtype=jnp.bfloat16)
  want = _naive(q, k, v, {}, None, case)
  for impl in ('dense', 'blockwise'):
    got = _ops(impl, q, k, v, {}, None, case)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


def test_builtin_keywords_are_the_same_mask_functions():
  q, k, v = _qkv(29, 29)
  ids = jnp.asarray(IDS[:, :29])
  for impl in ('dense', 'blockwise'):
    run = functools.partial(ops.dot_product_attention, q, k, v, implementation=impl)
    np.testing.assert_array_equal(run(is_causal=True, local_window=(4, 0), segment_ids=ids),
                                  run(mask_mod=mm.and_masks(mm.causal(), mm.sliding_window(4),
                                                            mm.document(ids))))


def _visible_blocks(visible, bq, bk):
  """bool [B, nq, nk]: blocks with at least one visible (query, key) pair."""
  b, t, s = visible.shape
  padded = np.zeros((b, -(-t // bq) * bq, -(-s // bk) * bk), bool)
  padded[:, :t, :s] = visible
  return padded.reshape(b, -1, bq, padded.shape[2] // bk, bk).any(axis=(2, 4))


def test_the_loop_visits_exactly_the_blocks_with_a_visible_pair():
  # Per batch row (different documents per row), forward and backward: the score function
  # reports every block it is evaluated on; it runs on every visited block and no other.
  t, bq, bk = 24, 8, 8
  ids = np.array([[0] * 5 + [1] * 11 + [2] * 8, [0] * 17 + [1] * 7])
  mask_mod = mm.and_masks(mm.causal(), mm.document(ids))
  q, k, v = (x[:, :t, :1] for x in _qkv(t, t))  # one head: one report per position
  seen = set()

  def report(score, b, h, q_idx, kv_idx):
    jax.debug.callback(lambda *a: seen.add(tuple(int(x) for x in a)), b, q_idx // bq,
                       kv_idx // bk)
    return score

  bm = ops.block_mask(mask_mod, batch=2, heads=1, q_len=t, block_size=(bq, bk))
  visible = (ids[:, :, None] == ids[:, None, :]) & np.tril(np.ones((t, t), bool))
  want = _visible_blocks(visible, bq, bk)
  want_set = {(b, i, j) for b, i, j in zip(*np.nonzero(want), strict=True)}
  np.testing.assert_array_equal(bm.visited(), want)  # groups = batch rows: one per row
  assert want.sum() < want.size  # some blocks are hidden

  def loss(q, k, v):
    return jnp.sum(ops.dot_product_attention(q, k, v, block_mask=bm, score_mod=report,
                                             implementation='blockwise') ** 2)

  jax.jit(loss)(q, k, v)
  assert seen == want_set
  seen.clear()
  jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # forward and backward passes
  assert seen == want_set


def test_band_masks_are_classified_from_corners_like_the_evaluated_mask():
  # A band (sliding window) is classified analytically; the same mask as an opaque function
  # is evaluated element by element: the two block masks agree.
  t, s, offset = 45, 61, 11
  band = mm.and_masks(mm.causal(), mm.sliding_window(9))
  opaque = lambda b, h, q, k: (k <= q) & (k >= q - 9)  # noqa: E731
  kw = dict(batch=1, heads=1, q_len=t, kv_len=s, block_size=(8, 16), q_offset=offset)
  a, b = ops.block_mask(band, **kw), ops.block_mask(opaque, **kw)
  for name in ('full_num', 'full_idx', 'partial_num', 'partial_idx', 'full_num_t',
               'partial_num_t'):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
  np.testing.assert_array_equal(a.dense()[0, 0], reference.window(t, s, 9, 0, offset)[0, 0]
                                & reference.causal(t, s, offset)[0, 0])


def test_a_block_mask_as_jit_argument_is_not_retraced_for_new_documents():
  traces = []

  @jax.jit
  def attend(q, k, v, bm):
    traces.append(1)
    return ops.dot_product_attention(q, k, v, block_mask=bm)

  q, k, v = _qkv(16, 16)
  for seed in range(3):
    ids = np.sort(np.random.default_rng(seed).integers(0, 3, size=(B, 16)), axis=1)
    bm = ops.block_mask(mm.document(ids), batch=B, heads=H, q_len=16, block_size=8)
    attend(q, k, v, bm)
  assert len(traces) == 1


def test_merge_attention_of_two_halves_is_the_whole():
  t, s, split = 19, 26, 11
  q, k, v = _qkv(t, s)
  sinks = jnp.linspace(-1.0, 1.0, H)

  def whole(q, k, v):
    return ops.dot_product_attention(q, k, v, is_causal=True, q_offset=7, sinks=sinks,
                                     return_lse=True, implementation='dense')

  def halves(q, k, v, impl):
    # Keys [0, split) and [split, s); the causal mask in absolute positions on both.
    first = ops.dot_product_attention(
        q, k[:, :split], v[:, :split], is_causal=True, q_offset=7, sinks=sinks,
        return_lse=True, implementation=impl, block_size=8)
    causal_second = lambda b, h, qi, ki: ki + split <= qi  # noqa: E731
    second = ops.dot_product_attention(
        q, k[:, split:], v[:, split:], mask_mod=causal_second, q_offset=7, return_lse=True,
        implementation=impl, block_size=8)
    return ops.merge_attention(*first, *second)

  want_out, want_lse = whole(q, k, v)
  grad = lambda f: jax.grad(lambda *x: jnp.sum(jnp.sin(f(*x)[0])) + jnp.sum(f(*x)[1]),  # noqa: E731
                            argnums=(0, 1, 2))
  want_grads = jax.jit(grad(whole))(q, k, v)
  for impl in ('dense', 'blockwise'):
    out, lse = jax.jit(functools.partial(halves, impl=impl))(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    grads = jax.jit(grad(functools.partial(halves, impl=impl)))(q, k, v)
    for got, ref in zip(grads, want_grads, strict=True):
      np.testing.assert_allclose(got, ref, atol=GRAD_TOL, rtol=GRAD_TOL)
  # A row that sees nothing in either part: zeros and -inf.
  empty = jnp.full((B, H, t), -jnp.inf)
  out, lse = ops.merge_attention(jnp.ones((B, t, H, D)), empty, jnp.ones((B, t, H, D)), empty)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(lse))


def test_bad_mask_and_score_functions_fail_by_name_before_compiling():
  q, k, v = _qkv(8, 8)

  def two_args(q_idx, kv_idx):
    return q_idx >= kv_idx

  def returns_float(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).astype(jnp.float32)

  def returns_vector(score, b, h, q_idx, kv_idx):
    return jnp.stack([score, score])

  with pytest.raises(ValueError, match=r'mask_mod .*two_args must take \(b, h, q_idx, kv_idx\)'):
    ops.dot_product_attention(q, k, v, mask_mod=two_args)
  with pytest.raises(ValueError, match=r'mask_mod .*returns_float must return a bool scalar.*'
                                       r'returned float32\[\]'):
    ops.dot_product_attention(q, k, v, mask_mod=returns_float, implementation='blockwise')
  with pytest.raises(ValueError, match=r'score_mod .*returns_vector must return a float scalar.*'
                                       r'float32\[2\]'):
    ops.dot_product_attention(q, k, v, score_mod=returns_vector)
  with pytest.raises(ValueError, match='block_mask already holds the mask'):
    bm = ops.block_mask(mm.causal(), batch=B, heads=H, q_len=8)
    ops.dot_product_attention(q, k, v, block_mask=bm, is_causal=True)
  with pytest.raises(ValueError, match=r'built for \(batch, heads, q_len, kv_len\)'):
    bm = ops.block_mask(mm.causal(), batch=B, heads=H, q_len=9)
    ops.dot_product_attention(q, k, v, block_mask=bm)
  with pytest.raises(ValueError, match=r'sinks must be one logit per query head'):
    ops.dot_product_attention(q, k, v, sinks=jnp.zeros(3))


def test_the_dispatcher_keeps_the_zero_row_promise_on_the_fused_path():
  # cuDNN (like jax.nn) returns the mean of the values for a query that sees no key; the
  # dispatcher picks it for bf16 on GPU and zeroes those rows. The same wrapper runs here on
  # CPU with jax.nn's XLA kernel, which has the same mean-of-values behaviour.
  q, k, v = _qkv(8, 8, dtype=jnp.bfloat16)
  kw = dict(return_weights=False, dropout_rate=0.0, bias_fn=None, q_offset=0)
  assert ops.choose_implementation(q, k, backend='gpu', **kw) == 'cudnn'
  assert ops.choose_implementation(q, k, backend='gpu', open_attention=True, **kw) == 'dense'
  mask = jnp.ones((B, 1, 8, 8), bool).at[0, :, 3].set(False)  # row 3 of batch 0 sees nothing
  raw = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  assert float(jnp.abs(raw[0, 3].astype(jnp.float32)).max()) > 0  # mean of v, not zero
  fused = ops.fused_attention(q, k, v, mask=mask, implementation='xla')
  assert np.all(np.asarray(fused[0, 3], np.float32) == 0.0)
  dense = ops.dot_product_attention(q, k, v, mask=mask, implementation='dense')
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(dense, np.float32),
                             atol=3e-2)
