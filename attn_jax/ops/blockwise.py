"""Memory-efficient, block-sparse attention: online softmax over key/value blocks, open to user
mask and score functions, with a custom VJP; runs wherever XLA runs (CPU, GPU, TPU).

The forward pass walks query blocks and, inside each, the key blocks its `BlockMask` lists
(fully visible ones first, without evaluating the mask, then partly visible ones, with it),
keeping a running max `m`, normalizer `l` and output accumulator per query row (Rabe & Staats
2021; Dao et al. 2022). It stores only the output and the row log-sum-exp. The backward pass
(a `jax.custom_vjp`) walks key blocks and, inside each, the query blocks the transposed lists
give, recomputing every block's probabilities from the saved log-sum-exp, accumulating dK/dV
per key block and dQ (transposed) into one `[head_dim, q_len]` buffer. Neither pass holds a
`[q_len, kv_len]` array, and hidden blocks are never visited in either.

Everything that shapes the logits is a function of positions: the mask (`mask_mod`, with the
built-in causal/window/segment/padding keywords turned into one) and the score function
(`score_mod`, with ALiBi/T5 `bias_fn`s turned into one) are evaluated on each block, and the
gradients of the floating-point arrays a score function closes over (a learned T5 table) are
accumulated through a per-block VJP. A dense `bias` array is sliced per block; attention sinks
join every row's normalizer.

Rows that share a block mask are processed together: a mask that reads neither the batch row
nor the head (causal, windows) makes one group of all `batch * heads` rows; a per-row mask
(documents, padding) one group per batch row. Inside a group everything is 3-D,
`[rows, block_rows, block_cols]`, laid out so that every product is a plain row-major matmul:
K is transposed once up front, the backward computes blocks key-major (`[bk, bq]`) and dQ
transposed. On XLA's CPU backend that is what makes the loop fast: a transposed operand or a
5-D block with size-1 axes costs a copy of the block, and 3-D blocks let the dot fuse with
the reductions after it (profiled with `experiments/bench_attention.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import block_mask as block_mask_lib
from attn_jax.ops import dropout as dropout_lib
from attn_jax.ops import keywords
from attn_jax.ops.mods import Mod
from attn_jax.ops.shapes import Dims, check_broadcastable, check_qkv

DEFAULT_BLOCK = block_mask_lib.DEFAULT_BLOCK


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable, trace-time configuration of one blockwise call."""
  dims: Dims
  block_q: int
  block_kv: int
  batch_groups: int
  head_groups: int
  score: Mod | None
  score_diff: tuple[bool, ...]  # which closed-over arrays of `score` get gradients
  has_bias: bool
  has_sinks: bool
  dropout_rate: float
  precision: Any

  @property
  def groups(self) -> int:
    return self.batch_groups * self.head_groups

  @property
  def batch_per_group(self) -> int:
    return self.dims.batch // self.batch_groups

  @property
  def heads_per_group(self) -> int:
    return self.dims.heads // self.head_groups

  @property
  def q_per_kv(self) -> int:
    """Query heads per key/value row inside a group (the GQA factor, 1 for per-head groups)."""
    return self.dims.groups if self.head_groups == 1 else 1

  @property
  def rows(self) -> int:
    return self.batch_per_group * self.heads_per_group

  @property
  def kv_rows(self) -> int:
    return self.rows // self.q_per_kv


# --- Layout: [batch, heads, ...] <-> [row groups, rows, ...] ---------------------------------


