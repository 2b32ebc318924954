"""Flash attention for GPUs in Pallas' Triton backend: forward, dK/dV and dQ kernels that walk a
`BlockMask`'s visit lists and evaluate mask and score functions inside.

Tiles come from `blocks.TILES[('gpu', itemsize)]` (bf16/fp16: forward 128 x 64, backward
64 x 64; fp32: 64 x 32 and 32 x 32); constraints (checked in `blocks.layout`): power-of-two
tiles >= 16, head dims padded to a power of two >= 16, a visit block a multiple of the tile.

Triton has no scalar prefetch, so each program reads its visit list from an int32 ref and walks
it with a `fori_loop` whose trip count is read from a ref: a program does exactly the work of
the blocks it visits (a 1K window at 32K runs ~10 key blocks per query block, causal ~128).
Grids (one program per tile and row):

* forward `(q tiles, batch, heads)`: online softmax over the listed key blocks (fully visible
  ones without the mask, then partly visible ones with it), output and row lse;
* dK/dV `(kv tiles, batch, kv heads)`: for each query head of the key/value head (GQA without
  repeating K/V), the query blocks of the transposed lists; probabilities recomputed from the
  saved lse (FlashAttention-2);
* dQ `(q tiles, batch, heads)`: the forward lists again.

Layout `[batch, len, heads, dim]` as the op's, so q/k/v/out need no transposes. Logits,
softmax statistics and accumulators are float32; the matmul operands stay in the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from attn_jax.ops.kernels.blocks import Layout
from attn_jax.ops.kernels.common import ModReaders, Plan, div, pad, tile_scores

F32 = jnp.float32


def _whole(x):
  """A BlockSpec passing the whole array (lists, tables, per-position vectors)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _dot(a, b, plan: Plan, trans_b: bool = False):
  b = b.T if trans_b else b
  return jnp.dot(a, b, precision=plan.precision, preferred_element_type=F32)


def _readers(plan: Plan, mask_refs, score_refs, b, h, q_start, tq, kv_start, tk) -> ModReaders:
  """Reads of the mod inputs for one `[tq, tk]` tile, q-major."""
  def make(kernel_mod, refs):
    if kernel_mod is None:
      return None, None

    def rows(spec):
      return (b if spec.reads_b else 0, h if spec.reads_h else 0)

    def read(i):
      spec, ref = kernel_mod.inputs[i], refs[i]
      if spec.kind == 'scalar':
        return ref[rows(spec)]
      if spec.kind == 'q':
        return ref[(*rows(spec), pl.ds(q_start, tq))][:, None]
      return ref[(*rows(spec), pl.ds(kv_start, tk))][None, :]

    def table(i, index):
      return refs[i][(*rows(kernel_mod.inputs[i]), *index)]
    return read, table

  mask_read, mask_table = make(plan.mask, mask_refs)
  score_read, score_table = make(plan.score, score_refs)
  return ModReaders(mask_read, mask_table, score_read, score_table, gather=True)


def _split_rest(plan: Plan, refs):
  """(sinks ref | None, mask input refs, score input refs, the rest)."""
  refs = list(refs)
  sinks = refs.pop(0) if plan.has_sinks else None
  n_mask = len(plan.mask.inputs) if plan.mask is not None else 0
  n_score = len(plan.score.inputs) if plan.score is not None else 0
  mask, refs = refs[:n_mask], refs[n_mask:]
  score, refs = refs[:n_score], refs[n_score:]
  return sinks, mask, score, refs


def _walk(plan: Plan, lists, axis: str, g, block, tiles: int, tile: int, fn, carry):
  """Calls `fn(masked, carry, start)` for every tile (along `axis`) of every block in the visit
  lists of (group g, block): fully visible blocks first, then partly visible ones."""
  full_num, full_idx, part_num, part_idx = lists

  def blocks(masked, idx_ref, n, carry):
    start = plan.block_start(axis, idx_ref[g, block, n])
    return jax.lax.fori_loop(
        0, tiles, lambda m, c: fn(masked, c, pl.multiple_of(start + m * tile, tile)), carry)

  carry = jax.lax.fori_loop(0, full_num[g, block], functools.partial(blocks, False, full_idx),
                            carry)
  return jax.lax.fori_loop(0, part_num[g, block], functools.partial(blocks, True, part_idx),
                           carry)


# --- Forward -------------------------------------------------------------------------------


