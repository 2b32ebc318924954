"""Context parallelism: one sequence split over the devices of a mesh axis (`'sequence'`).

    # Inside shard_map (a Flax layer under a mesh with a 'sequence' axis):
    out = ops.context_parallel_attention(q, k, v, is_causal=True, layout='zigzag')
    # Or on global arrays, with the shard_map made here:
    out = ops.sequence_sharded_attention(q, k, v, mesh=mesh, is_causal=True, layout='zigzag')

Two strategies, chosen in one place (`choose_strategy`):
- 'ring' (`ring.py`): key/value chunks pass around the ring with `ppermute`; each device holds
  two chunks of K/V at a time; a custom VJP passes dK/dV around the ring the same way.
- 'all_gather': every device gathers the whole K/V and attends its queries to it (MaxText's
  default). Cheaper where K/V are small next to the queries -- GQA/MQA with few K/V heads --
  since one collective replaces n dependent steps.

Both honour every open-attention feature of `ops.dot_product_attention`: the causal and window
keywords, segment ids (sharded like the tokens), mask and score functions (they see true
absolute positions `q_idx`, `kv_idx`, and global batch row and head indices when those axes
are sharded too), sinks (counted once per row), soft-capping, GQA/MQA, `return_lse`, and the
local computation goes through `ops.dot_product_attention` with `implementation` passed on.

Arrays that mask and score functions close over (document ids, a learned T5 table) are
replicated on every device and indexed by true positions -- O(length) integers per device for
document ids; pass per-token data that should be sharded as `segment_ids` instead. A learned
array's gradient is summed over the devices. Dense `mask`/`bias` arrays and `bias_fn` are not
taken here (write them as mask/score functions); dropout is not supported.

Lengths are not padded: a per-device length that the layout cannot split (zig-zag needs two
equal chunks per device) raises a `ValueError` naming the numbers.

The `shard_map` around the call must have `check_vma=False` (as `sequence_sharded_attention`'s
does): the local attention paths (the blockwise loops' carries, mask and score functions traced
once outside the map) are not typed for varying mesh axes. Gradients of replicated inputs
(sinks, a learned table) are still summed over the devices by `shard_map`'s transpose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from attn_jax.ops import mask_mods, ring
from attn_jax.ops import masks as masks_lib
from attn_jax.ops import sequence_layout as layout_lib
from attn_jax.ops.attention import Implementation, dot_product_attention, merge_attention
from attn_jax.ops.mods import MaskMod, Mod, ScoreMod, and_masks, split_band
from attn_jax.ops.shapes import check_qkv

Strategy = Literal['auto', 'ring', 'all_gather']


def choose_strategy(heads: int, kv_heads: int, devices: int) -> str:
  """'all_gather' when the gathered K/V (`devices * kv_heads` heads of the local length) are no
  bigger than the queries each device already holds (`heads`), else 'ring'.

  With MHA the gathered K/V grow with the device count and the ring keeps memory at 1/devices;
  with GQA/MQA and few devices the gathered K/V are small, and one all-gather (which XLA can
  overlap with the previous layer) beats n dependent ring steps.
  """
  return 'all_gather' if devices * kv_heads <= heads else 'ring'


def _band(is_causal: bool, local_window, mask_mod: MaskMod | None):
  """(band, rest): the causal/window keywords and the band part of `mask_mod` as one `Band`,
  and the rest of `mask_mod`."""
  band, rest = split_band(mask_mod)
  window = masks_lib.normalize_window(local_window)
  return and_masks(mask_mods.causal() if is_causal else None,
                   mask_mods.sliding_window(*window) if window is not None else None,
                   band), rest


def _all_gather(spec: ring.RingSpec, q, k, v, segment_ids, mask_consts, score_consts):
  """Gathers K/V (and segment ids) in true order; each local query chunk attends to all of
  them with its true `q_offset`, so masks need no shifting."""
  n = jax.lax.axis_size(spec.axis_name)

  def gather(x):
    whole = jax.lax.all_gather(x, spec.axis_name, axis=1, tiled=True)
    return layout_lib.from_layout(whole, n, spec.layout)

  k_all, v_all = gather(k), gather(v)
  kv_seg = None if segment_ids is None else gather(segment_ids)
  b0, h0 = ring.shard_offsets(spec, q)
  user = None if spec.mask is None else ring.shifted(spec.mask, mask_consts, b0, h0)
  score = None if spec.score is None else ring.shifted(spec.score, score_consts, b0, h0)
  per = layout_lib.chunks_per_device(spec.layout)
  _, starts = layout_lib.local_chunk_starts(q.shape[1], spec.axis_name, spec.layout)
  q_segs = [None] * per if segment_ids is None else jnp.split(segment_ids, per, axis=1)
  outs, lses = [], []
  for q_part, q_seg, start in zip(jnp.split(q, per, axis=1), q_segs, starts, strict=True):
    out, lse = dot_product_attention(
        q_part, k_all, v_all, q_offset=start, mask_mod=and_masks(spec.band, user),
        segment_ids=None if q_seg is None else (q_seg, kv_seg), score_mod=score,
        scale=spec.scale, return_lse=True, implementation=spec.implementation,
        block_size=spec.block_size, precision=spec.precision)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _check_untyped(x: jax.Array) -> None:
  """Raises if called inside a `shard_map` that checks varying axes (see the module docstring)."""
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  if getattr(mat, 'varying', None):
    raise ValueError('context_parallel_attention runs inside jax.shard_map(..., check_vma=False)'
                     f'; got an input typed as varying over {sorted(mat.varying)}')


def _add_sinks(out, lse, sinks):
  """Joins one sink logit per head to every row's softmax (a part with no value), once."""
  sinks = jnp.asarray(sinks, jnp.float32)
  if sinks.shape != (out.shape[2],):
    raise ValueError(f'sinks must be one logit per local query head, [{out.shape[2]}], got '
                     f'{sinks.shape}')
  sink_lse = jnp.broadcast_to(sinks[None, :, None], lse.shape)
  return merge_attention(out, lse, jnp.zeros_like(out), sink_lse)


