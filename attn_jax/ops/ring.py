"""Ring attention inside `shard_map` (Liu et al. 2023): each device keeps its queries and passes
its key/value chunk around the ring of a mesh axis, one neighbour per step, joining the
partial results exactly by their log-sum-exp; forward and backward (a `jax.custom_vjp`).

Forward, step `s` on device `i`: the keys of device `(i - s) mod n` are here. Each local query
chunk attends to each local key chunk (a zig-zag layout holds two of each,
`sequence_layout.py`) through `ops.dot_product_attention(..., return_lse=True)`, and the
result is merged into a running (out, lse) with `merge_attention`. A chunk pair whose every
element the mask hides is skipped by a `lax.cond`, so a causal, windowed or document mask
costs what it shows. Only the local q/k/v, the output and the row lse are saved.

Backward, step `s`: the key chunk travels with its dK/dV accumulators (after n steps they are
home). A chunk pair's gradients come from the VJP of its local attention call: given the
global output `O` and lse `L` of a query row, a part with local output `o` and lse `l` has
share `w = exp(l - L)` of the softmax, and `O = sum_parts w o` gives it the cotangents
`do = w dO` and `dl = w (dO . (o - O) + dL)` (the rule `merge_attention`'s own VJP follows).
The VJP recomputes the part's forward (one extra local forward per step, the price of going
through the public op, so that every implementation -- dense, blockwise, a fused kernel --
runs sharded with its own backward).

Positions: a part's queries start at true position `qa`, its keys at `ka`. The local call sees
keys from 0 and queries from `q_offset = qa - ka`; a band (causal, window) depends only on
`kv - q` and is passed as is; every other mask or score function is called on indices
shifted by `ka` (and batch/head indices by the device's offset when those axes are sharded),
so it sees true absolute positions. Segment ids are sharded like the tokens and travel with
the keys.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops import blockwise, keywords
from attn_jax.ops import sequence_layout as layout_lib
from attn_jax.ops.attention import choose_implementation, dot_product_attention, merge_attention
from attn_jax.ops.block_mask import block_mask as make_block_mask
from attn_jax.ops.mods import Band, Mod, and_masks
from attn_jax.ops.shapes import check_qkv


@dataclasses.dataclass(frozen=True)
class RingSpec:
  """Static configuration of one context-parallel attention call.

  `band`: causal/window part of the mask; `mask`, `score`: the rest of the mask and the score
  function, traced once (`Mod`), their closed-over arrays passed apart; `score_diff`: which of
  the score's arrays get gradients. `on_step(pass, step, q_chunk, kv_chunk, device)`, if set,
  is called (through `jax.debug.callback`) each time a chunk pair is computed: for tests and
  profiling.
  """
  axis_name: str
  layout: str
  band: Band | None
  mask: Mod | None
  score: Mod | None
  score_diff: tuple[bool, ...]
  batch_axis: Any
  head_axis: Any
  scale: float | None
  implementation: str | None
  block_size: Any
  precision: Any
  on_step: Callable[..., None] | None = None


def shifted(mod: Mod, consts, batch=0, head=0, position=0) -> Callable[..., Any]:
  """`mod` (with its closed-over arrays `consts`) as a function of indices local to a shard:
  it is called with `b + batch, h + head, q_idx + position, kv_idx + position`. Only the
  indices it reads are moved, so a mask that ignores `b` still groups all rows together."""
  rb, rh, rq, rk = mod.reads

  def moved(b, h, q_idx, kv_idx):
    return (b + batch if rb else b, h + head if rh else h,
            q_idx + position if rq else q_idx, kv_idx + position if rk else kv_idx)

  if mod.is_score:
    return lambda score, *idx: mod(consts, score, *moved(*idx))
  return lambda *idx: mod(consts, *moved(*idx))


def shard_offsets(spec: RingSpec, q: jax.Array) -> tuple[Any, Any]:
  """The global index of this shard's first batch row and first head (0 where unsharded)."""
  def offset(axis, size):
    return 0 if axis is None else jax.lax.axis_index(axis) * size
  return offset(spec.batch_axis, q.shape[0]), offset(spec.head_axis, q.shape[2])


def merge_consts(flags, diff, nondiff) -> tuple[Any, ...]:
  """Interleaves the differentiable and the other closed-over arrays back into their order."""
  diff, nondiff = list(diff), list(nondiff)
  return tuple(diff.pop(0) if d else nondiff.pop(0) for d in flags)


def _split(x, parts: int):
  return None if x is None else jnp.split(x, parts, axis=1)


