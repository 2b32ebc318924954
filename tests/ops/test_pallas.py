"""The fused Pallas kernels, interpreted on CPU: values and gradients against the formulas.

* `implementation='pallas'` on CPU interprets the GPU (Triton) kernels through the same
  `platform_dependent` switch that picks the platform's kernel at lowering; it runs every case
  of test_open_attention (every mask and score function, alone and combined; GQA, odd lengths,
  offsets, sinks, hidden rows), with the lse in the loss.
* `kernel='tpu'` interprets the TPU (Mosaic) kernels: multi-block cases at 128-blocks.
* The blocks a kernel touches are exactly those with a visible pair (NaN-poisoned blocks).
* The dispatcher picks the kernels on GPU/TPU only, and which backward runs.

Tolerances: float32 values and lse 2e-5 against the formula (float32 jnp, the dense path's
reference in test_open_attention) and the float64 NumPy reference for masks alone; gradients
1e-4 relative to the largest entry; bfloat16 inputs 3e-2 on values, 5e-2 relative on
gradients. Interpreted kernels are slow to compile: every case is one jitted function, tiny.
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
from tests.ops.test_open_attention import CASES, Q_LENGTHS, H, _grids, _qkv, _t5_buckets

B = 2
GRAD_TOL = 1e-4


def _formula(q, k, v, params, sinks, case):
  """(out, lse) from the formulas, materialized in float32: softmax over the visible keys (and
  the sink) of the scored logits; zeros and -inf for a row that sees nothing."""
  t, s = q.shape[1], k.shape[1]
  grids = _grids(t, s, case['offset'])
  groups = q.shape[2] // k.shape[2]
  k_h, v_h = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q.astype(jnp.float32), k_h.astype(jnp.float32))
  logits = logits / math.sqrt(q.shape[-1])
  if case['score'][1] is not None:
    logits = case['score'][1](logits, grids, params)
  if case['mask'][1] is not None:
    visible = np.broadcast_to(case['mask'][1](*grids), logits.shape)
    logits = jnp.where(visible, logits, -jnp.inf)
  if sinks is not None:
    column = jnp.broadcast_to(sinks[None, :, None, None], (*logits.shape[:3], 1))
    logits = jnp.concatenate([column, logits], axis=-1)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  seen = total > 0
  lse = jnp.where(seen, jnp.log(jnp.where(seen, total, 1.0)) + peak, -jnp.inf)[..., 0]
  weights = weights / jnp.where(seen, total, 1.0)
  if sinks is not None:
    weights = weights[..., 1:]
  return jnp.einsum('bhts,bshd->bthd', weights, v_h.astype(jnp.float32)), lse


def _loss(fn, *args):
  out, lse = fn(*args)
  finite = jnp.isfinite(lse)  # hidden rows: lse -inf, no gradient through them
  loss = jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(finite, jnp.sin(lse), 0.0))
  return loss, (out, lse)


def _check_grads(got, want, tol=GRAD_TOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(g, w, atol=tol * scale, rtol=tol)


def _compare(case, pallas, q, k, v, params, sinks, argnums, tol=2e-5):
  """Values, lse and gradients of `pallas(q, k, v, params, sinks) -> (out, lse)` vs the formula,
  in one jitted function (one compile)."""
  formula = functools.partial(_formula, case=case)

  @jax.jit
  def both(q, k, v, params, sinks):
    return [jax.grad(functools.partial(_loss, fn), argnums=argnums, has_aux=True)(
        q, k, v, params, sinks) for fn in (formula, pallas)]

  (want_grads, (want, want_lse)), (grads, (out, lse)) = both(q, k, v, params, sinks)
  np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
  np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=tol)
  _check_grads(grads, want_grads)
  return out, grads


# Every case but three that others contain (causal: in document_causal and more; alibi_causal:
# in alibi_cap_sinks; padding_hides_rows: in sinks_with_hidden_rows): each case compiles an
# interpreted forward and backward, seconds of CI time.
OP_CASES = sorted(set(CASES) - {'causal', 'alibi_causal', 'padding_hides_rows'})


@pytest.mark.parametrize('name', OP_CASES)
def test_every_function_through_the_op_matches_the_formula(name):
  # The op's 'pallas' path; on CPU the GPU kernels, interpreted. Blocks of 16: 2-3 per axis.
  case = CASES[name]
  q, k, v = _qkv(case['t'], case['s'])
  params = jax.tree.map(jnp.asarray, case['params'])
  sinks = jnp.linspace(-1.0, 1.5, H) if case['sinks'] else None
  argnums = (0, 1, 2, 3) + ((4,) if case['sinks'] else ())

  def pallas(q, k, v, params, sinks):
    score_mod = case['score'][0](params) if case['score'][0] is not None else None
    return ops.dot_product_attention(
        q, k, v, mask_mod=case['mask'][0], score_mod=score_mod, sinks=sinks,
        q_offset=case['offset'], return_lse=True, implementation='pallas', block_size=16)

  out, grads = _compare(case, pallas, q, k, v, params, sinks, argnums)
  if case['mask'][1] is not None and case['score'][0] is None and not case['sinks']:
    mask = np.broadcast_to(case['mask'][1](*_grids(case['t'], case['s'], case['offset'])),
                           (B, H, case['t'], case['s']))
    np.testing.assert_allclose(out, reference.reference_attention(q, k, v, mask=mask),
                               atol=2e-5, rtol=2e-5)
  if name == 'sinks_with_hidden_rows':
    hidden = np.arange(case['t'])[None, :] >= Q_LENGTHS[:, None]  # [B, T]
    assert hidden.any() and np.all(np.asarray(out)[hidden] == 0.0)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


IDS = np.sort(np.random.default_rng(3).integers(0, 4, size=(B, 300)), axis=1)
SLOPES = np.asarray(ops.alibi_slopes(H))
TABLE = np.random.default_rng(4).normal(size=(16, H)).astype(np.float32)
LENGTHS, Q_LENS = np.array([170, 90]), np.array([200, 60])

# Multi-block cases for the TPU kernels (128-blocks: tiles are multiples of 128) and bigger
# GPU ones: (kernel, t, s, offset, block, mask (mod, formula), score (builder, formula),
# differentiated score params, constant score params, sinks).
KERNEL_CASES = {
    'tpu_documents_causal_gqa_sinks': dict(
        kernel='tpu', t=260, s=260, block=128, sinks=True,
        mask=(mm.and_masks(mm.causal(), mm.document(IDS[:, :260])),
              lambda b, h, q, k: (IDS[b, q] == IDS[b, k]) & (k <= q))),
    # A constant ALiBi table stays fused in the backward; the band bounds the grid to 3 of
    # the 5 key blocks (the visible ones are 2-4).
    'tpu_window_offset_alibi_cap': dict(
        kernel='tpu', t=150, s=600, offset=400, block=128,
        mask=(mm.and_masks(mm.causal(), mm.sliding_window(100)),
              lambda b, h, q, k: (k <= q) & (k >= q - 100)),
        score=(lambda p: sm.chain(sm.alibi(SLOPES), sm.soft_cap(4.0)),
               lambda x, g, p: 4.0 * jnp.tanh((x - SLOPES[g[1]] * np.abs(g[2] - g[3])) / 4.0))),
    # A learned T5 table: fused forward, blockwise backward (the table's gradient).
    'tpu_t5_table_hidden_rows': dict(
        kernel='tpu', t=200, s=200, block=128, params={'table': TABLE},
        mask=(mm.padding(LENGTHS, Q_LENS),
              lambda b, h, q, k: (k < LENGTHS[b]) & (q < Q_LENS[b])),
        score=(lambda p: sm.t5_bias(p['table'], max_distance=64),
               lambda x, g, p: x + p['table'][_t5(g[3] - g[2]), g[1]])),
    # Visit blocks of 64 walked in 32-tiles (fp32 GPU tiles), per-row prefix lengths; a
    # constant T5 table: gathered in the fused backward too.
    'gpu_subtiles_prefix_lm_t5': dict(
        kernel='gpu', t=150, s=150, block=64, sinks=True,
        mask=(mm.prefix_lm(np.array([40, 100])),
              lambda b, h, q, k: (k < np.array([40, 100])[b]) | (k <= q)),
        score=(lambda p: sm.t5_bias(TABLE, max_distance=64),
               lambda x, g, p: x + TABLE[_t5(g[3] - g[2]), g[1]])),
}


def _t5(relative):
  return _t5_buckets(relative, 16, 64, True)


@pytest.mark.parametrize('name', sorted(KERNEL_CASES))
def test_each_platforms_kernels_match_the_formula(name):
  spec = dict(offset=0, sinks=False, params={}, score=(None, None)) | KERNEL_CASES[name]
  case = dict(mask=spec['mask'], score=spec['score'], offset=spec['offset'])
  q, k, v = _qkv(spec['t'], spec['s'], seed=1)
  params = jax.tree.map(jnp.asarray, spec['params'])
  sinks = jnp.linspace(-1.0, 1.5, H) if spec['sinks'] else None
  argnums = (0, 1, 2) + ((3,) if params else ()) + ((4,) if spec['sinks'] else ())

  def pallas(q, k, v, params, sinks):
    score_mod = spec['score'][0](params) if spec['score'][0] is not None else None
    return ops.pallas_attention(q, k, v, mask_mod=spec['mask'][0], score_mod=score_mod,
                                sinks=sinks, q_offset=spec['offset'], return_lse=True,
                                block_size=spec['block'], kernel=spec['kernel'])

  _compare(case, pallas, q, k, v, params, sinks, argnums)


def test_bfloat16_inputs_on_both_kernels():
  case = dict(CASES['soft_cap_document'], offset=0)
  q, k, v = _qkv(case['t'], case['s'], dtype=jnp.bfloat16)
  want, want_lse = _formula(q, k, v, {}, None, case)
  formula = functools.partial(_formula, params=None, sinks=None, case=case)
  grad = jax.grad(functools.partial(_loss, formula), argnums=(0, 1, 2), has_aux=True)(q, k, v)[0]
  for kernel in ('gpu', 'tpu'):
    run = jax.jit(functools.partial(ops.pallas_attention, mask_mod=case['mask'][0],
                                    score_mod=case['score'][0]({}), return_lse=True,
                                    kernel=kernel, block_size=16 if kernel == 'gpu' else 128))
    out, lse = run(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(lse, want_lse, atol=3e-2, rtol=3e-2)
    if kernel == 'gpu':  # the backward in bf16 once (the TPU one shares its arithmetic)
      got = jax.jit(jax.grad(functools.partial(_loss, run), argnums=(0, 1, 2),
                             has_aux=True))(q, k, v)[0]
      assert all(g.dtype == jnp.bfloat16 for g in got)
      _check_grads([g.astype(jnp.float32) for g in got], grad, tol=5e-2)


def _visible_blocks(visible, bq, bk):
  """bool [B, nq, nk]: blocks with at least one visible (query, key) pair."""
  b, t, s = visible.shape
  padded = np.zeros((b, -(-t // bq) * bq, -(-s // bk) * bk), bool)
  padded[:, :t, :s] = visible
  return padded.reshape(b, -1, bq, padded.shape[2] // bk, bk).any(axis=(2, 4))


@pytest.mark.parametrize('kernel,block', [('gpu', 32), ('tpu', 128)])
def test_the_kernels_touch_exactly_the_blocks_with_a_visible_pair(kernel, block):
  # NaN in the keys/values of key block j reaches exactly the query blocks whose forward
  # loop visits j (0 * NaN is NaN); NaN in the queries of query block i reaches exactly the
  # dK/dV of the key blocks whose backward loop visits i. Both must be the visible blocks.
  t = 3 * block
  ids = np.repeat(np.array([[0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1]]), block // 2, axis=1)
  mask_mod = mm.and_masks(mm.causal(), mm.document(ids))
  visible = (ids[:, :, None] == ids[:, None, :]) & np.tril(np.ones((t, t), bool))
  want = _visible_blocks(visible, block, block)  # [B, nq, nk]
  assert 0 < want.sum() < want.size
  q, k, v = (x[:, :, :1] for x in _qkv(t, t))  # one query head: one row group per batch row
  bm = ops.block_mask(mask_mod, batch=B, heads=1, q_len=t, block_size=block)
  run = functools.partial(ops.pallas_attention, block_mask=bm, kernel=kernel)
  forward = jax.jit(run)
  grad_kv = jax.jit(jax.grad(lambda q, k, v: jnp.sum(run(q, k, v)), argnums=(1, 2)))
  rows = lambda x: np.isnan(np.asarray(x)).reshape(B, 3, -1).any(axis=2)  # noqa: E731
  for j in range(3):
    poison = jnp.zeros(t).at[j * block:(j + 1) * block].set(jnp.nan)[None, :, None, None]
    np.testing.assert_array_equal(rows(forward(q, k + poison, v + poison)), want[:, :, j])
    d_k, d_v = grad_kv(q + poison, k, v)  # now j is a query block
    np.testing.assert_array_equal(rows(d_k) | rows(d_v), want[:, j, :])


def test_a_learned_score_array_takes_the_blockwise_backward_and_constants_stay_fused():
  q, k, v = _qkv(40, 40)
  count = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count('pallas_call')  # noqa: E731

  def loss(q, table):
    return jnp.sum(ops.pallas_attention(q, k, v, score_mod=sm.t5_bias(table), kernel='gpu'))

  table = jnp.asarray(TABLE)
  assert count(jax.grad(loss), q, table) == 3  # forward, dK/dV, dQ kernels
  assert count(jax.grad(loss, argnums=(0, 1)), q, table) == 1  # forward kernel only


def test_the_dispatcher_takes_the_kernels_on_accelerators_only():
  def choose(t, dtype=jnp.bfloat16, backend='gpu', **kw):
    q = jax.ShapeDtypeStruct((1, t, H, 64), dtype)
    args = dict(return_weights=False, dropout_rate=0.0, bias_fn=None, q_offset=0) | kw
    return ops.choose_implementation(q, q, backend=backend, **args)

  short, long = 512, 4096
  for backend in ('gpu', 'tpu'):
    assert choose(short, backend=backend, open_attention=True, pallas_ok=True) == 'pallas'
    assert choose(long, jnp.float32, backend=backend, pallas_ok=True) == 'pallas'
    assert choose(short, jnp.float32, backend=backend, pallas_ok=True) == 'dense'
    assert choose(long, backend=backend, open_attention=True) == 'blockwise'  # not taken
    assert choose(short, backend=backend, open_attention=True, pallas_ok=True,
                  return_weights=True) == 'dense'
  assert choose(short, pallas_ok=True) == 'cudnn'  # a plain bf16 call on GPU stays on cuDNN
  assert choose(short, backend='tpu', pallas_ok=True) == 'dense'
  for t, want in ((128, 'dense'), (short, 'blockwise')):  # CPU: as before, never pallas
    assert choose(t, backend='cpu', open_attention=True, pallas_ok=True) == want


def test_the_block_mask_geometry_is_known_before_building_it():
  # unsupported_reason (the dispatcher's test) predicts what pallas_attention builds.
  from attn_jax.ops.kernels import flash
  for t, s, sizes, mask_mod in ((37, 300, (128, 128), mm.causal()), (300, 37, 64, None),
                                (256, 256, (128, 64), mm.document(IDS[:, :256]))):
    dims = ops.shapes.Dims(B, t, s, H, 2, 8, 8)
    bm = ops.block_mask(mask_mod, batch=B, heads=H, q_len=t, kv_len=s, block_size=sizes)
    assert flash._geometry_of(dims, sizes, bm.mod) == flash._geometry(bm)


def test_calls_the_kernels_cannot_take_say_why():
  q, k, v = _qkv(16, 16)
  reason = lambda **kw: ops.kernels.unsupported_reason(q, k, v, **kw)  # noqa: E731
  assert reason(is_causal=True, segment_ids=jnp.zeros((B, 16), jnp.int32)) is None
  assert reason(mask=jnp.ones((B, 1, 1, 16), bool)) is None  # a key mask: per-key vector
  assert 'closed-over array with 2 indices' in reason(mask=jnp.ones((B, 1, 16, 16), bool))
  assert 'dense bias' in reason(bias=jnp.zeros((1, H, 16, 16)))
  assert 'dropout' in reason(dropout_rate=0.1)
  assert 'score_mod' in reason(bias_fn=ops.alibi_bias, bias_params=ops.alibi_slopes(H))
  bm = ops.block_mask(mm.causal(), batch=B, heads=H, q_len=16, block_size=8)
  assert 'admit no gpu kernel tile' in reason(block_mask=bm)
  with pytest.raises(ValueError, match=r"implementation='pallas' cannot take this call: .*"
                                       r'dense bias'):
    ops.dot_product_attention(q, k, v, bias=jnp.zeros((1, H, 16, 16)), implementation='pallas')