def _fwd_kernel(offset_ref, full_num, full_idx, part_num, part_idx, q_ref, k_ref, v_ref, *refs,
                plan: Plan, lay: Layout):
  sinks_ref, mask_refs, score_refs, (out_ref, lse_ref) = _split_rest(plan, refs)
  tq, tk = lay.fwd
  s_tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_start = s_tile * tq
  q = q_ref[...]  # [tq, Dp]
  q_idx = offset_ref[0] + q_start + jax.lax.broadcasted_iota(jnp.int32, (tq, 1), 0)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len

  def tile(masked, carry, kv_start):
    row_max, row_sum, acc = carry  # [tq], [tq], [tq, Dv]
    k = k_ref[pl.ds(kv_start, tk), :]
    v = v_ref[pl.ds(kv_start, tk), :]
    kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, tk), 1)
    readers = _readers(plan, mask_refs, score_refs, b, h, q_start, tq, kv_start, tk)
    logits = _dot(q, k, plan, trans_b=True) * plan.scale  # [tq, tk]
    logits, visible, _ = tile_scores(plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx,
                                     readers=readers, masked=masked, pad_keys=pad_keys)
    if visible is not None:
      logits = jnp.where(visible, logits, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    # A row with nothing visible yet keeps max -inf; shift by 0 so exp gives 0, not NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    probs = jnp.exp(logits - shift[:, None])
    correction = jnp.exp(row_max - shift)
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v, plan)
    return new_max, row_sum, acc

  if plan.has_sinks:  # the sink: one more logit per row, with no value
    init = (jnp.full((tq,), sinks_ref[h], F32), jnp.ones((tq,), F32))
  else:
    init = (jnp.full((tq,), -jnp.inf, F32), jnp.zeros((tq,), F32))
  carry = init + (jnp.zeros((tq, lay.v_dim), F32),)
  lists = (full_num, full_idx, part_num, part_idx)
  block = plan.block_of_tile('q', s_tile, tq)
  carry = _walk(plan, lists, 'kv', plan.group(b, h), block,
                plan.tiles_per_block('kv', tk, lay.kv_pad), tk, tile, carry)
  row_max, row_sum, acc = carry
  empty = row_sum == 0.0  # nothing visible: output 0; lse +inf makes its backward probs 0
  out_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))


def _mod_specs(arrays):
  return [_whole(x) for x in arrays]


def forward(plan: Plan, lay: Layout, q, k, v, q_offset, lists, sinks, mask_inputs, score_inputs,
            *, interpret: bool):
  """out `[B, T, H, Dv]` (q's dtype), lse float32 `[B, H, T]` (+inf: a row that sees nothing).

  `lists`: the BlockMask's forward lists; `mask_inputs`/`score_inputs`: `KernelMod.prepare`d
  for positions `[0, lay.q_pad)` / `[0, lay.kv_pad)`.
  """
  b, t, h, _ = q.shape
  tq, _ = lay.fwd
  g = plan.q_per_kv
  q_p = pad(pad(q, 1, lay.q_pad), 3, lay.head_dim)
  k_p = pad(pad(k, 1, lay.kv_pad), 3, lay.head_dim)
  v_p = pad(pad(v, 1, lay.kv_pad), 3, lay.v_dim)
  offset = jnp.reshape(q_offset, (1,)).astype(jnp.int32)
  extra = ([sinks] if plan.has_sinks else []) + list(mask_inputs) + list(score_inputs)
  in_specs = ([_whole(offset)] + [_whole(x) for x in lists] + [
      pl.BlockSpec((None, tq, None, lay.head_dim), lambda i, bi, hi: (bi, i, hi, 0)),
      pl.BlockSpec((None, lay.kv_pad, None, lay.head_dim),
                   lambda i, bi, hi: (bi, 0, div(hi, g), 0)),
      pl.BlockSpec((None, lay.kv_pad, None, lay.v_dim), lambda i, bi, hi: (bi, 0, div(hi, g), 0)),
  ] + _mod_specs(extra))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, lay=lay),
      grid=(lay.q_pad // tq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, tq, None, lay.v_dim), lambda i, bi, hi: (bi, i, hi, 0)),
                 pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct((b, lay.q_pad, h, lay.v_dim), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lay.q_pad), F32)],
      compiler_params=pltr.CompilerParams(num_warps=lay.num_warps, num_stages=lay.num_stages),
      interpret=interpret, name='attn_jax_flash_fwd',
  )(offset, *lists, q_p, k_p, v_p, *extra)
  return out[:, :t, :, :plan.v_dim], lse[:, :, :t]