def _to_groups(st: _Static, x: jax.Array) -> jax.Array:
  """`[B, H, ...]` -> `[groups, rows, ...]` (a free reshape unless the mask is per head)."""
  bm, hm = st.batch_groups, st.head_groups
  rest = x.shape[2:]
  x = x.reshape(bm, x.shape[0] // bm, hm, x.shape[1] // hm, *rest)
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(bm * hm, -1, *rest)


def _from_groups(st: _Static, x: jax.Array) -> jax.Array:
  """`[groups, rows, ...]` -> `[B, H, ...]`."""
  bm, hm = st.batch_groups, st.head_groups
  rest = x.shape[2:]
  x = x.reshape(bm, hm, st.batch_per_group, st.heads_per_group, *rest)
  return jnp.swapaxes(x, 1, 2).reshape(st.dims.batch, st.dims.heads, *rest)


def _kv_to_groups(st: _Static, x: jax.Array) -> jax.Array:
  """k/v `[B, K, S, D]` -> `[groups, kv_rows, S, D]`; per-head groups take their own kv head."""
  if st.head_groups > 1:
    x = jnp.repeat(x, st.dims.groups, axis=1)  # [B, H, S, D]: each query head's kv head
    return _to_groups(st, x)
  return x.reshape(st.batch_groups, -1, *x.shape[2:])


def _kv_rows(st: _Static, x: jax.Array) -> jax.Array:
  """A `[kv_rows, r, c]` k/v block -> `[rows, r, c]`, repeated over the query heads it serves.

  Repeating a k/v block (small) lets every product batch over the query heads with the big
  `[bq, bk]` operands in place; letting the einsum broadcast instead puts the group axis
  between the block axes and costs a transpose of the whole logits block.
  """
  if st.q_per_kv == 1:
    return x
  x = jnp.broadcast_to(x[:, None], (x.shape[0], st.q_per_kv, *x.shape[1:]))
  return x.reshape(-1, *x.shape[2:])


def _bias_rows(st: _Static, x: jax.Array) -> jax.Array:
  """A `[Bg|1, Hg|1, r, c]` bias block -> `[rows|1, r, c]`."""
  if x.shape[:2] == (1, 1):
    return x.reshape(1, *x.shape[2:])
  full = (st.batch_per_group, st.heads_per_group)
  return jnp.broadcast_to(x, full + x.shape[2:]).reshape(-1, *x.shape[2:])


def _slice_block(x: jax.Array, q_start, kv_start, block_q: int, block_kv: int) -> jax.Array:
  """Block `[..., q_start:+block_q, kv_start:+block_kv]` of a `[..., T|1, S|1]` array; size-1
  (broadcast) axes are kept whole."""
  starts = [0] * (x.ndim - 2) + [q_start if x.shape[-2] > 1 else 0,
                                 kv_start if x.shape[-1] > 1 else 0]
  sizes = list(x.shape[:-2]) + [block_q if x.shape[-2] > 1 else 1,
                                block_kv if x.shape[-1] > 1 else 1]
  return jax.lax.dynamic_slice(x, starts, sizes)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes where `shape` (same rank) broadcasts with size 1."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n > 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


# --- One block -----------------------------------------------------------------------------


def _merge_consts(st: _Static, diff, nondiff):
  diff, nondiff = list(diff), list(nondiff)
  return tuple(diff.pop(0) if d else nondiff.pop(0) for d in st.score_diff)


def _scored(st: _Static, logits, diff, nondiff, b_idx, h_idx, q_pos, kv_pos, kv_major):
  """The score function on a `[rows, r, c]` block of logits (rows = (b, h) of the group)."""
  if st.score is None:
    return logits
  consts = _merge_consts(st, diff, nondiff)
  grid = logits.reshape(st.batch_per_group, st.heads_per_group, *logits.shape[1:])
  out = st.score.grid(consts, b_idx, h_idx, q_pos, kv_pos, score=grid, kv_major=kv_major)
  return out.reshape(logits.shape).astype(jnp.float32)


def _keep_scale(st: _Static) -> float:
  return 1.0 / dropout_lib.keep_probability(st.dropout_rate)


def _dropout_keep(st: _Static, rng, group, q_block, kv_block, num_q, num_kv, shape):
  """The block's keep-mask, a pure function of (rng, block indices): the backward pass
  regenerates exactly the forward's mask."""
  index = (group * num_q + q_block) * num_kv + kv_block
  return dropout_lib.dropout_mask(jax.random.fold_in(rng, index), shape, st.dropout_rate)


# --- Forward -------------------------------------------------------------------------------


def _forward(st: _Static, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng):
  """Per group: out `[groups, rows, Tp, Dv]` (float32), lse `[groups, rows, Tp]` (+inf for a
  row that sees nothing and has no sink)."""
  bq, bk = st.block_q, st.block_kv
  nq, nk = bm.num_q_blocks, bm.num_kv_blocks
  rows = st.rows
  k_t = jnp.swapaxes(k, -1, -2)  # [G, kv_rows, D, Sp], transposed once rather than per block

  def one_group(args):
    g, q_g, kt_g, v_g, bias_g, sinks_g, full_num, full_idx, part_num, part_idx = args
    b_idx, h_idx = bm.group_indices(g)

    def one_q_block(i):
      q_start = i * bq
      q_blk = jax.lax.dynamic_slice_in_dim(q_g, q_start, bq, axis=1)  # [rows, bq, D]
      q_pos = bm.q_offset + q_start + jnp.arange(bq)

      def update(masked, carry, kv_block):
        row_max, row_sum, acc = carry  # [rows, bq], [rows, bq], [rows, bq, Dv]
        kv_start = kv_block * bk
        kt_blk = _kv_rows(st, jax.lax.dynamic_slice_in_dim(kt_g, kv_start, bk, axis=2))
        v_blk = _kv_rows(st, jax.lax.dynamic_slice_in_dim(v_g, kv_start, bk, axis=1))
        kv_pos = kv_start + jnp.arange(bk)
        logits = jnp.einsum('hqd,hds->hqs', q_blk, kt_blk, precision=st.precision,
                            preferred_element_type=jnp.float32)
        if st.has_bias:
          block = _slice_block(bias_g, q_start, kv_start, bq, bk).astype(jnp.float32)
          logits = logits + _bias_rows(st, block)
        logits = _scored(st, logits, score_diff, score_nondiff, b_idx, h_idx, q_pos, kv_pos,
                         False)
        if masked:
          logits = jnp.where(bm.mask(g, q_pos, kv_pos), logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        # A row with nothing visible yet keeps max -inf; shift by 0 so exp() gives 0, not NaN.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(logits - shift[..., None])
        correction = jnp.exp(row_max - shift)
        row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
        if st.dropout_rate > 0.0:
          keep = _dropout_keep(st, rng, g, i, kv_block, nq, nk, (rows, bq, bk))
          probs = jnp.where(keep, probs * _keep_scale(st), 0.0)
        acc = acc * correction[..., None] + jnp.einsum(
            'hqs,hsd->hqd', probs.astype(v_blk.dtype), v_blk, precision=st.precision,
            preferred_element_type=jnp.float32)
        return new_max, row_sum, acc

      if st.has_sinks:  # The sink is one more logit per row, with no value.
        init = (jnp.broadcast_to(sinks_g[:, None], (rows, bq)), jnp.ones((rows, bq), jnp.float32))
      else:
        init = (jnp.full((rows, bq), -jnp.inf, jnp.float32), jnp.zeros((rows, bq), jnp.float32))
      carry = init + (jnp.zeros((rows, bq, v_g.shape[-1]), jnp.float32),)
      carry = jax.lax.fori_loop(0, full_num[i], lambda n, c: update(False, c, full_idx[i, n]),
                                carry)
      carry = jax.lax.fori_loop(0, part_num[i], lambda n, c: update(True, c, part_idx[i, n]),
                                carry)
      row_max, row_sum, acc = carry
      empty = row_sum == 0.0  # nothing visible: output 0; +inf lse makes its bwd probs 0
      out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
      lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
      return out, lse

    out, lse = jax.lax.map(one_q_block, jnp.arange(nq))  # [nq, rows, bq, ...]
    out = jnp.moveaxis(out, 0, 1).reshape(rows, nq * bq, -1)
    lse = jnp.moveaxis(lse, 0, 1).reshape(rows, nq * bq)
    return out, lse

  groups = jnp.arange(st.groups)
  return jax.lax.map(one_group, (groups, q, k_t, v, bias, sinks, bm.full_num, bm.full_idx,
                                 bm.partial_num, bm.partial_idx))


# --- Backward ------------------------------------------------------------------------------


def _backward(st: _Static, res, d_out, d_lse):
  """Gradients for q, k, v, the score function's floating closed-over arrays, the dense bias
  and the sinks (group layouts as in `_forward`).

  Key-major: every block is computed as `[bk, bq]` (keys as rows), so the two products that
  contract over queries (dV = P^T dO, dK = dS^T Q) read their big operand in place, and dQ is
  accumulated transposed (dQ^T = K^T dS^T) for the same reason: with XLA's CPU dots a
  transposed `[bq, bk]` operand costs a copy per block.
  """
  q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng, out, lse = res
  bq, bk = st.block_q, st.block_kv
  nq, nk = bm.num_q_blocks, bm.num_kv_blocks
  t_pad = q.shape[2]
  # D_i = sum_j P_ij dP_ij = dO_i . O_i (holds with dropout too); a cotangent of the lse
  # enters the logits' gradient as d_lse_i * P_ij, i.e. as -d_lse_i in D.
  delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1) - d_lse.astype(jnp.float32)
  k_t = jnp.swapaxes(k, -1, -2)
  zeros_like32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731

  def one_group(carry, args):
    d_consts = carry
    (g, q_g, k_g, kt_g, v_g, bias_g, lse_g, d_out_g, delta_g, full_num, full_idx, part_num,
     part_idx) = args
    b_idx, h_idx = bm.group_indices(g)
    d_out_g = d_out_g.astype(jnp.float32)
    d_bias_g = zeros_like32(bias_g) if st.has_bias else None

    def one_kv_block(kv_carry, kv_block):
      d_q_t, d_consts, d_bias_g = kv_carry
      kv_start = kv_block * bk
      k_blk = _kv_rows(st, jax.lax.dynamic_slice_in_dim(k_g, kv_start, bk, axis=1))
      v_blk = _kv_rows(st, jax.lax.dynamic_slice_in_dim(v_g, kv_start, bk, axis=1))
      v_blk = v_blk.astype(jnp.float32)
      kt_blk = _kv_rows(st, jax.lax.dynamic_slice_in_dim(kt_g, kv_start, bk, axis=2))
      kt_blk = kt_blk.astype(jnp.float32)
      kv_pos = kv_start + jnp.arange(bk)

      def update(masked, inner, q_block):
        d_k, d_v, d_q_t, d_consts, d_bias_g = inner
        q_start = q_block * bq
        q_pos = bm.q_offset + q_start + jnp.arange(bq)
        q_blk = jax.lax.dynamic_slice_in_dim(q_g, q_start, bq, axis=1)
        d_out_blk = jax.lax.dynamic_slice_in_dim(d_out_g, q_start, bq, axis=1)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse_g, q_start, bq, axis=1)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta_g, q_start, bq, axis=1)
        raw = jnp.einsum('hsd,hqd->hsq', k_blk, q_blk, precision=st.precision,
                         preferred_element_type=jnp.float32)  # [rows, bk, bq]
        if st.has_bias:
          block = _slice_block(bias_g, q_start, kv_start, bq, bk).astype(jnp.float32)
          raw = raw + jnp.swapaxes(_bias_rows(st, block), -1, -2)
        if st.score is not None:
          logits, score_vjp = jax.vjp(
              lambda r, c: _scored(st, r, c, score_nondiff, b_idx, h_idx, q_pos, kv_pos, True),
              raw, score_diff)
        else:
          logits = raw
        # Rows that saw nothing carry lse = +inf, so their probabilities come out 0 here.
        probs = jnp.exp(logits - lse_blk[:, None, :])
        if masked:
          probs = jnp.where(bm.mask(g, q_pos, kv_pos, kv_major=True), probs, 0.0)
        d_probs = jnp.einsum('hsd,hqd->hsq', v_blk, d_out_blk, precision=st.precision)
        probs_used = probs
        if st.dropout_rate > 0.0:
          keep = _dropout_keep(st, rng, g, q_block, kv_block, nq, nk, (st.rows, bq, bk))
          keep = jnp.swapaxes(keep, -1, -2)
          probs_used = jnp.where(keep, probs * _keep_scale(st), 0.0)
          d_probs = jnp.where(keep, d_probs * _keep_scale(st), 0.0)
        d_v = d_v + jnp.einsum('hsq,hqd->hsd', probs_used, d_out_blk, precision=st.precision)
        d_logits = probs * (d_probs - delta_blk[:, None, :])  # [rows, bk, bq]
        if st.score is not None:
          d_raw, d_c = score_vjp(d_logits)
          d_consts = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_consts, d_c)
        else:
          d_raw = d_logits
        if st.has_bias:
          d_blk = jnp.swapaxes(d_raw, -1, -2).reshape(
              st.batch_per_group, st.heads_per_group, bq, bk)
          d_blk = _sum_to_shape(d_blk, tuple(
              1 if bias_g.shape[i] == 1 else d_blk.shape[i] for i in range(4)))
          starts = [0, 0, q_start if bias_g.shape[2] > 1 else 0,
                    kv_start if bias_g.shape[3] > 1 else 0]
          current = _slice_block(d_bias_g, q_start, kv_start, bq, bk)
          d_bias_g = jax.lax.dynamic_update_slice(d_bias_g, current + d_blk, starts)
        q_blk32 = q_blk.astype(jnp.float32)
        d_k = d_k + jnp.einsum('hsq,hqd->hsd', d_raw, q_blk32, precision=st.precision)
        d_q_t_blk = jnp.einsum('hds,hsq->hdq', kt_blk, d_raw, precision=st.precision)
        d_q_t = jax.lax.dynamic_update_slice_in_dim(
            d_q_t, jax.lax.dynamic_slice_in_dim(d_q_t, q_start, bq, axis=2) + d_q_t_blk,
            q_start, axis=2)
        return d_k, d_v, d_q_t, d_consts, d_bias_g

      # dK/dV per query head (summed over each k/v head's query heads once the block is
      # done), so the per-block products need no transposes.
      inner = (jnp.zeros((st.rows, bk, k_g.shape[-1]), jnp.float32),
               jnp.zeros((st.rows, bk, v_g.shape[-1]), jnp.float32), d_q_t, d_consts, d_bias_g)
      inner = jax.lax.fori_loop(
          0, full_num[kv_block], lambda n, c: update(False, c, full_idx[kv_block, n]), inner)
      inner = jax.lax.fori_loop(
          0, part_num[kv_block], lambda n, c: update(True, c, part_idx[kv_block, n]), inner)
      d_k, d_v, d_q_t, d_consts, d_bias_g = inner
      shape = (st.kv_rows, st.q_per_kv, bk)
      d_k = d_k.reshape(*shape, -1).sum(axis=1)
      d_v = d_v.reshape(*shape, -1).sum(axis=1)
      return (d_q_t, d_consts, d_bias_g), (d_k, d_v)

    d_q_t = jnp.zeros((st.rows, q_g.shape[-1], t_pad), jnp.float32)
    (d_q_t, d_consts, d_bias_g), (d_k, d_v) = jax.lax.scan(
        one_kv_block, (d_q_t, d_consts, d_bias_g), jnp.arange(nk))
    d_q = jnp.swapaxes(d_q_t, -1, -2)  # [rows, Tp, D]
    # [nk, kv_rows, bk, D] -> [kv_rows, nk * bk, D]
    d_k = jnp.moveaxis(d_k, 0, 1).reshape(st.kv_rows, nk * bk, -1)
    d_v = jnp.moveaxis(d_v, 0, 1).reshape(st.kv_rows, nk * bk, -1)
    return d_consts, (d_q, d_k, d_v, d_bias_g)

  d_consts = jax.tree.map(zeros_like32, score_diff)
  groups = jnp.arange(st.groups)
  bias_in = bias if st.has_bias else jnp.zeros((st.groups, 1, 1, 1, 1))
  d_consts, (d_q, d_k, d_v, d_bias) = jax.lax.scan(
      one_group, d_consts,
      (groups, q, k, k_t, v, bias_in, lse, d_out, delta, bm.full_num_t, bm.full_idx_t,
       bm.partial_num_t, bm.partial_idx_t))
  d_sinks = None
  if st.has_sinks:
    # The sink takes probability p_sink = exp(s - lse) of each row, and dL/ds = -sum_i
    # p_sink_i D_i (D as above), since d lse_i / ds = p_sink_i and O_i is scaled by 1 - p.
    p_sink = jnp.exp(sinks[..., None] - lse)
    d_sinks = -jnp.sum(p_sink * delta, axis=-1)
  return d_q, d_k, d_v, d_consts, (d_bias if st.has_bias else None), d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_core(st, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng):
  return _forward(st, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng)


