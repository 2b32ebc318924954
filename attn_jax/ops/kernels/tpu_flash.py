"""Flash attention for TPUs in Pallas' Mosaic backend: forward, dK/dV and dQ kernels that walk a
`BlockMask`'s visit lists through scalar prefetch and evaluate mask and score functions inside.

Tiles come from `blocks.TILES[('tpu', itemsize)]` (128 x 128, splash attention's default);
constraints (checked in `blocks.layout`): query and key tiles multiples of 128, or one tile
covering the (8-row padded) length; head dims up to 128 as they are, larger ones padded to a
multiple of 128. float16 inputs run in float32 (flash.py).

The visit lists arrive as scalar-prefetch operands (`PrefetchScalarGridSpec`, as in splash
attention): each row of the list is one query block's key blocks, fully visible ones first.
The innermost grid axis walks the list; index maps read it to fetch only the listed key tiles,
and past the list's end repeat the last entry, so Pallas fetches nothing new and the body is
skipped. Its width is a static bound on the visits (the band's width for causal/window masks,
else every block). Fully visible blocks run without the mask (`pl.when` on the entry's rank).

* forward `(batch, heads, q tiles, visits)`: online softmax in VMEM scratch, statistics kept
  lane-replicated `[tile_q, 128]` (as splash does) to avoid relayouts;
* dK/dV `(batch, kv heads, kv tiles, query heads per kv head, visits)`: key-major tiles
  `[tile_kv, tile_q]`, accumulated over the query heads of a key/value head (GQA without
  repeating K/V) and the transposed lists, written once;
* dQ `(batch, heads, q tiles, visits)`: the forward lists again.

Per-query and per-key inputs of the mask/score functions are stored lane- or
sublane-replicated (`[len, 128]` / `[8, len]`) in the orientation each kernel reads them (as
splash stores segment ids); per-(b, h) scalars and lookup tables live in SMEM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attn_jax.ops.kernels.blocks import LANES, SUBLANES, Layout
from attn_jax.ops.kernels.common import ModReaders, Plan, combined_visits, div, pad, tile_scores

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims, plan: Plan):
  return jax.lax.dot_general(a, b, dims, precision=plan.precision, preferred_element_type=F32)


def _lanes(x, n: int):
  """A lane-replicated `[rows, 128]` array as `[rows, n]`."""
  return x[:, :n] if n <= LANES else jnp.tile(x, (1, n // LANES))


def _smem():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


# --- The mask/score inputs, laid out per kernel orientation --------------------------------


def _mod_operands(kernel_mod, arrays, kv_major: bool, tiles, coords):
  """(laid-out arrays, BlockSpecs) of a KernelMod's prepared inputs for one kernel; `coords(
  *grid ids, *prefetch refs)` -> (b, h, q tile, kv tile) of a grid step."""
  tq, tk = tiles
  out, specs = [], []
  for spec, x in zip(kernel_mod.inputs, arrays, strict=True):
    rows = lambda b, h, s=spec: (b if s.reads_b else 0, h if s.reads_h else 0)  # noqa: E731
    if spec.kind in ('scalar', 'table'):
      out.append(x.reshape(-1))
      specs.append(_smem())
      continue
    column = (spec.kind == 'q') != kv_major  # the value varies along the tile's rows
    if column:  # [Bf, Hf, len, 128]
      out.append(jnp.broadcast_to(x[..., None], (*x.shape, LANES)))
      size = tq if spec.kind == 'q' else tk

      def index(*ids, s=spec, rows=rows):
        b, h, q_tile, kv_tile = coords(*ids)
        return (*rows(b, h), q_tile if s.kind == 'q' else kv_tile, 0)
      specs.append(pl.BlockSpec((None, None, size, LANES), index))
    else:  # [Bf, Hf, 8, len]
      out.append(jnp.broadcast_to(x[..., None, :], (*x.shape[:2], SUBLANES, x.shape[2])))
      size = tq if spec.kind == 'q' else tk

      def index(*ids, s=spec, rows=rows):
        b, h, q_tile, kv_tile = coords(*ids)
        return (*rows(b, h), 0, q_tile if s.kind == 'q' else kv_tile)
      specs.append(pl.BlockSpec((None, None, SUBLANES, size), index))
  return out, specs


def _readers(plan: Plan, mask_refs, score_refs, b, h, shape, kv_major: bool) -> ModReaders:
  """Reads of the mod inputs for one tile of `shape` (`[tq, tk]`, or `[tk, tq]` key-major)."""
  def make(kernel_mod, refs):
    if kernel_mod is None:
      return None, None

    def flat_rows(spec):
      bi = b if spec.reads_b else 0
      hi = h if spec.reads_h else 0
      return bi * (plan.heads if spec.reads_h else 1) + hi

    def read(i):
      spec, ref = kernel_mod.inputs[i], refs[i]
      if spec.kind == 'scalar':
        return ref[flat_rows(spec)]
      if (spec.kind == 'q') != kv_major:  # a column, lane-replicated
        return _lanes(ref[...], shape[1])
      return ref[:1, :]  # a row, sublane-replicated: [1, n] broadcasts down the tile

    def table(i, index):
      spec = kernel_mod.inputs[i]
      flat = flat_rows(spec)
      for n, j in zip(spec.shape, index, strict=True):
        flat = flat * n + j
      return refs[i][flat]
    return read, table

  mask_read, mask_table = make(plan.mask, mask_refs)
  score_read, score_table = make(plan.score, score_refs)
  return ModReaders(mask_read, mask_table, score_read, score_table)


def _split_rest(plan: Plan, refs, sinks: bool):
  refs = list(refs)
  sinks_ref = refs.pop(0) if sinks else None
  n_mask = len(plan.mask.inputs) if plan.mask is not None else 0
  n_score = len(plan.score.inputs) if plan.score is not None else 0
  mask, refs = refs[:n_mask], refs[n_mask:]
  score, refs = refs[:n_score], refs[n_score:]
  return sinks_ref, mask, score, refs


def _visit(plan: Plan, axis: str, tile: int, per_block: int, g, block, t, num_ref, idx_ref):
  """The tile index (along `axis`, in tiles) that grid step `t` of the list of (g, block)
  visits; past the end of the list, the last listed tile (no new fetch)."""
  num = num_ref[g, block]
  t = jnp.maximum(jnp.minimum(t, num * per_block - 1), 0)
  start_tiles = (plan.block_q if axis == 'q' else plan.block_kv) // tile
  visited = idx_ref[g, block, div(t, per_block)]
  blocks = plan.num_q_blocks if axis == 'q' else plan.num_kv_blocks
  return (visited * start_tiles if blocks > 1 else 0) + jax.lax.rem(t, jnp.int32(per_block))


def _run_visit(num_ref, nfull_ref, g, block, t, per_block: int, body):
  """Runs `body(masked)` if step `t` is on the list: without the mask on fully visible
  blocks (listed first), with it on partly visible ones."""
  on_list = t < num_ref[g, block] * per_block
  full = div(t, per_block) < nfull_ref[g, block]
  pl.when(on_list & full)(lambda: body(False))
  pl.when(on_list & jnp.logical_not(full))(lambda: body(True))


# --- Forward -------------------------------------------------------------------------------


def _fwd_kernel(offset_ref, num_ref, nfull_ref, idx_ref, q_ref, k_ref, v_ref, *refs, plan: Plan,
                lay: Layout, per_block: int):
  sinks_ref, mask_refs, score_refs, rest = _split_rest(plan, refs, plan.has_sinks)
  out_ref, lse_ref, max_ref, sum_ref, acc_ref = rest
  tq, tk = lay.fwd
  b, h, s, t = (pl.program_id(i) for i in range(4))
  g, block = plan.group(b, h), plan.block_of_tile('q', s, tq)

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if plan.has_sinks:  # the sink: one more logit per row, with no value
      max_ref[...] = jnp.full(max_ref.shape, sinks_ref[h], F32)
      sum_ref[...] = jnp.ones_like(sum_ref)
    else:
      max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, F32)
      sum_ref[...] = jnp.zeros_like(sum_ref)

  kv_tile = _visit(plan, 'kv', tk, per_block, g, block, t, num_ref, idx_ref)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len

  def body(masked):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    logits = _dot(q, k, NT, plan) * plan.scale  # [tq, tk]
    q_idx = offset_ref[0] + s * tq + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    kv_idx = kv_tile * tk + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
    readers = _readers(plan, mask_refs, score_refs, b, h, (tq, tk), kv_major=False)
    logits, visible, _ = tile_scores(plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx,
                                     readers=readers, masked=masked, pad_keys=pad_keys)
    if visible is not None:
      logits = jnp.where(visible, logits, -jnp.inf)
    row_max, row_sum = max_ref[...], sum_ref[...]  # [tq, 128], lane-replicated
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1)[:, None])
    # A row with nothing visible yet keeps max -inf; shift by 0 so exp gives 0, not NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    probs = jnp.exp(logits - _lanes(shift, tk))
    correction = jnp.exp(row_max - shift)
    sums = jax.lax.broadcast_in_dim(jnp.sum(probs, axis=1), row_sum.shape, (0,))
    max_ref[...], sum_ref[...] = new_max, row_sum * correction + sums
    acc_ref[...] = acc_ref[...] * _lanes(correction, lay.v_dim) + _dot(
        probs.astype(v.dtype), v, NN, plan)

  _run_visit(num_ref, nfull_ref, g, block, t, per_block, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    row_sum = sum_ref[...]
    empty = row_sum == 0.0  # nothing visible: output 0; lse +inf makes its backward probs 0
    safe = jnp.where(empty, 1.0, row_sum)
    out_ref[...] = (acc_ref[...] / _lanes(safe, lay.v_dim)).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, max_ref[...] + jnp.log(safe))


def _heads_major(x, length: int, dim: int):
  """`[B, len, heads, d]` -> padded `[B, heads, length, dim]`."""
  return pad(pad(x, 1, length), 3, dim).transpose(0, 2, 1, 3)


def _query_major_maps(plan, tq: int, tk: int, per_block: int):
  """(coords, q_map, kv_map) of a grid (batch, head, q tile, visit), the forward's and dQ's:
  visit `step` of a q tile reads the kv tile its block's visit list names."""
  g = plan.q_per_kv

  def coords(bi, hi, q_tile, step, offset_ref, num_ref, nfull_ref, idx_ref):
    del offset_ref, nfull_ref
    kv_tile = _visit(plan, 'kv', tk, per_block, plan.group(bi, hi),
                     plan.block_of_tile('q', q_tile, tq), step, num_ref, idx_ref)
    return bi, hi, q_tile, kv_tile

  def q_map(bi, hi, q_tile, *_):
    return bi, hi, q_tile, 0

  def kv_map(*ids):
    bi, hi, _, kv_tile = coords(*ids)
    return bi, div(hi, g), kv_tile, 0

  return coords, q_map, kv_map


def forward(plan: Plan, lay: Layout, q, k, v, q_offset, lists, sinks, mask_inputs, score_inputs,
            *, interpret: bool):
  """out `[B, T, H, Dv]` (q's dtype), lse float32 `[B, H, T]` (+inf: a row that sees nothing).

  As `gpu_flash.forward`."""
  b, t, h, _ = q.shape
  tq, tk = lay.fwd
  per_block = plan.tiles_per_block('kv', tk, lay.kv_pad)
  width = plan.max_visits * per_block
  num, nfull, idx = combined_visits(*lists, plan.max_visits)

  coords, q_map, kv_map = _query_major_maps(plan, tq, tk, per_block)

  mask_ops, mask_specs = _mod_operands(plan.mask, mask_inputs, False, lay.fwd, coords) if (
      plan.mask is not None) else ([], [])
  score_ops, score_specs = _mod_operands(plan.score, score_inputs, False, lay.fwd, coords) if (
      plan.score is not None) else ([], [])
  sink_ops = [sinks] if plan.has_sinks else []
  in_specs = [
      pl.BlockSpec((None, None, tq, lay.head_dim), q_map),
      pl.BlockSpec((None, None, tk, lay.head_dim), kv_map),
      pl.BlockSpec((None, None, tk, lay.v_dim), kv_map),
  ] + [_smem()] * len(sink_ops) + mask_specs + score_specs
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan, lay=lay, per_block=per_block),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, h, lay.q_pad // tq, width), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, tq, lay.v_dim), q_map),
                     pl.BlockSpec((None, None, tq, LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((tq, LANES), F32), pltpu.VMEM((tq, LANES), F32),
                          pltpu.VMEM((tq, lay.v_dim), F32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, lay.q_pad, lay.v_dim), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lay.q_pad, LANES), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret, name='attn_jax_flash_fwd',
  )(jnp.reshape(q_offset, (1,)).astype(jnp.int32), num, nfull, idx,
    _heads_major(q, lay.q_pad, lay.head_dim), _heads_major(k, lay.kv_pad, lay.head_dim),
    _heads_major(v, lay.kv_pad, lay.v_dim), *sink_ops, *mask_ops, *score_ops)
  return out[:, :, :t, :plan.v_dim].transpose(0, 2, 1, 3), lse[:, :, :t, 0]


# --- Backward ------------------------------------------------------------------------------


def _dkv_kernel(offset_ref, num_ref, nfull_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, plan: Plan, lay: Layout, per_block: int):
  _, mask_refs, score_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_rest(plan, refs, False)
  tq, tk = lay.bwd
  b, kv_head, kv_tile, j, t = (pl.program_id(i) for i in range(5))
  h = kv_head * plan.q_per_kv + j
  g, block = plan.group(b, h), plan.block_of_tile('kv', kv_tile, tk)

  @pl.when((j == 0) & (t == 0))
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  q_tile = _visit(plan, 'q', tq, per_block, g, block, t, num_ref, idx_ref)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len

  def body(masked):
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    logits = _dot(k, q, NT, plan) * plan.scale  # [tk, tq], key-major
    kv_idx = kv_tile * tk + jax.lax.broadcasted_iota(jnp.int32, (tk, tq), 0)
    q_idx = offset_ref[0] + q_tile * tq + jax.lax.broadcasted_iota(jnp.int32, (tk, tq), 1)
    readers = _readers(plan, mask_refs, score_refs, b, h, (tk, tq), kv_major=True)
    logits, visible, d_scores = tile_scores(
        plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, readers=readers, masked=masked,
        pad_keys=pad_keys, grad=True)
    probs = jnp.exp(logits - lse_ref[:1, :])  # rows that saw nothing: lse +inf, probs 0
    if visible is not None:
      probs = jnp.where(visible, probs, 0.0)
    dv_acc[...] += _dot(probs.astype(d_out.dtype), d_out, NN, plan)
    d_logits = probs * (_dot(v, d_out, NT, plan) - delta_ref[:1, :])
    if d_scores is not None:
      d_logits = d_logits * d_scores
    dk_acc[...] += _dot(d_logits.astype(q.dtype), q, NN, plan)

  _run_visit(num_ref, nfull_ref, g, block, t, per_block, body)

  @pl.when((j == plan.q_per_kv - 1) & (t == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(offset_ref, num_ref, nfull_ref, idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, plan: Plan, lay: Layout, per_block: int):
  _, mask_refs, score_refs, (dq_ref, dq_acc) = _split_rest(plan, refs, False)
  tq, tk = lay.bwd
  b, h, s, t = (pl.program_id(i) for i in range(4))
  g, block = plan.group(b, h), plan.block_of_tile('q', s, tq)

  @pl.when(t == 0)
  def _init():
    dq_acc[...] = jnp.zeros_like(dq_acc)

  kv_tile = _visit(plan, 'kv', tk, per_block, g, block, t, num_ref, idx_ref)
  pad_keys = plan.num_kv_blocks == 1 and lay.kv_pad > plan.kv_len

  def body(masked):
    q, k, v, d_out = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    logits = _dot(q, k, NT, plan) * plan.scale  # [tq, tk]
    q_idx = offset_ref[0] + s * tq + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
    kv_idx = kv_tile * tk + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
    readers = _readers(plan, mask_refs, score_refs, b, h, (tq, tk), kv_major=False)
    logits, visible, d_scores = tile_scores(
        plan, logits, b=b, h=h, q_idx=q_idx, kv_idx=kv_idx, readers=readers, masked=masked,
        pad_keys=pad_keys, grad=True)
    probs = jnp.exp(logits - _lanes(lse_ref[...], tk))
    if visible is not None:
      probs = jnp.where(visible, probs, 0.0)
    d_logits = probs * (_dot(d_out, v, NT, plan) - _lanes(delta_ref[...], tk))
    if d_scores is not None:
      d_logits = d_logits * d_scores
    dq_acc[...] += _dot(d_logits.astype(k.dtype), k, NN, plan)

  _run_visit(num_ref, nfull_ref, g, block, t, per_block, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * plan.scale).astype(dq_ref.dtype)


def backward(plan: Plan, lay: Layout, q, k, v, q_offset, lists, lists_t, mask_inputs,
             score_inputs, lse, delta, d_out, *, interpret: bool):
  """(dq, dk, dv) in the inputs' dtypes; as `gpu_flash.backward`."""
  b, t, h, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  tq, tk = lay.bwd
  g = plan.q_per_kv
  offset = jnp.reshape(q_offset, (1,)).astype(jnp.int32)
  q_h = _heads_major(q, lay.q_pad, lay.head_dim)
  do_h = _heads_major(d_out.astype(q.dtype), lay.q_pad, lay.v_dim)
  k_h = _heads_major(k, lay.kv_pad, lay.head_dim)
  v_h = _heads_major(v, lay.kv_pad, lay.v_dim)
  lse_p = pad(lse, 2, lay.q_pad, jnp.inf)  # padding rows: probabilities 0
  delta_p = pad(delta, 2, lay.q_pad)
  rows = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, h, SUBLANES, lay.q_pad))  # noqa: E731
  columns = lambda x: jnp.broadcast_to(x[..., None], (b, h, lay.q_pad, LANES))  # noqa: E731
  plan_bwd = dataclasses.replace(plan, has_sinks=False)  # sinks' gradient: outside, from lse

  # dK/dV: grid (b, kv head, kv tile, query head in group, visit).
  per_q = plan.tiles_per_block('q', tq, lay.q_pad)
  num_t, nfull_t, idx_t = combined_visits(*lists_t, plan.max_visits_t)

  def coords_t(bi, ki, kv_tile, j, step, offset_ref, num_ref, nfull_ref, idx_ref):
    del offset_ref, nfull_ref
    hi = ki * g + j
    q_tile = _visit(plan, 'q', tq, per_q, plan.group(bi, hi),
                    plan.block_of_tile('kv', kv_tile, tk), step, num_ref, idx_ref)
    return bi, hi, q_tile, kv_tile

  def q_map_t(*ids):
    bi, hi, q_tile, _ = coords_t(*ids)
    return bi, hi, q_tile, 0

  def row_map_t(*ids):
    bi, hi, q_tile, _ = coords_t(*ids)
    return bi, hi, 0, q_tile

  def kv_map_t(bi, ki, kv_tile, *_):
    return bi, ki, kv_tile, 0

  ops_t, specs_t = [], []
  for kernel_mod, arrays in ((plan.mask, mask_inputs), (plan.score, score_inputs)):
    if kernel_mod is not None:
      o, sp = _mod_operands(kernel_mod, arrays, True, lay.bwd, coords_t)
      ops_t, specs_t = ops_t + o, specs_t + sp
  d_k, d_v = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan_bwd, lay=lay, per_block=per_q),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, kh, lay.kv_pad // tk, g, plan.max_visits_t * per_q),
          in_specs=[
              pl.BlockSpec((None, None, tq, lay.head_dim), q_map_t),
              pl.BlockSpec((None, None, tk, lay.head_dim), kv_map_t),
              pl.BlockSpec((None, None, tk, lay.v_dim), kv_map_t),
              pl.BlockSpec((None, None, tq, lay.v_dim), q_map_t),
              pl.BlockSpec((None, None, SUBLANES, tq), row_map_t),
              pl.BlockSpec((None, None, SUBLANES, tq), row_map_t),
          ] + specs_t,
          out_specs=[pl.BlockSpec((None, None, tk, lay.head_dim), kv_map_t),
                     pl.BlockSpec((None, None, tk, lay.v_dim), kv_map_t)],
          scratch_shapes=[pltpu.VMEM((tk, lay.head_dim), F32),
                          pltpu.VMEM((tk, lay.v_dim), F32)]),
      out_shape=[jax.ShapeDtypeStruct((b, kh, lay.kv_pad, lay.head_dim), k.dtype),
                 jax.ShapeDtypeStruct((b, kh, lay.kv_pad, lay.v_dim), v.dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=(
          'parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret, name='attn_jax_flash_dkv',
  )(offset, num_t, nfull_t, idx_t, q_h, k_h, v_h, do_h, rows(lse_p), rows(delta_p), *ops_t)

  # dQ: grid (b, head, q tile, visit), as the forward.
  per_kv = plan.tiles_per_block('kv', tk, lay.kv_pad)
  num, nfull, idx = combined_visits(*lists, plan.max_visits)

  coords, q_map, kv_map = _query_major_maps(plan, tq, tk, per_kv)

  ops, specs = [], []
  for kernel_mod, arrays in ((plan.mask, mask_inputs), (plan.score, score_inputs)):
    if kernel_mod is not None:
      o, sp = _mod_operands(kernel_mod, arrays, False, lay.bwd, coords)
      ops, specs = ops + o, specs + sp
  d_q = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan_bwd, lay=lay, per_block=per_kv),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, h, lay.q_pad // tq, plan.max_visits * per_kv),
          in_specs=[
              pl.BlockSpec((None, None, tq, lay.head_dim), q_map),
              pl.BlockSpec((None, None, tk, lay.head_dim), kv_map),
              pl.BlockSpec((None, None, tk, lay.v_dim), kv_map),
              pl.BlockSpec((None, None, tq, lay.v_dim), q_map),
              pl.BlockSpec((None, None, tq, LANES), q_map),
              pl.BlockSpec((None, None, tq, LANES), q_map),
          ] + specs,
          out_specs=pl.BlockSpec((None, None, tq, lay.head_dim), q_map),
          scratch_shapes=[pltpu.VMEM((tq, lay.head_dim), F32)]),
      out_shape=jax.ShapeDtypeStruct((b, h, lay.q_pad, lay.head_dim), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret, name='attn_jax_flash_dq',
  )(offset, num, nfull, idx, q_h, k_h, v_h, do_h, columns(lse_p), columns(delta_p), *ops)

  d_q = d_q[:, :, :t, :q.shape[-1]].transpose(0, 2, 1, 3)
  d_k = d_k[:, :, :s, :k.shape[-1]].transpose(0, 2, 1, 3)
  d_v = d_v[:, :, :s, :v.shape[-1]].transpose(0, 2, 1, 3)
  return d_q, d_k, d_v