# --- Backward ------------------------------------------------------------------------------


def _dkv_kernel(offset_ref, full_num, full_idx, part_num, part_idx, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, *refs, plan: Plan, lay: Layout):
  _, mask_refs, score_refs, (dk_ref, dv_ref) = _split_rest(plan, refs)
  tq, tk = lay.bwd
  kv_tile, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_start = kv_tile * tk
  k = k_ref[...]  # [tk, Dp]
  v = v_ref[...]
  kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, tk), 1)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len
  block = plan.block_of_tile('kv', kv_tile, tk)
  lists = (full_num, full_idx, part_num, part_idx)

  def one_head(j, carry):  # query head j of this key/value head
    h = kv_head * plan.q_per_kv + j

    def tile(masked, carry, q_start):
      d_k, d_v = carry
      q = q_ref[pl.ds(q_start, tq), j, :]  # [tq, Dp]
      d_out = do_ref[pl.ds(q_start, tq), j, :]
      lse = lse_ref[j, pl.ds(q_start, tq)]
      delta = delta_ref[j, pl.ds(q_start, tq)]
      q_idx = offset_ref[0] + q_start + jax.lax.broadcasted_iota(jnp.int32, (tq, 1), 0)
      readers = _readers(plan, mask_refs, score_refs, b, h, q_start, tq, kv_start, tk)
      logits = _dot(q, k, plan, trans_b=True) * plan.scale
      logits, visible, d_scores = tile_scores(
          plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, readers=readers, masked=masked,
          pad_keys=pad_keys, grad=True)
      probs = jnp.exp(logits - lse[:, None])  # rows that saw nothing: lse +inf, probs 0
      if visible is not None:
        probs = jnp.where(visible, probs, 0.0)
      d_v = d_v + _dot(probs.astype(d_out.dtype).T, d_out, plan)
      d_probs = _dot(d_out, v, plan, trans_b=True)
      d_logits = probs * (d_probs - delta[:, None])
      if d_scores is not None:
        d_logits = d_logits * d_scores
      d_k = d_k + _dot(d_logits.astype(q.dtype).T, q, plan)
      return d_k, d_v

    return _walk(plan, lists, 'q', plan.group(b, h), block,
                 plan.tiles_per_block('q', tq, lay.q_pad), tq, tile, carry)

  init = (jnp.zeros((tk, lay.head_dim), F32), jnp.zeros((tk, lay.v_dim), F32))
  d_k, d_v = jax.lax.fori_loop(0, plan.q_per_kv, one_head, init)
  dk_ref[...] = (d_k * plan.scale).astype(dk_ref.dtype)
  dv_ref[...] = d_v.astype(dv_ref.dtype)


def _dq_kernel(offset_ref, full_num, full_idx, part_num, part_idx, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, *refs, plan: Plan, lay: Layout):
  _, mask_refs, score_refs, (dq_ref,) = _split_rest(plan, refs)
  tq, tk = lay.bwd
  s_tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_start = s_tile * tq
  q = q_ref[...]
  d_out = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_idx = offset_ref[0] + q_start + jax.lax.broadcasted_iota(jnp.int32, (tq, 1), 0)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len

  def tile(masked, d_q, kv_start):
    k = k_ref[pl.ds(kv_start, tk), :]
    v = v_ref[pl.ds(kv_start, tk), :]
    kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, tk), 1)
    readers = _readers(plan, mask_refs, score_refs, b, h, q_start, tq, kv_start, tk)
    logits = _dot(q, k, plan, trans_b=True) * plan.scale
    logits, visible, d_scores = tile_scores(
        plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, readers=readers, masked=masked,
        pad_keys=pad_keys, grad=True)
    probs = jnp.exp(logits - lse[:, None])
    if visible is not None:
      probs = jnp.where(visible, probs, 0.0)
    d_logits = probs * (_dot(d_out, v, plan, trans_b=True) - delta[:, None])
    if d_scores is not None:
      d_logits = d_logits * d_scores
    return d_q + _dot(d_logits.astype(k.dtype), k, plan)

  lists = (full_num, full_idx, part_num, part_idx)
  d_q = _walk(plan, lists, 'kv', plan.group(b, h), plan.block_of_tile('q', s_tile, tq),
              plan.tiles_per_block('kv', tk, lay.kv_pad), tk, tile,
              jnp.zeros((tq, lay.head_dim), F32))
  dq_ref[...] = (d_q * plan.scale).astype(dq_ref.dtype)