def _core_fwd(st, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng):
  out, lse = _forward(st, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng)
  return (out, lse), (q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng, out, lse)


def _core_bwd(st, res, cotangents):
  d_out, d_lse = cotangents
  q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng = res[:9]
  d_q, d_k, d_v, d_consts, d_bias, d_sinks = _backward(st, res, d_out, d_lse)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)  # noqa: E731
  return (cast(d_q, q), cast(d_k, k), cast(d_v, v), jax.tree.map(cast, d_consts, score_diff),
          None, cast(d_bias, bias), cast(d_sinks, sinks), None, None)


_blockwise_core.defvjp(_core_fwd, _core_bwd)


# A part of a larger attention (ring attention's backward): the forward hands back the whole
# attention's saved output and lse, and the backward -- the same `_backward`, fed with them --
# gives exactly this part's keys' share of the gradients, without recomputing the part.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _saved_core(st, q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng, out, lse):
  del q, k, v, score_diff, score_nondiff, bias, sinks, bm, rng
  return out, lse


def _saved_fwd(st, *args):
  return args[-2:], args


def _saved_bwd(st, res, cotangents):
  return _core_bwd(st, res, cotangents) + (None, None)


_saved_core.defvjp(_saved_fwd, _saved_bwd)


# --- Entry point ---------------------------------------------------------------------------


