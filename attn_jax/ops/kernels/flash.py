"""`ops.dot_product_attention(..., implementation='pallas')`: fused flash attention for open
attention, forward and backward, on GPU (Triton) and TPU (Mosaic); interpreted on CPU.

The call is normalised as the blockwise path does it (one home for each rule): the mask
keywords and a `mask_mod` become one mask function and a `BlockMask` (built once per call, or
the caller's), position `bias_fn`s and `score_mod` one score function. Each function is split
for the kernels (`mod_eval.KernelMod`); the kernels then see only visit lists, the split
functions' inputs, sinks and the scale.

The platform's kernel is chosen when the program is lowered (`jax.lax.platform_dependent`):
`cuda`/`rocm` run `gpu_flash`, `tpu` runs `tpu_flash`, and `cpu` runs the GPU kernels in
Pallas' interpret mode (slow: for tests and debugging). `kernel='gpu'|'tpu'` forces one
kernel (interpreted unless `interpret=False`), which is how the tests check each kernel's
values on a CPU.

Backward (a `jax.custom_vjp`, FlashAttention-2): the kernels recompute probabilities from
the saved row log-sum-exp; dK/dV walk the transposed visit lists, dQ the forward ones; the
sinks' gradient is a sum over rows outside the kernels. One case is not fused: when a floating
array the score function closes over is being differentiated (a learned T5 table, trained
ALiBi slopes), the forward stays fused and the backward runs the blockwise path's backward
(`blockwise._backward`) from the kernel's output and lse, which is exact and gives that
array's gradient. Constant arrays (fixed ALiBi slopes) keep the fused backward: `symbolic_zeros`
tells the forward rule which inputs are perturbed.

Not taken by the kernels (`unsupported_reason` says which; the dispatcher then keeps the
blockwise or dense path, and `implementation='pallas'` raises): dropout, a dense `bias` array,
a dense `mask` that varies along both q and kv (a `[B, 1, 1, S]` key mask is fused), mask or
score functions the split cannot evaluate in a kernel (see mod_eval.py), and a `BlockMask`
whose blocks admit no tile of this platform's kernel (see blocks.py; the default visit block
and `ops.block_mask`'s default fit both). A block mask that fits one platform only (blocks of
64 fit the GPU kernels, not the TPU ones) lowers for that platform only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import blockwise, keywords
from attn_jax.ops.block_mask import block_mask as build_block_mask
from attn_jax.ops.kernels import blocks, gpu_flash, tpu_flash
from attn_jax.ops.kernels.common import Plan, band_visits
from attn_jax.ops.kernels.mod_eval import KernelMod
from attn_jax.ops.mods import Band, Mod, band_of
from attn_jax.ops.shapes import Dims, check_qkv

KERNELS = ('auto', 'gpu', 'tpu')


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static configuration of one call (the custom VJP's non-differentiable argument)."""
  plan: Plan
  dims: Dims
  dtype: Any
  kernel: str  # 'auto' | 'gpu' | 'tpu'
  platforms: tuple[str, ...]  # the kernels ('gpu', 'tpu') whose tiles fit the block mask
  interpret: bool | None  # None: interpret on CPU only
  score_mod: Mod | None
  score_float: tuple[bool, ...]  # which of the score function's consts are floating

  def layout(self, platform: str) -> blocks.Layout:
    p = self.plan
    out = blocks.layout(platform, _kernel_dtype(platform, self.dtype).itemsize, q_len=p.q_len,
                        kv_len=p.kv_len, head_dim=p.head_dim, v_dim=p.v_dim,
                        block_q=p.block_q, block_kv=p.block_kv, num_q_blocks=p.num_q_blocks,
                        num_kv_blocks=p.num_kv_blocks)
    assert isinstance(out, blocks.Layout), out  # checked in _normalize
    return out


@dataclasses.dataclass(frozen=True)
class _Hybrid:
  """Residual marker (static): the backward runs blockwise (a score array is perturbed)."""
  on: bool


jax.tree_util.register_static(_Hybrid)


