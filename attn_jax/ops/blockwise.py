"""Memory-efficient attention: online softmax over key/value blocks.

The forward pass walks query blocks and, inside each, key/value blocks, keeping a
running max `m`, normalizer `l` and output accumulator per query row (Rabe &
Staats 2021; Dao et al. 2022). It stores only the output and the row
log-sum-exp. The backward pass (a `jax.custom_vjp`) walks key/value blocks and,
inside each, query blocks, recomputing every block's probabilities from the
saved log-sum-exp, accumulating dK/dV per key block and dQ (transposed) into
one `[head_dim, q_len]` buffer. Neither pass holds a `[q_len, kv_len]` array.

Masks are built per block from positions (causal, window, segment ids, padding
of uneven lengths); blocks a causal or windowed mask hides entirely are not
visited (the loop bounds depend on the block index), so causal attention costs
about half. Dense `mask`/`bias` arguments are sliced per block; `bias_fn`
position biases (ALiBi, T5) are evaluated per block and their parameters get
gradients through a per-block VJP.

Internal layout: q `[B, K, G, T, D]` (K kv heads, G query heads per kv head),
k/v `[B, K, S, D]`, so GQA never copies whole k/v. Inside a block everything is
3-D, `[H, rows, cols]` with `H = B*K*G`, and laid out so that every product is a
plain row-major matmul: K is transposed once up front, the backward computes
blocks key-major (`[bk, bq]`) and dQ transposed. On XLA's CPU backend that is
what makes the loop fast (see `_block_logits_and_mask` and `_backward`): a
transposed operand or a 5-D block with size-1 axes costs a copy of the block,
and 3-D blocks let the dot fuse with the reductions after it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import masks as masks_lib
from attn_jax.ops import shapes

DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable, trace-time configuration of one blockwise call."""
  dims: shapes.Dims
  block_q: int
  block_kv: int
  is_causal: bool
  window: tuple[int, int] | None
  dropout_rate: float
  bias_fn: Any
  precision: Any

  @property
  def num_q_blocks(self) -> int:
    return -(-self.dims.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.dims.kv_len // self.block_kv)

  @property
  def needs_position_mask(self) -> bool:
    """Whether some block needs the causal/window/padding mask built from positions."""
    return self.is_causal or self.window is not None or self.dims.kv_len % self.block_kv != 0

  @property
  def left(self) -> int | None:
    """How far back a query may look; None = unbounded."""
    return None if self.window is None else self.window[0]

  @property
  def right(self) -> int | None:
    """How far ahead a query may look; None = unbounded."""
    if self.is_causal:
      return 0 if self.window is None else min(self.window[1], 0)
    return None if self.window is None else self.window[1]


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _slice_block(x: jax.Array, q_start, kv_start, block_q: int, block_kv: int) -> jax.Array:
  """Block `[..., q_start:+block_q, kv_start:+block_kv]` of a `[..., T|1, S|1]` array.

  Size-1 (broadcast) axes are kept whole.
  """
  starts = [0] * (x.ndim - 2) + [q_start if x.shape[-2] > 1 else 0,
                                 kv_start if x.shape[-1] > 1 else 0]
  sizes = list(x.shape[:-2]) + [block_q if x.shape[-2] > 1 else 1,
                                block_kv if x.shape[-1] > 1 else 1]
  return jax.lax.dynamic_slice(x, starts, sizes)


def _block_logits_and_mask(st: _Static, q_blk, k_blk, q_start, kv_start, q_offset, q_seg, kv_seg,
                           mask, bias, bias_params, position_mask: bool, kv_major: bool = False):
  """Logits `[H, bq, bk]` (float32; q arrives pre-scaled) and their bool mask (or None).

  All per-block work runs on 3-D `[H, rows, cols]` arrays, `H = B*K*G` (query
  heads): that way XLA's CPU backend fuses the dot with the reductions and
  elementwise ops that follow it, where 5-D blocks with size-1 axes cost an
  extra copy of every block and split the fusion.

  Args:
    q_blk: `[H, bq, D]`.
    k_blk: `[H, D, bk]` (pre-transposed) or, when `kv_major`, `[H, bk, D]`: either
      way XLA's CPU dot reads it without a per-block transpose.
    position_mask: False skips the causal/window/padding terms, for blocks that
      `_fully_visible` proved need none (most blocks; the mask is a full pass).
    kv_major: return both transposed, `[H, bk, bq]` (the backward's layout),
      computed that way rather than transposed after.

  Returns:
    logits and a mask broadcastable to them (`[H|1, rows, cols]`), or None.
  """
  bq, bk = st.block_q, st.block_kv
  if kv_major:
    logits = jnp.einsum('hsd,hqd->hsq', k_blk, q_blk, precision=st.precision,
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum('hqd,hds->hqs', q_blk, k_blk, precision=st.precision,
                        preferred_element_type=jnp.float32)
  orient = (lambda x: jnp.swapaxes(x, -1, -2)) if kv_major else (lambda x: x)
  q_pos = q_start + jnp.arange(bq) + q_offset  # absolute query positions
  kv_pos = kv_start + jnp.arange(bk)
  if bias is not None:
    logits = logits + orient(_rows(_slice_block(bias, q_start, kv_start, bq, bk), st)
                             .astype(jnp.float32))
  if st.bias_fn is not None:
    logits = logits + orient(_rows(_bias_fn_block(st, bias_params, q_pos, kv_pos), st))

  # Position masks are built directly in the requested layout from index vectors.
  kv_grid = kv_pos[:, None] if kv_major else kv_pos[None, :]
  q_grid = q_pos[None, :] if kv_major else q_pos[:, None]
  block_mask = None
  if position_mask:
    block_mask = kv_grid < st.dims.kv_len  # keys past the end are padding
    if st.is_causal:
      block_mask &= kv_grid <= q_grid
    if st.window is not None:
      left, right = st.window
      block_mask &= (kv_grid >= q_grid - left)
      block_mask &= (kv_grid <= q_grid + right)
    block_mask = block_mask[None]  # [1, rows, cols]
  if q_seg is not None:
    q_ids = jax.lax.dynamic_slice_in_dim(q_seg, q_start, bq, axis=1)
    kv_ids = jax.lax.dynamic_slice_in_dim(kv_seg, kv_start, bk, axis=1)
    same = q_ids[:, :, None] == kv_ids[:, None, :]  # [B, bq, bk]
    block_mask = _and(block_mask, orient(_rows(same[:, None, None], st)))
  if mask is not None:
    block_mask = _and(block_mask, orient(_rows(_slice_block(mask, q_start, kv_start, bq, bk),
                                               st)))
  return logits, block_mask


def _rows(x: jax.Array, st: _Static) -> jax.Array:
  """`[B|1, K|1, G|1, r, c]` -> `[H|1, r, c]` with `H = B*K*G` (broadcasting as needed)."""
  if x.shape[:3] == (1, 1, 1):
    return x.reshape(1, *x.shape[3:])
  full = (st.dims.batch, st.dims.kv_heads, st.dims.groups)
  return jnp.broadcast_to(x, full + x.shape[3:]).reshape(-1, *x.shape[3:])


def _unrows(x: jax.Array, st: _Static) -> jax.Array:
  """`[H, ...]` -> `[B, K, G, ...]`."""
  return x.reshape(st.dims.batch, st.dims.kv_heads, st.dims.groups, *x.shape[1:])


def _kv_rows(x: jax.Array, st: _Static) -> jax.Array:
  """A `[B, K, r, c]` k/v block -> `[H, r, c]`, repeated over the G query heads it serves.

  Repeating a k/v block (small) lets every product batch over the query heads
  with the big `[bq, bk]` operands in place; letting the einsum broadcast
  instead puts G between the block axes and costs a transpose of the whole
  logits block when G > 1.
  """
  b, k = x.shape[:2]
  x = jnp.broadcast_to(x[:, :, None], (b, k, st.dims.groups, *x.shape[2:]))
  return x.reshape(-1, *x.shape[3:])


def _and(a, b):
  return b if a is None else a & b


def _fully_visible(st: _Static, q_start, kv_start, q_offset):
  """True when no causal/window/padding mask hides any (query, key) pair of the block."""
  first_q, last_q = q_start + q_offset, q_start + st.block_q - 1 + q_offset
  last_kv = kv_start + st.block_kv - 1
  visible = last_kv < st.dims.kv_len
  if st.right is not None:
    visible &= last_kv <= first_q + st.right
  if st.left is not None:
    visible &= kv_start >= last_q - st.left
  return visible


def _masked_or_not(st: _Static, body, q_start, kv_start, q_offset, *args):
  """Runs `body(position_mask, *args)`, skipping the position mask when it is a no-op."""
  if not st.needs_position_mask:
    return body(False, *args)
  return jax.lax.cond(_fully_visible(st, q_start, kv_start, q_offset),
                      functools.partial(body, False), functools.partial(body, True), *args)


def _bias_fn_block(st: _Static, bias_params, q_pos, kv_pos):
  """`bias_fn` output for one block, grouped to `[1, K|1, G|1, bq, bk]`."""
  out = st.bias_fn(bias_params, q_pos, kv_pos).astype(jnp.float32)  # [heads|1, bq, bk]
  return shapes.to_grouped(out[None], st.dims)


def _kv_block_range(st: _Static, q_start, q_offset):
  """Key blocks `[lo, hi)` that the causal/window mask leaves visible to a query block."""
  lo, hi = 0, st.num_kv_blocks
  first_q = q_start + q_offset
  last_q = q_start + st.block_q - 1 + q_offset
  if st.left is not None:
    lo = jnp.clip(jnp.floor_divide(first_q - st.left, st.block_kv), 0, st.num_kv_blocks)
  if st.right is not None:
    hi = jnp.clip(jnp.floor_divide(last_q + st.right, st.block_kv) + 1, 0, st.num_kv_blocks)
  return lo, hi


def _q_block_range(st: _Static, kv_start, q_offset):
  """Query blocks `[lo, hi)` that can see any key of the block starting at `kv_start`."""
  lo, hi = 0, st.num_q_blocks
  last_kv = kv_start + st.block_kv - 1
  if st.right is not None:  # q + right >= kv_start
    lo = jnp.clip(jnp.floor_divide(kv_start - st.right - q_offset, st.block_q), 0,
                  st.num_q_blocks)
  if st.left is not None:  # q - left <= last_kv
    hi = jnp.clip(jnp.floor_divide(last_kv + st.left - q_offset, st.block_q) + 1, 0,
                  st.num_q_blocks)
  return lo, hi


def _dropout_keep(st: _Static, rng, q_block, kv_block, shape):
  """The block's keep-mask, a pure function of (rng, block indices): the backward
  pass regenerates exactly the forward's mask."""
  block_rng = jax.random.fold_in(rng, q_block * st.num_kv_blocks + kv_block)
  return jax.random.bernoulli(block_rng, 1.0 - st.dropout_rate, shape)


def _forward(st: _Static, q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng):
  """Returns out `[B, K, G, Tp, Dv]` (float32) and row log-sum-exp `[B, K, G, Tp]`."""
  dims, bq, bk = st.dims, st.block_q, st.block_kv
  heads = dims.batch * dims.kv_heads * dims.groups
  k_t = jnp.swapaxes(k, -1, -2)  # [B, K, D, Sp], transposed once rather than per block

  def one_q_block(q_block):
    q_start = q_block * bq
    q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=3).reshape(heads, bq, -1)

    def update(position_mask, kv_block, carry):
      row_max, row_sum, acc = carry  # [H, bq], [H, bq], [H, bq, Dv]
      kv_start = kv_block * bk
      k_t_blk = _kv_rows(jax.lax.dynamic_slice_in_dim(k_t, kv_start, bk, axis=3), st)
      v_blk = _kv_rows(jax.lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2), st)
      logits, block_mask = _block_logits_and_mask(
          st, q_blk, k_t_blk, q_start, kv_start, q_offset, q_seg, kv_seg, mask, bias,
          bias_params, position_mask)
      if block_mask is not None:
        logits = jnp.where(block_mask, logits, -jnp.inf)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
      # A row with nothing visible yet keeps max -inf; shift by 0 so exp() gives 0, not NaN.
      shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      probs = jnp.exp(logits - shift[..., None])
      correction = jnp.exp(row_max - shift)
      row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
      if st.dropout_rate > 0.0:
        keep = _dropout_keep(st, rng, q_block, kv_block, (heads, bq, bk))
        probs = jnp.where(keep, probs / (1.0 - st.dropout_rate), 0.0)
      acc = acc * correction[..., None] + jnp.einsum(
          'hqs,hsd->hqd', probs.astype(v.dtype), v_blk, precision=st.precision,
          preferred_element_type=jnp.float32)
      return new_max, row_sum, acc

    def step(kv_block, carry):
      return _masked_or_not(st, update, q_start, kv_block * bk, q_offset, kv_block, carry)

    init = (jnp.full((heads, bq), -jnp.inf, jnp.float32), jnp.zeros((heads, bq), jnp.float32),
            jnp.zeros((heads, bq, dims.v_dim), jnp.float32))
    lo, hi = _kv_block_range(st, q_start, q_offset)
    row_max, row_sum, acc = jax.lax.fori_loop(lo, hi, step, init)
    empty = row_sum == 0.0  # fully masked row: output 0, and +inf lse makes its bwd probs 0
    out = acc / jnp.where(empty, 1.0, row_sum)[..., None]
    lse = jnp.where(empty, jnp.inf, row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
    return _unrows(out, st), _unrows(lse, st)

  out, lse = jax.lax.map(one_q_block, jnp.arange(st.num_q_blocks))
  # [nq, B, K, G, bq, ...] -> [B, K, G, nq * bq, ...]
  row_shape = (dims.batch, dims.kv_heads, dims.groups)
  out = jnp.moveaxis(out, 0, 3).reshape(*row_shape, -1, dims.v_dim)
  lse = jnp.moveaxis(lse, 0, 3).reshape(*row_shape, -1)
  return out, lse


def _backward(st: _Static, res, d_out):
  """Gradients for q, k, v, dense bias and bias_params (layouts as in `_forward`).

  Key-major: every block is computed as `[bk, bq]` (keys as rows), so the two
  products that contract over queries (dV = P^T dO, dK = dS^T Q) read their big
  operand in place, and dQ is accumulated transposed (dQ^T = K^T dS^T) for the
  same reason. With XLA's CPU dots a transposed `[bq, bk]` operand costs a copy
  per block (profiled with `experiments/bench_attention.py`; figures in the
  README, "Attention kernels on CPU").
  """
  q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng, out, lse = res
  dims, bq, bk = st.dims, st.block_q, st.block_kv
  heads = dims.batch * dims.kv_heads * dims.groups
  t_pad = q.shape[3]
  d_out = d_out.astype(jnp.float32)
  # D_i = sum_j P_ij dP_ij = dO_i . O_i (holds with dropout too).
  delta = jnp.sum(d_out * out, axis=-1).reshape(heads, t_pad)
  lse = lse.reshape(heads, t_pad)
  q = q.reshape(heads, t_pad, dims.head_dim)
  d_out = d_out.reshape(heads, t_pad, dims.v_dim)
  k_t = jnp.swapaxes(k, -1, -2).astype(jnp.float32)  # [B, K, D, Sp]
  d_q_t_init = jnp.zeros((heads, dims.head_dim, t_pad), jnp.float32)  # dQ transposed
  d_bias_init = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  d_params_init = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), bias_params)

  def one_kv_block(carry, kv_block):
    d_q_t, d_bias, d_params = carry
    kv_start = kv_block * bk
    k_blk = _kv_rows(jax.lax.dynamic_slice_in_dim(k, kv_start, bk, axis=2), st)
    v_blk = _kv_rows(jax.lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2), st)
    v_blk = v_blk.astype(jnp.float32)
    k_t_blk = _kv_rows(jax.lax.dynamic_slice_in_dim(k_t, kv_start, bk, axis=3), st)

    def update(position_mask, q_block, inner):
      d_k, d_v, d_q_t, d_bias, d_params = inner
      q_start = q_block * bq
      q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=1)
      d_out_blk = jax.lax.dynamic_slice_in_dim(d_out, q_start, bq, axis=1)
      lse_blk = jax.lax.dynamic_slice_in_dim(lse, q_start, bq, axis=1)
      delta_blk = jax.lax.dynamic_slice_in_dim(delta, q_start, bq, axis=1)
      logits, block_mask = _block_logits_and_mask(
          st, q_blk, k_blk, q_start, kv_start, q_offset, q_seg, kv_seg, mask, bias, bias_params,
          position_mask, kv_major=True)  # [H, bk, bq]
      # Fully masked rows carry lse = +inf, so their probabilities come out 0 here.
      probs = jnp.exp(logits - lse_blk[:, None, :])
      if block_mask is not None:
        probs = jnp.where(block_mask, probs, 0.0)
      d_probs = jnp.einsum('hsd,hqd->hsq', v_blk, d_out_blk, precision=st.precision)
      probs_used = probs
      if st.dropout_rate > 0.0:
        keep = jnp.swapaxes(_dropout_keep(st, rng, q_block, kv_block, (heads, bq, bk)), -1, -2)
        probs_used = jnp.where(keep, probs / (1.0 - st.dropout_rate), 0.0)
        d_probs = jnp.where(keep, d_probs / (1.0 - st.dropout_rate), 0.0)
      d_v = d_v + jnp.einsum('hsq,hqd->hsd', probs_used, d_out_blk, precision=st.precision)
      d_logits = probs * (d_probs - delta_blk[:, None, :])  # [H, bk, bq]
      q_blk32 = q_blk.astype(jnp.float32)
      d_k = d_k + jnp.einsum('hsq,hqd->hsd', d_logits, q_blk32, precision=st.precision)
      d_q_t_blk = jnp.einsum('hds,hsq->hdq', k_t_blk, d_logits, precision=st.precision)
      d_q_t = jax.lax.dynamic_update_slice_in_dim(
          d_q_t, jax.lax.dynamic_slice_in_dim(d_q_t, q_start, bq, axis=2) + d_q_t_blk, q_start,
          axis=2)
      if d_bias is not None or st.bias_fn is not None:
        # [B, K, G, bq, bk], as biases are laid out.
        d_logits_qk = _unrows(jnp.swapaxes(d_logits, -1, -2), st)
      if d_bias is not None:
        d_bias = _accumulate_block(d_bias, d_logits_qk, q_start, kv_start, bq, bk)
      if st.bias_fn is not None:
        q_pos = q_start + jnp.arange(bq) + q_offset
        kv_pos = kv_start + jnp.arange(bk)
        block_bias, bias_vjp = jax.vjp(lambda p: _bias_fn_block(st, p, q_pos, kv_pos),
                                       bias_params)
        (d_p,) = bias_vjp(_sum_to_shape(d_logits_qk, block_bias.shape))
        d_params = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_params, d_p)
      return d_k, d_v, d_q_t, d_bias, d_params

    def step(q_block, inner):
      return _masked_or_not(st, update, q_block * bq, kv_start, q_offset, q_block, inner)

    lo, hi = _q_block_range(st, kv_start, q_offset)
    # dK/dV per query head (summed over each k/v head's G query heads once the
    # block is done), so the per-block products need no transposes.
    init = (jnp.zeros((heads, bk, dims.head_dim), jnp.float32),
            jnp.zeros((heads, bk, dims.v_dim), jnp.float32), d_q_t, d_bias, d_params)
    d_k, d_v, d_q_t, d_bias, d_params = jax.lax.fori_loop(lo, hi, step, init)
    return (d_q_t, d_bias, d_params), (_unrows(d_k, st).sum(axis=2), _unrows(d_v, st).sum(axis=2))

  (d_q_t, d_bias, d_params), (d_k, d_v) = jax.lax.scan(
      one_kv_block, (d_q_t_init, d_bias_init, d_params_init), jnp.arange(st.num_kv_blocks))
  d_q = _unrows(jnp.swapaxes(d_q_t, -1, -2), st)  # [B, K, G, Tp, D]
  # [nk, B, K, bk, D] -> [B, K, nk * bk, D]
  d_k = jnp.moveaxis(d_k, 0, 2).reshape(*k.shape[:2], -1, k.shape[-1])
  d_v = jnp.moveaxis(d_v, 0, 2).reshape(*v.shape[:2], -1, v.shape[-1])
  return d_q, d_k, d_v, d_bias, d_params


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes where `shape` (same rank) broadcasts with size 1."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n > 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def _accumulate_block(total, block, q_start, kv_start, bq, bk):
  """Adds a `[B, K, G, bq, bk]` gradient block into a broadcast-shaped `total`."""
  block = _sum_to_shape(block, tuple(
      1 if total.shape[i] == 1 else block.shape[i] for i in range(block.ndim)))
  current = _slice_block(total, q_start, kv_start, bq, bk)
  starts = [0] * (total.ndim - 2) + [q_start if total.shape[-2] > 1 else 0,
                                     kv_start if total.shape[-1] > 1 else 0]
  return jax.lax.dynamic_update_slice(total, current + block, starts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_core(st, q, k, v, bias, bias_params, q_offset, q_seg, kv_seg, mask, rng):
  out, _ = _forward(st, q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng)
  return out


def _core_fwd(st, q, k, v, bias, bias_params, q_offset, q_seg, kv_seg, mask, rng):
  out, lse = _forward(st, q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng)
  return out, (q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng, out, lse)


def _core_bwd(st, res, d_out):
  q, k, v, q_offset, q_seg, kv_seg, mask, bias, bias_params, rng = res[:10]
  d_q, d_k, d_v, d_bias, d_params = _backward(st, res, d_out)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)  # noqa: E731
  return (cast(d_q, q), cast(d_k, k), cast(d_v, v), cast(d_bias, bias),
          jax.tree.map(cast, d_params, bias_params), None, None, None, None, None)