def backward(plan: Plan, lay: Layout, q, k, v, q_offset, lists, lists_t, mask_inputs,
             score_inputs, lse, delta, d_out, *, interpret: bool):
  """(dq, dk, dv) in the inputs' dtypes. `lse`/`delta` float32 `[B, H, T]` (lse +inf for rows
  that see nothing), `d_out` `[B, T, H, Dv]`."""
  b, t, h, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  tq, tk = lay.bwd
  g = plan.q_per_kv
  q_p = pad(pad(q, 1, lay.q_pad), 3, lay.head_dim)
  k_p = pad(pad(k, 1, lay.kv_pad), 3, lay.head_dim)
  v_p = pad(pad(v, 1, lay.kv_pad), 3, lay.v_dim)
  do_p = pad(pad(d_out.astype(q.dtype), 1, lay.q_pad), 3, lay.v_dim)
  lse_p = pad(lse, 2, lay.q_pad, jnp.inf)  # padding rows: probabilities 0
  delta_p = pad(delta, 2, lay.q_pad)
  offset = jnp.reshape(q_offset, (1,)).astype(jnp.int32)
  extra = list(mask_inputs) + list(score_inputs)
  params = pltr.CompilerParams(num_warps=lay.num_warps, num_stages=lay.num_stages)
  # The backward kernels take no sinks: their gradient comes from the lse, outside.
  static = dict(plan=dataclasses.replace(plan, has_sinks=False), lay=lay)

  d_k, d_v = pl.pallas_call(
      functools.partial(_dkv_kernel, **static),
      grid=(lay.kv_pad // tk, b, kh),
      in_specs=[_whole(offset)] + [_whole(x) for x in lists_t] + [
          pl.BlockSpec((None, lay.q_pad, g, lay.head_dim), lambda j, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, tk, None, lay.head_dim), lambda j, bi, ki: (bi, j, ki, 0)),
          pl.BlockSpec((None, tk, None, lay.v_dim), lambda j, bi, ki: (bi, j, ki, 0)),
          pl.BlockSpec((None, lay.q_pad, g, lay.v_dim), lambda j, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, g, lay.q_pad), lambda j, bi, ki: (bi, ki, 0)),
          pl.BlockSpec((None, g, lay.q_pad), lambda j, bi, ki: (bi, ki, 0)),
      ] + _mod_specs(extra),
      out_specs=[pl.BlockSpec((None, tk, None, lay.head_dim), lambda j, bi, ki: (bi, j, ki, 0)),
                 pl.BlockSpec((None, tk, None, lay.v_dim), lambda j, bi, ki: (bi, j, ki, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, lay.kv_pad, kh, lay.head_dim), k.dtype),
                 jax.ShapeDtypeStruct((b, lay.kv_pad, kh, lay.v_dim), v.dtype)],
      compiler_params=params, interpret=interpret, name='attn_jax_flash_dkv',
  )(offset, *lists_t, q_p, k_p, v_p, do_p, lse_p, delta_p, *extra)

  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(lay.q_pad // tq, b, h),
      in_specs=[_whole(offset)] + [_whole(x) for x in lists] + [
          pl.BlockSpec((None, tq, None, lay.head_dim), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, lay.kv_pad, None, lay.head_dim),
                       lambda i, bi, hi: (bi, 0, div(hi, g), 0)),
          pl.BlockSpec((None, lay.kv_pad, None, lay.v_dim),
                       lambda i, bi, hi: (bi, 0, div(hi, g), 0)),
          pl.BlockSpec((None, tq, None, lay.v_dim), lambda i, bi, hi: (bi, i, hi, 0)),
          pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, i)),
          pl.BlockSpec((None, None, tq), lambda i, bi, hi: (bi, hi, i)),
      ] + _mod_specs(extra),
      out_specs=pl.BlockSpec((None, tq, None, lay.head_dim), lambda i, bi, hi: (bi, i, hi, 0)),
      out_shape=jax.ShapeDtypeStruct((b, lay.q_pad, h, lay.head_dim), q.dtype),
      compiler_params=params, interpret=interpret, name='attn_jax_flash_dq',
  )(offset, *lists, q_p, k_p, v_p, do_p, lse_p, delta_p, *extra)
  return d_q[:, :t, :, :q.shape[-1]], d_k[:, :s, :, :k.shape[-1]], d_v[:, :s, :, :v.shape[-1]]