def _part(spec: RingSpec, dims, qa, ka, q_seg, kv_seg, mask_consts, nondiff, offsets):
  """One query chunk (true start `qa`) against one key chunk (start `ka`): whether any pair is
  visible, and `attend(q, k, v, diff, saved=None) -> (out, lse)` over it (with `saved`, the
  whole attention's (out, lse): blockwise's hook for this part's share of the gradients)."""
  b0, h0 = offsets
  user = None if spec.mask is None else shifted(spec.mask, mask_consts, b0, h0, ka)
  mask = keywords.keyword_mask_mod(
      segment_ids=None if q_seg is None else (q_seg, kv_seg), mask_mod=and_masks(spec.band, user),
      q_offset=qa - ka, dims=dims)
  bm = make_block_mask(mask, batch=dims.batch, heads=dims.heads, q_len=dims.q_len,
                       kv_len=dims.kv_len, block_size=spec.block_size, q_offset=qa - ka)
  visible = jnp.any(bm.full_num > 0) | jnp.any(bm.partial_num > 0)

  def attend(q, k, v, diff, saved=None):
    score = None
    if spec.score is not None:
      score = shifted(spec.score, merge_consts(spec.score_diff, diff, nondiff), b0, h0, ka)
    common = dict(block_mask=bm, score_mod=score, scale=spec.scale, return_lse=True,
                  precision=spec.precision)
    if saved is not None:
      return blockwise.blockwise_attention(q, k, v, saved=saved, **common)
    return dot_product_attention(q, k, v, implementation=spec.implementation, **common)

  return visible, attend


def _is_blockwise(spec: RingSpec, q: jax.Array, k: jax.Array) -> bool:
  """Whether the local calls take the blockwise path (whose backward takes saved stats)."""
  if spec.implementation is not None:
    return spec.implementation == 'blockwise'
  return choose_implementation(q, k, return_weights=False, dropout_rate=0.0, bias_fn=None,
                               q_offset=0, open_attention=True) == 'blockwise'


def _pairs(spec: RingSpec, step, local_len: int):
  """(q chunk, kv chunk, q start, kv start) of every chunk pair computed at `step`."""
  n = jax.lax.axis_size(spec.axis_name)
  source = (jax.lax.axis_index(spec.axis_name) - step) % n
  _, q_starts = layout_lib.local_chunk_starts(local_len, spec.axis_name, spec.layout)
  _, kv_starts = layout_lib.local_chunk_starts(local_len, spec.axis_name, spec.layout, source)
  return [(qi, ki, qa, ka) for qi, qa in enumerate(q_starts) for ki, ka in enumerate(kv_starts)]


def _notify(spec: RingSpec, name: str, step, qi: int, ki: int) -> None:
  if spec.on_step is not None:
    jax.debug.callback(functools.partial(spec.on_step, name), step, qi, ki,
                       jax.lax.axis_index(spec.axis_name))


def _pass_on(spec: RingSpec, tree, when=True):
  """Sends `tree` to the next device of the ring (device i to i + 1), if `when`."""
  n = jax.lax.axis_size(spec.axis_name)
  perm = [(i, (i + 1) % n) for i in range(n)]
  send = lambda t: jax.tree.map(lambda x: jax.lax.ppermute(x, spec.axis_name, perm), t)  # noqa: E731
  return send(tree) if when is True else jax.lax.cond(when, send, lambda t: t, tree)


def _forward(spec: RingSpec, q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff):
  """out float32 `[B, L, H, Dv]` and lse `[B, H, L]` of the local queries over every key."""
  n = jax.lax.axis_size(spec.axis_name)
  per = layout_lib.chunks_per_device(spec.layout)
  b, t, h = q.shape[:3]
  size = t // per
  offsets = shard_offsets(spec, q)
  qs, q_segs = _split(q, per), _split(q_seg, per) or [None] * per
  empty = (jnp.zeros((b, size, h, v.shape[-1]), jnp.float32),
           jnp.full((b, h, size), -jnp.inf, jnp.float32))

  def step(carry, s):
    k, v, kv_seg, acc = carry
    acc = list(acc)
    ks, vs, kv_segs = _split(k, per), _split(v, per), _split(kv_seg, per) or [None] * per
    for qi, ki, qa, ka in _pairs(spec, s, t):
      dims = check_qkv(qs[qi], ks[ki], vs[ki])
      visible, attend = _part(spec, dims, qa, ka, q_segs[qi], kv_segs[ki], mask_consts,
                              nondiff, offsets)

      def compute(attend=attend, qi=qi, ki=ki):
        _notify(spec, 'forward', s, qi, ki)
        out, lse = attend(qs[qi], ks[ki], vs[ki], diff)
        return out.astype(jnp.float32), lse

      part = jax.lax.cond(visible, compute, lambda: empty)
      acc[qi] = merge_attention(*acc[qi], *part)
    k, v, kv_seg = _pass_on(spec, (k, v, kv_seg), s < n - 1)
    return (k, v, kv_seg, tuple(acc)), None

  init = (k, v, kv_seg, (empty,) * per)
  (_, _, _, acc), _ = jax.lax.scan(step, init, jnp.arange(n))
  return (jnp.concatenate([o for o, _ in acc], axis=1),
          jnp.concatenate([lse for _, lse in acc], axis=2))