_blockwise_core.defvjp(_core_fwd, _core_bwd)


def blockwise_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                        segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                        bias_params=None, dropout_rate=0.0, dropout_rng=None, block_size=None,
                        precision=None):
  """Memory-efficient `dot_product_attention`; same arguments and result.

  Args:
    block_size: `(q_block, kv_block)` or one int for both (default 512, capped
      at the sequence lengths). Lengths need not divide by it.

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype`. Memory beyond inputs and
    outputs is O(block_q * block_kv) per (batch, head) in both passes, plus any
    dense `mask`/`bias` the caller passes.
  """
  dims = shapes.check_qkv(query, key, value)
  shapes.check_broadcastable('mask', mask, dims)
  shapes.check_broadcastable('bias', bias, dims)
  q_seg, kv_seg = shapes.split_segment_ids(segment_ids, dims)
  window = masks_lib.normalize_window(local_window)
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rate > 0 needs dropout_rng')
  if block_size is None:
    block_size = DEFAULT_BLOCK
  block_q, block_kv = (block_size, block_size) if isinstance(block_size, int) else block_size
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f'block sizes must be positive, got {block_size}')
  block_q, block_kv = min(block_q, dims.q_len), min(block_kv, dims.kv_len)
  st = _Static(dims=dims, block_q=block_q, block_kv=block_kv, is_causal=bool(is_causal),
               window=window, dropout_rate=float(dropout_rate),
               bias_fn=bias_fn, precision=precision)
  t_pad, s_pad = st.num_q_blocks * block_q, st.num_kv_blocks * block_kv
  b, kh, g = dims.batch, dims.kv_heads, dims.groups

  # Scaling q once (outside the custom VJP, so autodiff scales dq) saves a pass
  # over every block of logits.
  scale = 1.0 / math.sqrt(dims.head_dim) if scale is None else scale
  query = (query.astype(jnp.float32) * scale).astype(query.dtype)
  # [B, T, N, D] -> [B, K, G, Tp, D]; k/v [B, S, K, D] -> [B, K, Sp, D].
  q = _pad_axis(query.reshape(b, dims.q_len, kh, g, dims.head_dim), 1, t_pad)
  q = q.transpose(0, 2, 3, 1, 4)
  k = _pad_axis(key, 1, s_pad).transpose(0, 2, 1, 3)
  v = _pad_axis(value, 1, s_pad).transpose(0, 2, 1, 3)
  if mask is not None:
    mask = _pad_axis(_pad_axis(shapes.to_grouped(mask.astype(bool), dims), 3,
                               t_pad if mask.shape[2] > 1 else 1), 4,
                     s_pad if mask.shape[3] > 1 else 1)
  if bias is not None:
    bias = _pad_axis(_pad_axis(shapes.to_grouped(bias, dims), 3,
                               t_pad if bias.shape[2] > 1 else 1), 4,
                     s_pad if bias.shape[3] > 1 else 1)
  if q_seg is not None:
    q_seg, kv_seg = _pad_axis(q_seg, 1, t_pad), _pad_axis(kv_seg, 1, s_pad)
  if dropout_rate > 0.0 and not jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key):
    dropout_rng = jax.random.wrap_key_data(dropout_rng)
  q_offset = jnp.asarray(q_offset, jnp.int32)

  out = _blockwise_core(st, q, k, v, bias, bias_params, q_offset, q_seg, kv_seg, mask,
                        dropout_rng if dropout_rate > 0.0 else None)
  out = out.transpose(0, 3, 1, 2, 4)[:, :dims.q_len]  # [B, T, K, G, Dv]
  return out.reshape(b, dims.q_len, dims.heads, dims.v_dim).astype(query.dtype)