def _kernel_dtype(platform: str, dtype) -> jnp.dtype:
  """TPUs compute float16 inputs in float32 (Mosaic has no float16 matmul)."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if platform == 'tpu' and dtype == jnp.float16 else dtype


# --- Normalisation: the one place a call becomes (block mask, split functions) -------------


@dataclasses.dataclass
class _Call:
  static: _Static | None
  reason: str | None
  block_mask: Any = None
  score_consts: tuple = ()


def _normalize(query, key, value, *, bias, mask, is_causal, scale, segment_ids, local_window,
               q_offset, bias_fn, bias_params, mask_mod, score_mod, block_mask, sinks,
               dropout_rate, block_size, precision, kernel, interpret,
               build: bool) -> _Call:
  """Everything static about a call, or the reason the kernels cannot take it. With `build`
  the block mask is built (else only the functions are traced)."""
  dims = check_qkv(query, key, value)
  if kernel not in KERNELS:
    raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
  if sinks is not None and jnp.shape(sinks) != (dims.heads,):
    raise ValueError(f'sinks must be one logit per query head, [{dims.heads}], got '
                     f'{jnp.shape(sinks)}')
  if dropout_rate > 0.0:
    return _Call(None, 'dropout is not implemented in the kernels')
  if bias is not None:
    return _Call(None, 'a dense bias array is not read by the kernels (give position biases '
                       'as a score_mod, e.g. score_mods.alibi / t5_bias)')
  if block_mask is not None:
    blockwise.check_block_mask_call(block_mask, dims, mask=mask, is_causal=is_causal,
                                    local_window=local_window, segment_ids=segment_ids,
                                    mask_mod=mask_mod, q_offset=q_offset, block_size=block_size)
    mask_fn, mask_obj = None, block_mask.mod
  else:
    mask_fn = keywords.keyword_mask_mod(mask=mask, is_causal=is_causal,
                                        local_window=local_window, segment_ids=segment_ids,
                                        mask_mod=mask_mod, q_offset=q_offset, dims=dims)
    everything = mask_fn is None or (isinstance(mask_fn, Band) and mask_fn == Band(None, None))
    mask_obj = None if everything else Mod.of_mask(mask_fn)[0]
  score_fn = keywords.with_position_bias(score_mod, bias_fn, bias_params)
  score_obj, score_consts = (None, ()) if score_fn is None else Mod.of_score(score_fn)
  split = [None if m is None else KernelMod.of(m) for m in (mask_obj, score_obj)]
  for reason in split:
    if isinstance(reason, str):
      return _Call(None, reason)

  bm = block_mask
  sizes = block_size if block_size is not None else blocks.VISIT_BLOCK
  if bm is None and build:
    bm = build_block_mask(mask_fn, batch=dims.batch, heads=dims.heads, q_len=dims.q_len,
                          kv_len=dims.kv_len, block_size=sizes, q_offset=q_offset)
  geometry = _geometry(bm) if bm is not None else _geometry_of(dims, sizes, mask_obj)
  platforms, reason = _fitting_platforms(kernel, query.dtype, dims, geometry)
  if reason is not None:
    return _Call(None, reason)
  plan = _plan(dims, geometry, *split, band=band_of(mask_fn), has_sinks=sinks is not None,
               scale=scale, precision=precision)
  score_float = tuple(bool(jnp.issubdtype(jnp.asarray(c).dtype, jnp.inexact))
                      for c in score_consts)
  static = _Static(plan, dims, jnp.dtype(query.dtype), kernel, platforms, interpret,
                   score_obj, score_float)
  return _Call(static, None, bm, tuple(score_consts))


def _geometry(bm) -> tuple[int, ...]:
  """(block_q, block_kv, num_q_blocks, num_kv_blocks, batch_groups, head_groups)."""
  return (bm.block_q, bm.block_kv, bm.num_q_blocks, bm.num_kv_blocks, bm.batch_groups,
          bm.head_groups)


def _geometry_of(dims: Dims, sizes, mod: Mod | None) -> tuple[int, ...]:
  """The `_geometry` `block_mask(...)` would give, without building it (blocks capped at the
  lengths, one row group per batch row / head the mask reads)."""
  bq, bk = (sizes, sizes) if isinstance(sizes, int) else sizes
  bq, bk = min(bq, dims.q_len), min(bk, dims.kv_len)
  reads = mod.reads if mod is not None else (False, False)
  return (bq, bk, -(-dims.q_len // bq), -(-dims.kv_len // bk),
          dims.batch if reads[0] else 1, dims.heads if reads[1] else 1)


def _fitting_platforms(kernel: str, dtype, dims: Dims, geometry
                       ) -> tuple[tuple[str, ...], str | None]:
  """The platforms whose kernels fit the block mask, or why the call cannot run here.

  'auto' lowers the kernels that fit (the default visit block fits both); the platform this
  process runs on must be one of them, so that a misfit shows at trace time rather than as a
  lowering error.
  """
  block_q, block_kv, nq, nk, _, _ = geometry
  platforms, reasons = [], {}
  for platform in ('gpu', 'tpu') if kernel == 'auto' else (kernel,):
    lay = blocks.layout(platform, _kernel_dtype(platform, dtype).itemsize, q_len=dims.q_len,
                        kv_len=dims.kv_len, head_dim=dims.head_dim, v_dim=dims.v_dim,
                        block_q=block_q, block_kv=block_kv, num_q_blocks=nq, num_kv_blocks=nk)
    if isinstance(lay, str):
      reasons[platform] = lay
    else:
      platforms.append(platform)
  here = jax.default_backend()
  if not platforms or here in reasons:
    return (), reasons.get(here) or next(iter(reasons.values()))
  return tuple(platforms), None


def _plan(dims: Dims, geometry, mask: KernelMod | None, score: KernelMod | None, *, band,
          has_sinks: bool, scale, precision) -> Plan:
  block_q, block_kv, nq, nk, b_groups, h_groups = geometry
  # A band (causal + window) bounds the blocks a row visits: the TPU grid's width.
  transposed = None if band is None else Band(
      None if band.hi is None else -band.hi, None if band.lo is None else -band.lo)
  return Plan(
      batch=dims.batch, heads=dims.heads, kv_heads=dims.kv_heads, q_len=dims.q_len,
      kv_len=dims.kv_len, head_dim=dims.head_dim, v_dim=dims.v_dim, block_q=block_q,
      block_kv=block_kv, num_q_blocks=nq, num_kv_blocks=nk, batch_groups=b_groups,
      head_groups=h_groups, mask=mask, score=score, has_sinks=has_sinks,
      scale=float(1.0 / math.sqrt(dims.head_dim) if scale is None else scale),
      precision=precision, max_visits=band_visits(band, block_q, block_kv, nk),
      max_visits_t=band_visits(transposed, block_kv, block_q, nq))


def unsupported_reason(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                       segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                       bias_params=None, mask_mod=None, score_mod=None, block_mask=None,
                       sinks=None, dropout_rate=0.0, block_size=None, precision=None,
                       kernel: str = 'auto') -> str | None:
  """None if the Pallas kernels take this `dot_product_attention` call, else why not.

  Traces the mask and score functions (cheap) but builds no block mask.
  """
  call = _normalize(query, key, value, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
                    segment_ids=segment_ids, local_window=local_window, q_offset=q_offset,
                    bias_fn=bias_fn, bias_params=bias_params, mask_mod=mask_mod,
                    score_mod=score_mod, block_mask=block_mask, sinks=sinks,
                    dropout_rate=dropout_rate, block_size=block_size, precision=precision,
                    kernel=kernel, interpret=None, build=False)
  return call.reason


# --- Entry point ---------------------------------------------------------------------------


def pallas_attention(query, key, value, *, bias=None, mask=None, is_causal=False, scale=None,
                     segment_ids=None, local_window=None, q_offset=0, bias_fn=None,
                     bias_params=None, mask_mod=None, score_mod=None, block_mask=None,
                     sinks=None, return_lse=False, dropout_rate=0.0, block_size=None,
                     precision=None, kernel: str = 'auto', interpret: bool | None = None):
  """Fused `dot_product_attention`; same arguments and results (see ops/attention.py).

  Args:
    block_size: the visit block `(block_q, block_kv)` of the block mask built here (default
      `blocks.VISIT_BLOCK`); each platform's kernel tiles it (blocks.py).
    kernel: 'auto' (the platform's kernel, chosen at lowering; CPU interprets the GPU
      kernel), 'gpu' or 'tpu' (that kernel wherever the call runs).
    interpret: run the kernel in Pallas' interpret mode; default: on CPU only ('auto') or
      always (a forced kernel).

  Returns:
    `[batch, q_len, heads, v_dim]` in `query.dtype` (and float32 lse `[batch, heads, q_len]`,
    -inf for a row that sees nothing, with `return_lse`).

  Raises:
    ValueError: the kernels cannot take the call (`unsupported_reason` says why).
  """
  call = _normalize(query, key, value, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
                    segment_ids=segment_ids, local_window=local_window, q_offset=q_offset,
                    bias_fn=bias_fn, bias_params=bias_params, mask_mod=mask_mod,
                    score_mod=score_mod, block_mask=block_mask, sinks=sinks,
                    dropout_rate=dropout_rate, block_size=block_size, precision=precision,
                    kernel=kernel, interpret=interpret, build=True)
  if call.reason is not None:
    raise ValueError(f"implementation='pallas' cannot take this call: {call.reason}")
  sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)
  out, lse = _core(call.static, query, key, value, call.block_mask, call.score_consts, sinks)
  if not return_lse:
    return out
  return out, jnp.where(jnp.isposinf(lse), -jnp.inf, lse)


# --- The custom VJP ------------------------------------------------------------------------


def _by_platform(static: _Static, fn, *args):
  """`fn(kernel platform, interpret, *args)` for the platform the program is lowered for.

  A platform whose kernel does not fit the call's block mask has no branch: lowering for it
  fails (`platform_dependent` names the platforms it has).
  """
  if static.kernel != 'auto':
    interpret = True if static.interpret is None else static.interpret
    return fn(static.kernel, interpret, *args)
  interpret = static.interpret
  branches = dict(cpu=functools.partial(fn, static.platforms[0],
                                        True if interpret is None else interpret))
  if 'gpu' in static.platforms:
    branches['cuda'] = branches['rocm'] = functools.partial(fn, 'gpu', bool(interpret))
  if 'tpu' in static.platforms:
    branches['tpu'] = functools.partial(fn, 'tpu', bool(interpret))
  return jax.lax.platform_dependent(*args, **branches)


def _mod_inputs(static: _Static, lay: blocks.Layout, bm, score_consts):
  plan = static.plan
  q_pos = bm.q_offset + jnp.arange(lay.q_pad, dtype=jnp.int32)
  kv_pos = jnp.arange(lay.kv_pad, dtype=jnp.int32)
  kw = dict(batch=plan.batch, heads=plan.heads, q_pos=q_pos, kv_pos=kv_pos)
  mask_in = () if plan.mask is None else plan.mask.prepare(bm.consts, **kw)
  score_in = () if plan.score is None else plan.score.prepare(score_consts, **kw)
  return mask_in, score_in


def _lists(bm, transposed: bool):
  if transposed:
    return (bm.full_num_t, bm.full_idx_t, bm.partial_num_t, bm.partial_idx_t)
  return (bm.full_num, bm.full_idx, bm.partial_num, bm.partial_idx)


def _platform_forward(static: _Static, platform: str, interpret: bool, q, k, v, bm,
                      score_consts, sinks):
  lay = static.layout(platform)
  dtype = _kernel_dtype(platform, q.dtype)
  mask_in, score_in = _mod_inputs(static, lay, bm, score_consts)
  module = gpu_flash if platform == 'gpu' else tpu_flash
  out, lse = module.forward(static.plan, lay, q.astype(dtype), k.astype(dtype), v.astype(dtype),
                            bm.q_offset, _lists(bm, False), sinks, mask_in, score_in,
                            interpret=interpret)
  return out.astype(q.dtype), lse


def _platform_backward(static: _Static, platform: str, interpret: bool, q, k, v, bm,
                       score_consts, lse, delta, d_out):
  lay = static.layout(platform)
  dtype = _kernel_dtype(platform, q.dtype)
  mask_in, score_in = _mod_inputs(static, lay, bm, score_consts)
  module = gpu_flash if platform == 'gpu' else tpu_flash
  d_q, d_k, d_v = module.backward(
      static.plan, lay, q.astype(dtype), k.astype(dtype), v.astype(dtype), bm.q_offset,
      _lists(bm, False), _lists(bm, True), mask_in, score_in, lse, delta, d_out.astype(dtype),
      interpret=interpret)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(static: _Static, q, k, v, bm, score_consts, sinks):
  """(out `[B, T, H, Dv]`, lse float32 `[B, H, T]`, +inf for rows that see nothing)."""
  return _by_platform(static, functools.partial(_platform_forward, static), q, k, v, bm,
                      score_consts, sinks)


def _core_fwd(static: _Static, q, k, v, bm, score_consts, sinks):
  # With symbolic zeros every leaf arrives as CustomVJPPrimal(value, perturbed).
  leaves = jax.tree.leaves(score_consts)
  hybrid = any(p.perturbed for p, f in zip(leaves, static.score_float, strict=True) if f)
  q, k, v, bm, score_consts, sinks = jax.tree.map(lambda p: p.value,
                                                  (q, k, v, bm, score_consts, sinks))
  out, lse = _core(static, q, k, v, bm, score_consts, sinks)
  return (out, lse), (_Hybrid(hybrid), q, k, v, bm, score_consts, sinks, out, lse)


def _zeros_if_symbolic(ct, like):
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return ct


def _core_bwd(static: _Static, res, cotangents):
  hybrid, q, k, v, bm, score_consts, sinks, out, lse = res
  d_out = _zeros_if_symbolic(cotangents[0], out)
  d_lse = _zeros_if_symbolic(cotangents[1], lse)
  if hybrid.on:
    return _blockwise_backward(static, q, k, v, bm, score_consts, sinks, out, lse, d_out, d_lse)
  # D_i = sum_j P_ij dP_ij = dO_i . O_i; an lse cotangent enters the logits' gradient as
  # d_lse_i P_ij, i.e. as -d_lse_i in D.
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - d_lse.astype(jnp.float32)
  d_q, d_k, d_v = _by_platform(static, functools.partial(_platform_backward, static), q, k, v,
                               bm, score_consts, lse, delta, d_out)
  d_sinks = None
  if sinks is not None:
    # The sink takes probability exp(s - lse) of each row; dL/ds = -sum_i p_sink_i D_i.
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    d_sinks = -jnp.sum(p_sink * delta, axis=(0, 2))
  return d_q, d_k, d_v, None, jax.tree.map(lambda _: None, score_consts), d_sinks


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


def _blockwise_backward(static: _Static, q, k, v, bm, score_consts, sinks, out, lse, d_out,
                        d_lse):
  """The blockwise path's backward from the kernel's out and lse (exact): gradients for q, k,
  v, sinks and the score function's floating closed-over arrays."""
  dims, plan = static.dims, static.plan
  diff = tuple(c for c, f in zip(score_consts, static.score_float, strict=True) if f)
  nondiff = tuple(c for c, f in zip(score_consts, static.score_float, strict=True) if not f)
  st = blockwise._Static(
      dims=dims, block_q=bm.block_q, block_kv=bm.block_kv, batch_groups=bm.batch_groups,
      head_groups=bm.head_groups, score=static.score_mod, score_diff=static.score_float,
      has_bias=False, has_sinks=sinks is not None, dropout_rate=0.0, precision=plan.precision)
  t_pad, s_pad = bm.num_q_blocks * bm.block_q, bm.num_kv_blocks * bm.block_kv
  rows = lambda x: blockwise._to_groups(st, x)  # noqa: E731  [B, H, ...] -> [G, rows, ...]
  by_head = lambda x, n: blockwise._pad_axis(x, 1, n).transpose(0, 2, 1, 3)  # noqa: E731

  def layout(q, k, v, sinks):
    # The blockwise path takes q scaled; float32 keeps the kernel's logits exactly, and the
    # gradients (float32) sum over grouped heads in float32.
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q_g = rows(by_head(f32(q) * plan.scale, t_pad))
    k_g = blockwise._kv_to_groups(st, by_head(f32(k), s_pad))
    v_g = blockwise._kv_to_groups(st, by_head(f32(v), s_pad))
    s_g = None if sinks is None else rows(jnp.broadcast_to(sinks[None], (dims.batch,
                                                                          dims.heads)))
    return q_g, k_g, v_g, s_g

  (q_g, k_g, v_g, s_g), layout_vjp = jax.vjp(layout, q, k, v, sinks)
  out_g = rows(by_head(out.astype(jnp.float32), t_pad))
  d_out_g = rows(by_head(d_out.astype(jnp.float32), t_pad))
  lse_g = rows(blockwise._pad_axis(lse, 2, t_pad, jnp.inf))
  d_lse_g = rows(blockwise._pad_axis(d_lse.astype(jnp.float32), 2, t_pad))
  res = (q_g, k_g, v_g, diff, nondiff, None, s_g, bm, None, out_g, lse_g)
  d_q, d_k, d_v, d_diff, _, d_sinks = blockwise._backward(st, res, d_out_g, d_lse_g)
  d_q, d_k, d_v, d_sinks = layout_vjp((d_q, d_k, d_v, d_sinks))
  d_diff = list(d_diff)
  d_consts = tuple(d_diff.pop(0).astype(jnp.asarray(c).dtype) if f else None
                   for c, f in zip(score_consts, static.score_float, strict=True))
  return d_q, d_k, d_v, None, d_consts, d_sinks