def _part_cotangents(out_part, lse_part, out, lse, d_out, d_lse):
  """(do, dl) of one part from the global (O, L, dO, dL); see the module docstring."""
  peak = jnp.where(jnp.isfinite(lse), lse, 0.0)
  share = jnp.where(jnp.isfinite(lse), jnp.exp(lse_part - peak), 0.0)  # [B, H, C]
  d_out_part = jnp.swapaxes(share, 1, 2)[..., None] * d_out
  dot = jnp.sum(d_out * (out_part.astype(jnp.float32) - out), axis=-1)  # [B, C, H]
  d_lse_part = share * (jnp.swapaxes(dot, 1, 2) + d_lse)
  return d_out_part.astype(out_part.dtype), d_lse_part


def _backward(spec: RingSpec, res, cotangents):
  q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff, out, lse = res
  d_out, d_lse = cotangents
  n = jax.lax.axis_size(spec.axis_name)
  per = layout_lib.chunks_per_device(spec.layout)
  t = q.shape[1]
  offsets = shard_offsets(spec, q)
  qs, q_segs = _split(q, per), _split(q_seg, per) or [None] * per
  outs, lses = _split(out, per), jnp.split(lse, per, axis=2)
  d_outs, d_lses = _split(d_out.astype(jnp.float32), per), jnp.split(d_lse, per, axis=2)
  f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731

  def step(carry, s):
    k, v, kv_seg, d_k, d_v, d_q, d_diff = carry
    d_k, d_v, d_q = list(d_k), list(d_v), list(d_q)
    ks, vs, kv_segs = _split(k, per), _split(v, per), _split(kv_seg, per) or [None] * per
    for qi, ki, qa, ka in _pairs(spec, s, t):
      dims = check_qkv(qs[qi], ks[ki], vs[ki])
      visible, attend = _part(spec, dims, qa, ka, q_segs[qi], kv_segs[ki], mask_consts,
                              nondiff, offsets)
      primals = (qs[qi], ks[ki], vs[ki], diff)

      def grads(attend=attend, primals=primals, qi=qi, ki=ki):
        _notify(spec, 'backward', s, qi, ki)
        if _is_blockwise(spec, *primals[:2]):  # this part's share from the saved stats
          saved = (outs[qi], lses[qi])
          _, vjp = jax.vjp(lambda *p: attend(*p, saved=saved), *primals)
          return f32(vjp((d_outs[qi].astype(q.dtype), d_lses[qi])))
        (out_part, lse_part), vjp = jax.vjp(attend, *primals)  # recompute the part
        return f32(vjp(_part_cotangents(out_part, lse_part, outs[qi], lses[qi], d_outs[qi],
                                        d_lses[qi])))

      g_q, g_k, g_v, g_diff = jax.lax.cond(visible, grads, lambda p=primals: zeros(p))
      d_q[qi], d_k[ki], d_v[ki] = d_q[qi] + g_q, d_k[ki] + g_k, d_v[ki] + g_v
      d_diff = jax.tree.map(jnp.add, d_diff, g_diff)
    k, v, kv_seg = _pass_on(spec, (k, v, kv_seg), s < n - 1)
    d_k, d_v = _pass_on(spec, (tuple(d_k), tuple(d_v)))  # after n steps, back home
    return (k, v, kv_seg, d_k, d_v, tuple(d_q), d_diff), None

  init = (k, v, kv_seg, tuple(zeros(_split(k, per))), tuple(zeros(_split(v, per))),
          tuple(zeros(qs)), zeros(diff))
  (_, _, _, d_k, d_v, d_q, d_diff), _ = jax.lax.scan(step, init, jnp.arange(n))
  cast = lambda parts, x: jnp.concatenate(parts, axis=1).astype(x.dtype)  # noqa: E731
  d_diff = tuple(g.astype(c.dtype) for g, c in zip(d_diff, diff, strict=True))
  return cast(d_q, q), cast(d_k, k), cast(d_v, v), None, None, None, d_diff, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(spec, q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff):
  return _forward(spec, q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff)


def _ring_fwd(spec, q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff):
  out, lse = _forward(spec, q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff)
  return (out, lse), (q, k, v, q_seg, kv_seg, mask_consts, diff, nondiff, out, lse)


_ring.defvjp(_ring_fwd, _backward)


def ring_attention(spec: RingSpec, q, k, v, segment_ids, mask_consts, score_consts):
  """Ring attention of the local shards (inside `shard_map`); see the module docstring.

  Args:
    q, k, v: this device's `[B, L, H|K, D]` in the layout `spec.layout`.
    segment_ids: int `[B, L]` of the local tokens, or None.
    mask_consts, score_consts: the arrays `spec.mask` / `spec.score` closed over
      (replicated on every device, indexed by true positions).

  Returns:
    out float32 `[B, L, H, Dv]`, lse float32 `[B, H, L]` (-inf: the row saw no key).
  """
  diff = tuple(c for c, d in zip(score_consts, spec.score_diff, strict=True) if d)
  nondiff = tuple(c for c, d in zip(score_consts, spec.score_diff, strict=True) if not d)
  return _ring(spec, q, k, v, segment_ids, segment_ids, tuple(mask_consts), diff, nondiff)