def context_parallel_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: str = 'sequence',
    layout: str = 'contiguous',
    strategy: Strategy = 'auto',
    batch_axis: Any = None,
    head_axis: Any = None,
    is_causal: bool = False,
    local_window: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: jax.Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: Implementation = None,
    block_size: int | tuple[int, int] | None = None,
    precision: Any = None,
    on_step: Callable[..., None] | None = None,
):
  """Self-attention of a sequence sharded over `axis_name`; call inside `shard_map`.

  The result equals `ops.dot_product_attention` on the whole sequence (in true order), sharded
  the same way as the queries.

  Args:
    query: this device's `[batch, local_len, heads, head_dim]`.
    key, value: `[batch, local_len, kv_heads, head_dim | v_dim]`, the same tokens.
    axis_name: the mesh axis the length is split over.
    layout: 'contiguous' (device i holds the i-th slice) or 'zigzag' (an early and a late
      chunk per device, balanced for causal masks; see `sequence_layout.to_layout`).
    strategy: 'ring', 'all_gather' or 'auto' (`choose_strategy`).
    batch_axis, head_axis: mesh axes (names or tuples) the batch / heads are split over, if
      any, so that mask and score functions see global `b` and `h`.
    is_causal, local_window, mask_mod, score_mod, sinks, scale, implementation, block_size,
      precision: as `ops.dot_product_attention`, on true absolute positions. `sinks` are
      this device's heads `[local heads]`.
    segment_ids: int `[batch, local_len]`: the local tokens' segment ids (sharded like them).
    return_lse: also return float32 `[batch, heads, local_len]`.
    on_step: `on_step(pass, step, q_chunk, kv_chunk, device)` called for each chunk pair the
      ring computes ('forward' / 'backward'), to check what is skipped; ring only.

  Returns:
    `[batch, local_len, heads, v_dim]` in `query.dtype` (and the lse).
  """
  dims = check_qkv(query, key, value)
  _check_untyped(query)
  if dims.q_len != dims.kv_len:
    raise ValueError(f'context parallelism is self-attention: q and k/v local lengths differ '
                     f'({dims.q_len} vs {dims.kv_len})')
  devices = jax.lax.axis_size(axis_name)
  layout_lib.check_length(dims.q_len * devices, devices, layout,
                          f'sequence length ({devices} devices x {dims.q_len} local)')
  if segment_ids is not None and jnp.shape(segment_ids) != (dims.batch, dims.q_len):
    raise ValueError(f'segment_ids must be the local tokens\' [batch, local_len] = '
                     f'{(dims.batch, dims.q_len)}, got {jnp.shape(segment_ids)}')
  if strategy == 'auto':
    strategy = choose_strategy(dims.heads, dims.kv_heads, devices)
  if strategy not in ('ring', 'all_gather'):
    raise ValueError(f"strategy must be 'auto', 'ring' or 'all_gather', got {strategy!r}")
  band, rest = _band(is_causal, local_window, mask_mod)
  mask, mask_consts = (None, ()) if rest is None else Mod.of_mask(rest)
  score, score_consts = (None, ()) if score_mod is None else Mod.of_score(score_mod)
  spec = ring.RingSpec(
      axis_name=axis_name, layout=layout, band=band, mask=mask, score=score,
      score_diff=tuple(jnp.issubdtype(jnp.asarray(c).dtype, jnp.inexact) for c in score_consts),
      batch_axis=batch_axis, head_axis=head_axis, scale=scale, implementation=implementation,
      block_size=block_size, precision=precision, on_step=on_step)
  run = ring.ring_attention if strategy == 'ring' else _all_gather
  out, lse = run(spec, query, key, value, segment_ids, mask_consts, score_consts)
  if sinks is not None:
    out, lse = _add_sinks(out, lse, sinks)
  out = out.astype(query.dtype)
  return (out, lse) if return_lse else out


