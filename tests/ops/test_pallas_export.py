"""The Pallas kernels lower for GPU and TPU on this CPU-only machine: `jax.export` of the
gradient of a loss through `dot_product_attention(..., implementation='pallas')` with
`platforms=('cuda',)` emits Triton custom calls (forward, dK/dV, dQ) and with `('tpu',)` Mosaic
ones, for each feature combination. A kernel that would not lower there fails here; values
are checked in interpret mode (test_pallas.py), since only a device runs the lowered code.

Each combination is a (dtype, heads, kv heads, head dim, lengths) and a set of options; block
masks and closed-over arrays are built inside the exported function from its arguments, as a
training step does. `platform_dependent` lowers only the target's branch, so each export holds
exactly that platform's kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attn_jax import ops
from attn_jax.ops import mask_mods as mm
from attn_jax.ops import score_mods as sm

TRITON = '__gpu$xla.gpu.triton'
SHAPES = dict(batch=2, q_len=384, kv_len=384, heads=4, kv_heads=2, head_dim=128)


def _documents_sinks(ids, q_offset, table):
  del q_offset, table
  b, t = ids.shape
  bm = ops.block_mask(mm.and_masks(mm.causal(), mm.document(ids)), batch=b, heads=4, q_len=t,
                      block_size=128)
  return dict(block_mask=bm, sinks=jnp.linspace(-1.0, 1.0, 4), return_lse=True)


def _window_offset(ids, q_offset, table):
  del ids, table
  return dict(is_causal=True, local_window=(100, 0), q_offset=q_offset)  # traced offset


def _padding_prefix(ids, q_offset, table):
  del q_offset, table
  lengths = jnp.sum(ids >= 0, axis=1) - 7
  return dict(mask_mod=mm.and_masks(mm.padding(lengths, lengths - 3),
                                    mm.prefix_lm(jnp.array([5, 50]))))


def _alibi_cap(ids, q_offset, table):
  del ids, q_offset, table
  return dict(is_causal=True, score_mod=sm.chain(sm.alibi(ops.alibi_slopes(4)),
                                                  sm.soft_cap(30.0)))


def _t5_learned_segments(ids, q_offset, table):
  del q_offset
  return dict(score_mod=sm.t5_bias(table, max_distance=128), segment_ids=ids)


def _index_masks_t5_constant(ids, q_offset, table):
  del ids, q_offset
  # A table not differentiated: the fused backward reads it too (gather / one-hot).
  return dict(mask_mod=mm.and_masks(mm.chunked(64), mm.or_masks(mm.global_tokens(4),
                                                                mm.dilated(3),
                                                                mm.sliding_window(8, 8))),
              score_mod=sm.t5_bias(table))


def _key_mask_mqa(ids, q_offset, table):
  del q_offset, table
  return dict(mask=(ids >= 1)[:, None, None, :], return_lse=True)


# name -> (options builder, shape overrides, dtype, differentiate the T5 table)
COMBOS = {
    'documents_causal_sinks_lse_bf16': (_documents_sinks, {}, jnp.bfloat16, False),
    'window_traced_offset_q_ne_kv_f32': (_window_offset, dict(q_len=256, head_dim=64),
                                         jnp.float32, False),
    'padding_prefix_rows_f16_d256': (_padding_prefix, dict(head_dim=256), jnp.float16, False),
    'alibi_softcap_bf16_d64': (_alibi_cap, dict(head_dim=64), jnp.bfloat16, False),
    't5_learned_table_segments_bf16': (_t5_learned_segments, {}, jnp.bfloat16, True),
    'chunked_global_dilated_t5_d80': (_index_masks_t5_constant, dict(head_dim=80),
                                      jnp.bfloat16, False),
    'key_mask_mqa_odd_lengths': (_key_mask_mqa, dict(kv_heads=1, q_len=200, kv_len=333),
                                 jnp.float32, False),
}


def _export(name: str, platform: str) -> str:
  build, overrides, dtype, learn_table = COMBOS[name]
  s = SHAPES | overrides
  q = jax.ShapeDtypeStruct((s['batch'], s['q_len'], s['heads'], s['head_dim']), dtype)
  kv = jax.ShapeDtypeStruct((s['batch'], s['kv_len'], s['kv_heads'], s['head_dim']), dtype)
  ids = jax.ShapeDtypeStruct((s['batch'], s['kv_len']), jnp.int32)
  table = jax.ShapeDtypeStruct((32, s['heads']), jnp.float32)

  def loss(q, k, v, table, ids, q_offset):
    out = ops.dot_product_attention(q, k, v, implementation='pallas',
                                    **build(ids, q_offset, table))
    if isinstance(out, tuple):
      out, lse = out
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
    return jnp.sum(out.astype(jnp.float32))

  argnums = (0, 1, 2, 3) if learn_table else (0, 1, 2)
  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=argnums)), platforms=(platform,),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
  )(q, kv, kv, table, ids, jax.ShapeDtypeStruct((), jnp.int32))
  return exported.mlir_module()


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('name', sorted(COMBOS))
def test_forward_and_backward_lower_for_the_platform(name, platform):
  text = _export(name, platform)
  fused_backward = not COMBOS[name][3]
  kernels = 3 if fused_backward else 1  # a learned table: blockwise backward, fused forward
  if platform == 'cuda':
    assert text.count(f'@{TRITON}(') == kernels
    assert 'tpu_custom_call' not in text and 'mosaic_gpu' not in text
  else:
    assert text.count('@tpu_custom_call(') == kernels
    assert TRITON not in text
  for kernel in ('attn_jax_flash_fwd', 'attn_jax_flash_dkv', 'attn_jax_flash_dq')[:kernels]:
    assert kernel in text


def test_a_block_mask_fitting_only_the_gpu_kernels_lowers_for_gpu_only():
  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

  def attend(q):
    bm = ops.block_mask(mm.causal(), batch=1, heads=2, q_len=256, block_size=64)
    return ops.dot_product_attention(q, q, q, block_mask=bm, implementation='pallas')

  assert TRITON in jax.export.export(
      jax.jit(attend), platforms=('cuda',),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(q).mlir_module()
  with pytest.raises(Exception, match='tpu'):
    jax.export.export(jax.jit(attend), platforms=('tpu',))(q)