def blockwise_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                        segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                        bias_params=None, mask_mod=None, score_mod=None, block_mask=None,
                        sinks=None, return_lse=False, dropout_rate=0.0, dropout_rng=None,
                        block_size=None, precision=None, saved=None):
  """Memory-efficient `dot_product_attention`; same arguments and result.

  Args:
    block_size: `(q_block, kv_block)` or one int for both (default 512, capped at the
      sequence lengths); lengths need not divide by it. Taken from `block_mask` if given.
    block_mask: a prebuilt `ops.block_mask(...)` (then no other mask argument is allowed).
    saved: `(out [B, T, H, Dv], lse float32 [B, H, T])` of a larger attention whose keys
      include these (ring attention). Then nothing is computed forward -- `saved` is returned
      (as with `return_lse`) -- and the VJP gives this call's keys' share of the gradients of
      that larger attention (its dK/dV, and its part of dQ and of the score arrays').

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype` (and float32 lse `[batch, heads, q_len]`
    with `return_lse`). Memory beyond inputs and outputs is O(block_q * block_kv) per row in
    both passes, plus any dense `mask`/`bias` the caller passes.
  """
  dims = check_qkv(query, key, value)
  check_broadcastable('mask', mask, dims)
  check_broadcastable('bias', bias, dims)
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs dropout_rng')
  if block_mask is not None:
    check_block_mask_call(block_mask, dims, mask=mask, is_causal=is_causal,
                          local_window=local_window, segment_ids=segment_ids,
                          mask_mod=mask_mod, q_offset=q_offset, block_size=block_size)
    bm = block_mask
  else:
    combined = keywords.keyword_mask_mod(
        mask=mask, is_causal=is_causal, local_window=local_window, segment_ids=segment_ids,
        mask_mod=mask_mod, q_offset=q_offset, dims=dims)
    bm = block_mask_lib.block_mask(combined, batch=dims.batch, heads=dims.heads,
                                   q_len=dims.q_len, kv_len=dims.kv_len, block_size=block_size,
                                   q_offset=q_offset)
  score_fn = keywords.with_position_bias(score_mod, bias_fn, bias_params)
  score, consts = (None, ()) if score_fn is None else Mod.of_score(score_fn)
  score_diff = tuple(jnp.issubdtype(jnp.asarray(c).dtype, jnp.inexact) for c in consts)

  st = _Static(dims=dims, block_q=bm.block_q, block_kv=bm.block_kv,
               batch_groups=bm.batch_groups, head_groups=bm.head_groups, score=score,
               score_diff=score_diff, has_bias=bias is not None, has_sinks=sinks is not None,
               dropout_rate=float(dropout_rate), precision=precision)
  t_pad, s_pad = bm.num_q_blocks * st.block_q, bm.num_kv_blocks * st.block_kv
  b, t, h = dims.batch, dims.q_len, dims.heads

  # Scaling q once (outside the custom VJP, so autodiff scales dq) saves a pass over every
  # block of logits.
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else scale
  q = (query.astype(jnp.float32) * scale).astype(query.dtype)
  q = _to_groups(st, _pad_axis(q, 1, t_pad).transpose(0, 2, 1, 3))  # [G, rows, Tp, D]
  k = _kv_to_groups(st, _pad_axis(key, 1, s_pad).transpose(0, 2, 1, 3))
  v = _kv_to_groups(st, _pad_axis(value, 1, s_pad).transpose(0, 2, 1, 3))
  bias_g = None
  if bias is not None:
    bias_g = _bias_to_groups(st, bias, t_pad, s_pad)
  sinks_g = None
  if sinks is not None:
    sinks = jnp.asarray(sinks, jnp.float32)
    if sinks.shape != (h,):
      raise ValueError(f'sinks must be one logit per query head, [{h}], got {sinks.shape}')
    sinks_g = _to_groups(st, jnp.broadcast_to(sinks[None, :], (b, h)))  # [G, rows]
  if dropout_rate > 0.0 and not jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
    dropout_rng = jax.random.wrap_key_data(dropout_rng)
  diff = tuple(c for c, d in zip(consts, score_diff, strict=True) if d)
  nondiff = tuple(c for c, d in zip(consts, score_diff, strict=True) if not d)

  rng = dropout_rng if dropout_rate > 0.0 else None
  if saved is None:
    out, lse = _blockwise_core(st, q, k, v, diff, nondiff, bias_g, sinks_g, bm, rng)
  else:
    out, lse = _saved_core(st, q, k, v, diff, nondiff, bias_g, sinks_g, bm, rng,
                           *_saved_to_groups(st, *saved, t_pad))
  out = _from_groups(st, out)[:, :, :t].transpose(0, 2, 1, 3)  # [B, T, H, Dv]
  out = out.astype(query.dtype)
  if not return_lse:
    return out
  lse = _from_groups(st, lse)[:, :, :t]
  return out, jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