def sequence_sharded_attention(query, key, value, *, mesh: jax.sharding.Mesh,
                               axis_name: str = 'sequence', batch_axis: Any = None,
                               head_axis: Any = None, layout: str = 'contiguous',
                               segment_ids=None, mask_mod=None, score_mod=None, sinks=None,
                               return_lse: bool = False, **kwargs):
  """`context_parallel_attention` on global arrays: makes the `shard_map` over `mesh`.

  Args:
    query, key, value: global `[batch, length, heads | kv_heads, dim]`, already in `layout`
      order (`sequence_layout.to_layout`); length split over `axis_name`, batch over
      `batch_axis`, heads over `head_axis` (None: not split).
    segment_ids: int `[batch, length]` in layout order. sinks: `[heads]`.
    mask_mod, score_mod: functions of true positions; their closed-over arrays are passed
      to every device whole (replicated).
    **kwargs: the other keywords of `context_parallel_attention`.

  Returns:
    Global `[batch, length, heads, v_dim]` (and lse `[batch, heads, length]`), layout order.
  """
  devices = mesh.shape[axis_name]
  layout_lib.check_length(query.shape[1], devices, layout)
  band, rest = split_band(mask_mod)
  mask, mask_consts = (None, ()) if rest is None else Mod.of_mask(rest)
  score, score_consts = (None, ()) if score_mod is None else Mod.of_score(score_mod)
  tokens, seq = P(batch_axis, axis_name, head_axis), P(batch_axis, axis_name)

  def body(q, k, v, seg, snk, m_consts, s_consts):
    user = None if mask is None else (lambda *i: mask(m_consts, *i))
    return context_parallel_attention(
        q, k, v, axis_name=axis_name, batch_axis=batch_axis, head_axis=head_axis,
        layout=layout, segment_ids=seg, mask_mod=and_masks(band, user),
        score_mod=None if score is None else (lambda *i: score(s_consts, *i)), sinks=snk,
        return_lse=return_lse, **kwargs)

  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
  in_specs = (tokens, tokens, tokens, None if segment_ids is None else seq,
              None if sinks is None else P(head_axis), replicated(mask_consts),
              replicated(score_consts))
  out_specs = (tokens, P(batch_axis, head_axis, axis_name)) if return_lse else tokens
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return fn(query, key, value, segment_ids, sinks, tuple(mask_consts), tuple(score_consts))
