"""Context parallelism on 8 fake CPU devices: ring and all-gather attention over a 'sequence'
mesh axis equal the unsharded `ops.dot_product_attention` (dense) in values, lse and gradients
(q, k, v, sinks, learned score-function arrays); ring steps whose chunk pair the mask hides are
skipped in both passes (counted); bad lengths are rejected.

Tolerances: float32 values and lse 1e-5, gradients 1e-4 relative to the largest entry;
bfloat16 inputs 3e-2.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from attn_jax import ops
from attn_jax.ops import mask_mods as mm
from attn_jax.ops import score_mods as sm
from attn_jax.ops import sequence_layout as sl

B, T, H, D = 2, 64, 4, 8
GRAD_TOL = 1e-4
IDS = np.sort(np.random.default_rng(3).integers(0, 5, size=(B, T)), axis=1)  # true order
TABLE = np.random.default_rng(4).normal(size=(16, H)).astype(np.float32)


def _mesh(shape, names):
  return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _case(mesh, layout, kv_heads, *, strategy='ring', mask=None, visible=None, score=None,
          params=None, segments=False, sinks=False, **kwargs):
  """`mask`: (mask_mod, visible) over true positions; `score(params) -> score_mod`."""
  return dict(mesh=mesh, layout=layout, kv_heads=kv_heads, strategy=strategy, mask=mask,
              visible=visible, score=score, params=params or {}, segments=segments,
              sinks=sinks, kwargs=kwargs)


def _causal(q, k):
  return k <= q


CASES = {
    # Balanced causal ring with packed documents as sharded segment ids, capped ALiBi and
    # sinks; dense local calls (their backward recomputes each part).
    'zigzag_causal_segments_softcap_sinks_gqa': _case(
        ((8,), ('sequence',)), 'zigzag', 2, segments=True, sinks=True, is_causal=True,
        score=lambda p: sm.chain(sm.alibi(p['slopes']), sm.soft_cap(2.0)),
        params={'slopes': np.asarray(ops.alibi_slopes(H))}, implementation='dense',
        visible=lambda b, q, k: _causal(q, k) & (IDS[b, q] == IDS[b, k])),
    # A window that also looks ahead (keys of the next device), heads split over a second
    # axis (ALiBi must see global heads), blockwise local calls (their backward takes the
    # saved global out and lse).
    'contiguous_window_alibi_heads_sharded': _case(
        ((4, 2), ('sequence', 'tensor')), 'contiguous', 2, head_axis='tensor',
        local_window=(5, 2), implementation='blockwise', block_size=4,
        score=lambda p: sm.alibi(p['slopes']), params={'slopes': np.asarray(ops.alibi_slopes(H))},
        visible=lambda b, q, k: (k <= q + 2) & (k >= q - 5)),
    # Batch split over 'data' (the document ids, closed over whole, need global rows), a
    # learned T5 table whose gradient is summed over the devices.
    'zigzag_documents_t5_batch_sharded': _case(
        ((2, 4), ('data', 'sequence')), 'zigzag', 2, batch_axis='data',
        implementation='blockwise', block_size=4, mask=mm.and_masks(mm.causal(), mm.document(IDS)),
        visible=lambda b, q, k: _causal(q, k) & (IDS[b, q] == IDS[b, k]),
        score=lambda p: sm.t5_bias(p['table'], bidirectional=False, max_distance=32),
        params={'table': TABLE}),
    # MQA on 4 sequence devices: 'auto' gathers K/V. Segment ids, a T5 table and sinks.
    'all_gather_mqa_segments_t5_sinks': _case(
        ((2, 4), ('data', 'sequence')), 'zigzag', 1, strategy='auto', batch_axis='data',
        segments=True, sinks=True, is_causal=True,
        score=lambda p: sm.t5_bias(p['table'], bidirectional=False, max_distance=32),
        params={'table': TABLE},
        visible=lambda b, q, k: _causal(q, k) & (IDS[b, q] == IDS[b, k])),
}


def _inputs(kv_heads, seed=0):
  rng = np.random.default_rng(seed)
  shapes = ((B, T, H, D), (B, T, kv_heads, D), (B, T, kv_heads, D))
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _unsharded(case, q, k, v, params, sinks):
  kw = {n: x for n, x in case['kwargs'].items() if n in ('is_causal', 'local_window')}
  score = case['score'](params) if case['score'] else None
  return ops.dot_product_attention(
      q, k, v, mask_mod=case['mask'], score_mod=score, sinks=sinks, return_lse=True,
      segment_ids=jnp.asarray(IDS) if case['segments'] else None, implementation='dense', **kw)


def _sharded(case, on_step, q, k, v, params, sinks):
  (shape, names), layout = case['mesh'], case['layout']
  mesh = _mesh(shape, names)
  n = mesh.shape['sequence']
  to = functools.partial(sl.to_layout, devices=n, layout=layout)
  score = case['score'](params) if case['score'] else None
  seg = to(jnp.asarray(IDS)) if case['segments'] else None
  out, lse = ops.sequence_sharded_attention(
      to(q), to(k), to(v), mesh=mesh, layout=layout, strategy=case['strategy'],
      segment_ids=seg, mask_mod=case['mask'], score_mod=score, sinks=sinks, return_lse=True,
      on_step=on_step, **case['kwargs'])
  back = functools.partial(sl.from_layout, devices=n, layout=layout)
  return back(out), back(lse, axis=2)


def _values_and_grads(fn, q, k, v, params, sinks):
  """(out, lse) and the gradients of a non-linear loss of both w.r.t. every input."""
  def loss(*args):
    out, lse = fn(*args)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse)), (out, lse)
  argnums = (0, 1, 2, 3) + ((4,) if sinks is not None else ())
  grads, values = jax.grad(loss, argnums=argnums, has_aux=True)(q, k, v, params, sinks)
  return values, grads


def _expected_pairs(case, sizes):
  """How many (query chunk, key chunk) pairs the ring must compute in each pass: those with a
  visible (query, key) among the batch rows of the device, over all devices and steps."""
  seq, rows, heads = sizes['sequence'], B // sizes.get('data', 1), sizes.get('tensor', 1)
  per = sl.chunks_per_device(case['layout'])
  size = T // (seq * per)
  order = sl.chunk_order(seq, case['layout'])
  q_idx, k_idx = np.meshgrid(np.arange(T), np.arange(T), indexing='ij')
  visible = np.stack([case['visible'](b, q_idx, k_idx) for b in range(B)])  # [B, T, T]
  count = 0
  for shard in range(B // rows):
    block = visible[shard * rows:(shard + 1) * rows].any(axis=0)
    chunks = block.reshape(T // size, size, T // size, size).any(axis=(1, 3))
    for dev in range(seq):
      for src in range(seq):  # every step brings one device's chunks
        mine, theirs = order[dev * per:(dev + 1) * per], order[src * per:(src + 1) * per]
        count += int(chunks[np.ix_(mine, theirs)].sum()) * heads
  return count


@pytest.mark.parametrize('name', sorted(CASES))
def test_sharded_attention_equals_the_unsharded_op(name):
  case = CASES[name]
  q, k, v = _inputs(case['kv_heads'])
  params = jax.tree.map(jnp.asarray, case['params'])
  sinks = jnp.linspace(-1.0, 1.5, H) if case['sinks'] else None
  counts = collections.Counter()
  on_step = lambda name, *_: counts.update([name])  # noqa: E731
  sharded = jax.jit(functools.partial(_values_and_grads,
                                      functools.partial(_sharded, case, on_step)))
  (out, lse), grads = sharded(q, k, v, params, sinks)
  (want, want_lse), want_grads = jax.jit(functools.partial(
      _values_and_grads, functools.partial(_unsharded, case)))(q, k, v, params, sinks)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
  assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(want_grads))
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    scale = max(1.0, float(jnp.max(jnp.abs(ref))))
    np.testing.assert_allclose(got, ref, atol=GRAD_TOL * scale, rtol=GRAD_TOL)
  sizes = dict(zip(case['mesh'][1], case['mesh'][0], strict=True))
  strategy = case['strategy']
  if strategy == 'auto':
    strategy = ops.choose_strategy(H, case['kv_heads'], sizes['sequence'])
  if strategy == 'ring':
    # Skipping is real: a hidden pair's branch never runs, forward or backward.
    want_pairs = _expected_pairs(case, sizes)
    total = int(np.prod(case['mesh'][0])) * sizes['sequence'] * (
        sl.chunks_per_device(case['layout']) ** 2)
    assert 0 < want_pairs < total
    assert counts == {'forward': want_pairs, 'backward': want_pairs}
  else:
    assert not counts  # the all-gather path has no ring steps


def test_zigzag_balances_causal_work():
  # Every device computes the same number of chunk pairs (2n + 1 of 4n): none idles.
  n = 8
  mesh = _mesh((n,), ('sequence',))
  q, k, v = _inputs(2)
  per_device = collections.Counter()
  on_step = lambda name, step, qi, ki, dev: per_device.update([int(dev)])  # noqa: E731
  run = jax.jit(lambda q, k, v: ops.sequence_sharded_attention(
      q, k, v, mesh=mesh, layout='zigzag', strategy='ring', is_causal=True, on_step=on_step))
  jax.block_until_ready(run(q, k, v))
  assert per_device == {d: 2 * n + 1 for d in range(n)}


def test_bfloat16_ring_is_close_to_float32():
  # bf16 inputs, float32 softmax statistics and merges: within bf16 rounding of the float32
  # unsharded op (3e-2), for both local paths.
  mesh = _mesh((8,), ('sequence',))
  q, k, v = _inputs(2)
  want = ops.dot_product_attention(q, k, v, is_causal=True)
  to = functools.partial(sl.to_layout, devices=8)

  @jax.jit
  def both(q, k, v):
    return [sl.from_layout(ops.sequence_sharded_attention(
        to(q), to(k), to(v), mesh=mesh, layout='zigzag', strategy='ring', is_causal=True,
        implementation=impl, block_size=2), 8) for impl in ('dense', 'blockwise')]

  for got in both(*(x.astype(jnp.bfloat16) for x in (q, k, v))):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


def test_layout_helpers():
  assert list(sl.chunk_order(4, 'zigzag')) == [0, 7, 1, 6, 2, 5, 3, 4]
  x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
  laid = sl.to_layout(x, 4, 'zigzag')
  np.testing.assert_array_equal(sl.from_layout(laid, 4, 'zigzag'), x)
  np.testing.assert_array_equal(laid[0, :, 0] // 3, sl.layout_positions(16, 4, 'zigzag'))
  np.testing.assert_array_equal(sl.to_layout(x, 4, 'contiguous'), x)
  mesh = _mesh((4,), ('sequence',))
  local = jax.shard_map(lambda x: sl.local_positions(x.shape[0], 'sequence', 'zigzag'),
                        mesh=mesh, in_specs=jax.P('sequence'), out_specs=jax.P('sequence'))
  np.testing.assert_array_equal(local(jnp.zeros(16)), sl.layout_positions(16, 4, 'zigzag'))


def test_strategy_rule():
  assert ops.choose_strategy(heads=32, kv_heads=8, devices=4) == 'all_gather'  # GQA, few devs
  assert ops.choose_strategy(heads=32, kv_heads=8, devices=8) == 'ring'
  assert ops.choose_strategy(heads=8, kv_heads=8, devices=2) == 'ring'  # MHA
  assert ops.choose_strategy(heads=8, kv_heads=1, devices=8) == 'all_gather'  # MQA


def test_bad_lengths_and_arguments_are_rejected():
  mesh = _mesh((8,), ('sequence',))
  q, k, v = _inputs(2)
  run = functools.partial(ops.sequence_sharded_attention, mesh=mesh, is_causal=True)
  with pytest.raises(ValueError, match=r'sequence length 56 does not split into 16 equal'):
    run(q[:, :56], k[:, :56], v[:, :56], layout='zigzag')  # 56 = 8 x 7: odd per device
  with pytest.raises(ValueError, match=r'sequence length 60 does not split into 8 equal'):
    run(q[:, :60], k[:, :60], v[:, :60], layout='contiguous')
  with pytest.raises(ValueError, match='layout must be one of'):
    run(q, k, v, layout='striped')
  with pytest.raises(ValueError, match="strategy must be 'auto', 'ring' or 'all_gather'"):
    run(q, k, v, strategy='gather')

  def inside(q, k, v):  # a shard_map of its own: 8 devices x 7 local tokens
    return ops.context_parallel_attention(q, k, v, layout='zigzag')
  shard = functools.partial(jax.shard_map, mesh=mesh, in_specs=jax.P(None, 'sequence'),
                            out_specs=jax.P(None, 'sequence'))
  with pytest.raises(ValueError, match=r'\(8 devices x 7 local\) 56 does not split into 16'):
    shard(inside, check_vma=False)(q[:, :56], k[:, :56], v[:, :56])
  with pytest.raises(ValueError, match='local lengths differ'):
    shard(lambda q, k, v: ops.context_parallel_attention(q, k, v), check_vma=False)(
        q, k[:, :32], v[:, :32])
  with pytest.raises(ValueError, match=r'runs inside jax.shard_map\(..., check_vma=False\)'):
    shard(inside)(q, k, v)