def _saved_to_groups(st: _Static, out: jax.Array, lse: jax.Array, t_pad: int):
  """A saved `[B, T, H, Dv]` output and `[B, H, T]` lse in the core's layout (lse +inf for a
  row that sees nothing, padding rows included, so that their probabilities come out 0)."""
  out = _to_groups(st, _pad_axis(out.astype(jnp.float32), 1, t_pad).transpose(0, 2, 1, 3))
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))
  return out, _to_groups(st, _pad_axis(lse, 2, t_pad, jnp.inf))


def _bias_to_groups(st: _Static, bias: jax.Array, t_pad: int, s_pad: int) -> jax.Array:
  """A `[B|1, H|1, T|1, S|1]` bias -> `[groups, Bg|1, Hg|1, Tp|1, Sp|1]`."""
  bias = _pad_axis(bias, 2, t_pad if bias.shape[2] > 1 else 1)
  bias = _pad_axis(bias, 3, s_pad if bias.shape[3] > 1 else 1)
  bm, hm = st.batch_groups, st.head_groups
  if bm > 1 and bias.shape[0] == 1:
    bias = jnp.broadcast_to(bias, (st.dims.batch, *bias.shape[1:]))
  if hm > 1 and bias.shape[1] == 1:
    bias = jnp.broadcast_to(bias, (bias.shape[0], st.dims.heads, *bias.shape[2:]))
  (bsz, hsz), rest = bias.shape[:2], bias.shape[2:]
  bias = bias.reshape(bm, bsz // bm, hm, hsz // hm, *rest)
  return jnp.swapaxes(bias, 1, 2).reshape(bm * hm, bsz // bm, hsz // hm, *rest)


def check_block_mask_call(bm, dims: Dims, *, mask, is_causal, local_window, segment_ids,
                          mask_mod, q_offset, block_size) -> None:
  """A block mask already holds the whole mask, its sizes and `q_offset`: the call must not
  give them again, and must have the shapes it was built for."""
  others = {'mask': mask is not None, 'is_causal': is_causal,
            'local_window': local_window is not None, 'segment_ids': segment_ids is not None,
            'mask_mod': mask_mod is not None}
  if any(others.values()):
    given = [name for name, present in others.items() if present]
    raise ValueError(f'block_mask already holds the mask; got {given} too: build one block '
                     'mask from and_masks(...) of them')
  if not (isinstance(q_offset, int) and q_offset == 0):
    raise ValueError('with block_mask, give q_offset to ops.block_mask, not here')
  got = (bm.batch, bm.heads, bm.q_len, bm.kv_len)
  want = (dims.batch, dims.heads, dims.q_len, dims.kv_len)
  if got != want:
    raise ValueError(f'block_mask was built for (batch, heads, q_len, kv_len) = {got}, but the '
                     f'call has {want}')
  if block_size is not None:
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    sizes = (min(sizes[0], dims.q_len), min(sizes[1], dims.kv_len))
    if sizes != (bm.block_q, bm.block_kv):
      raise ValueError(f'block_size {block_size} differs from the block mask\'s '
                       f'{(bm.block_q, bm.block_kv)}; leave it out')
