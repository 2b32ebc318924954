"""Block masks: which key blocks each query block must visit, built once from a `mask_mod`.

    bm = ops.block_mask(mask_mods.document(doc_ids), batch=2, heads=8, q_len=4096)
    out = ops.dot_product_attention(q, k, v, block_mask=bm)   # every layer, every step

The attention matrix is cut into `[block_q, block_kv]` blocks. For every (batch row, head,
query block) a block is *hidden* (no visible pair: never visited, forward or backward), *full*
(every pair visible: visited without evaluating the mask) or *partial* (visited, mask
evaluated). The lists are kept per group of rows that share a mask: a mask that reads neither
`b` nor `h` (causal, windows) has one group for the whole batch, a per-row one (documents,
padding) one group per batch row, a per-head one one group per head.

A `BlockMask` is a pytree (its arrays are leaves, its sizes and mask function static), so it
can be built inside `jax.jit` from traced document ids and passed between jitted functions.
Band masks (causal, sliding windows) are classified from block corners; other masks are
evaluated once per (row group, query, key) when the block mask is built, in blocks of
`block_q` queries, and only on the blocks a band part of the mask leaves as candidates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops.mods import Band, MaskMod, Mod, band_of

DEFAULT_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """The visit lists of a mask, per row group `g` (`groups = batch_groups * head_groups`).

  Attributes (int32 arrays; `nq`, `nk` = number of query / key blocks):
    full_num, partial_num: `[groups, nq]` how many key blocks query block i visits fully /
      with the mask evaluated; full_idx, partial_idx `[groups, nq, nk]` which (first
      `*_num` entries, ascending).
    full_num_t, partial_num_t, full_idx_t, partial_idx_t: the same, transposed (query blocks
      per key block) for the backward pass.
    q_offset: absolute position of query 0 (int32 scalar).
    consts: the arrays the mask function closed over (document ids, lengths...).
    mod: the traced mask function (None: every pair visible but padding keys).
    batch, heads, q_len, kv_len, block_q, block_kv: the sizes it was built for.
    batch_groups: `batch` if the mask reads `b`, else 1; head_groups likewise with `h`.
  """
  full_num: jax.Array
  full_idx: jax.Array
  partial_num: jax.Array
  partial_idx: jax.Array
  full_num_t: jax.Array
  full_idx_t: jax.Array
  partial_num_t: jax.Array
  partial_idx_t: jax.Array
  q_offset: jax.Array
  consts: tuple[Any, ...]
  mod: Mod | None = dataclasses.field(metadata=dict(static=True))
  batch: int = dataclasses.field(metadata=dict(static=True))
  heads: int = dataclasses.field(metadata=dict(static=True))
  q_len: int = dataclasses.field(metadata=dict(static=True))
  kv_len: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))
  batch_groups: int = dataclasses.field(metadata=dict(static=True))
  head_groups: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  @property
  def groups(self) -> int:
    return self.batch_groups * self.head_groups

  def group_indices(self, group: Any) -> tuple[jax.Array, jax.Array]:
    """`b [batch / batch_groups]`, `h [heads / head_groups]` indices of a row group."""
    b_per, h_per = self.batch // self.batch_groups, self.heads // self.head_groups
    bg, hg = group // self.head_groups, group % self.head_groups
    return bg * b_per + jnp.arange(b_per), hg * h_per + jnp.arange(h_per)

  def mask(self, group, q_pos: jax.Array, kv_pos: jax.Array, *, kv_major: bool = False):
    """The mask inside a partial block: bool `[1, rows|1, cols]` (rows x cols = q x kv, or kv
    x q with `kv_major`), padding keys (`kv_pos >= kv_len`) hidden."""
    grid = kv_pos[:, None] if kv_major else kv_pos[None, :]
    visible = grid < self.kv_len
    if self.mod is not None:
      b, h = self.group_indices(group)
      # Within a group the mask reads neither b nor h (else the group is one row): [1,1,r,c].
      values = self.mod.grid(self.consts, b[:1], h[:1], q_pos, kv_pos, kv_major=kv_major)
      visible = visible & values[0, 0]
    return visible[None]

  def visited(self) -> jax.Array:
    """bool `[groups, nq, nk]`: the blocks the attention loop visits (full or partial)."""
    nk = self.num_kv_blocks
    cols = jnp.arange(nk)
    def row(idx, num):
      return jnp.zeros((nk,), bool).at[jnp.where(cols < num, idx, nk)].set(True, mode='drop')
    full = jax.vmap(jax.vmap(row))(self.full_idx, self.full_num)
    partial = jax.vmap(jax.vmap(row))(self.partial_idx, self.partial_num)
    return full | partial

  def dense(self) -> jax.Array:
    """bool `[batch_groups|.., head_groups, q_len, kv_len]`: the whole mask, materialized (for
    pictures and tests; hidden blocks read as False without evaluating the mask)."""
    nq, nk, bq, bk = self.num_q_blocks, self.num_kv_blocks, self.block_q, self.block_kv
    q_pos = self.q_offset + jnp.arange(nq * bq)
    kv_pos = jnp.arange(nk * bk)

    def one_group(g):
      values = jnp.full((nq * bq, nk * bk), True)
      if self.mod is not None:
        b, h = self.group_indices(g)
        values = self.mod.grid(self.consts, b[:1], h[:1], q_pos, kv_pos)[0, 0]
      values = values & (kv_pos[None, :] < self.kv_len)
      keep = jnp.repeat(jnp.repeat(self.visited()[g], bq, axis=0), bk, axis=1)
      return (values & keep)[:self.q_len, :self.kv_len]

    out = jax.vmap(one_group)(jnp.arange(self.groups))
    return out.reshape(self.batch_groups, self.head_groups, self.q_len, self.kv_len)


def _visit_lists(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
  """bool `[..., n]` -> (count `[...]`, indices of the True entries first, ascending `[..., n]`)."""
  order = jnp.argsort(~flags, axis=-1, stable=True).astype(jnp.int32)
  return jnp.sum(flags, axis=-1, dtype=jnp.int32), order


def _band_classes(band: Band, nq, nk, bq, bk, q_len, kv_len, q_offset):
  """(any visible, all visible) `[nq, nk]` of a band, from block corners: `kv - q` takes every
  value in `[k0 - q1, k1 - q0]` over a block."""
  i = jnp.arange(nq)[:, None]
  j = jnp.arange(nk)[None, :]
  q0 = i * bq + q_offset
  q1 = jnp.minimum(i * bq + bq, q_len) - 1 + q_offset  # padding queries do not count
  k0 = j * bk
  k1 = jnp.minimum(j * bk + bk, kv_len) - 1
  any_visible = jnp.ones((nq, nk), bool)
  all_visible = jnp.broadcast_to(j * bk + bk <= kv_len, (nq, nk))  # no padding keys
  if band.hi is not None:
    any_visible = any_visible & (k0 - q1 <= band.hi)
    all_visible = all_visible & (k1 - q0 <= band.hi)
  if band.lo is not None:
    any_visible = any_visible & (k1 - q0 >= band.lo)
    all_visible = all_visible & (k0 - q1 >= band.lo)
  return any_visible, all_visible


def block_mask(mask_mod: MaskMod | None, *, batch: int, heads: int, q_len: int,
               kv_len: int | None = None, block_size: int | tuple[int, int] | None = None,
               q_offset: Any = 0) -> BlockMask:
  """Classifies every block of `mask_mod` as hidden, partial or full; jit-compatible.

  Args:
    mask_mod: `mask_mod(b, h, q_idx, kv_idx) -> bool` (see `mask_mods`), or None (all keys
      visible: only a padded last key block is partial).
    batch, heads: the attention call's batch and query heads.
    q_len, kv_len: its query and key lengths (kv_len defaults to q_len).
    block_size: `(block_q, block_kv)` or one int (default 512), capped at the lengths; the
      attention call uses these.
    q_offset: absolute position of query 0 (int or traced scalar), e.g. a cache index.

  Returns:
    A `BlockMask` for `ops.dot_product_attention(..., block_mask=...)`.
  """
  kv_len = q_len if kv_len is None else kv_len
  for name, value in (('batch', batch), ('heads', heads), ('q_len', q_len), ('kv_len', kv_len)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'block_mask: {name}={value!r} must be a positive int')
  block_size = DEFAULT_BLOCK if block_size is None else block_size
  bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
  if bq <= 0 or bk <= 0:
    raise ValueError(f'block_mask: block sizes must be positive, got {block_size}')
  bq, bk = min(bq, q_len), min(bk, kv_len)
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  q_offset = jnp.asarray(q_offset, jnp.int32)

  mod, consts = (None, ()) if mask_mod is None else Mod.of_mask(mask_mod)
  if isinstance(mask_mod, Band) and mask_mod == Band(None, None):
    mod = None
  b_groups = batch if mod is not None and mod.reads[0] else 1
  h_groups = heads if mod is not None and mod.reads[1] else 1
  groups = b_groups * h_groups
  band = band_of(mask_mod) or Band(None, None)
  any_band, all_band = _band_classes(band, nq, nk, bq, bk, q_len, kv_len, q_offset)

  if mod is None or isinstance(mask_mod, Band):
    any_visible = jnp.broadcast_to(any_band, (groups, nq, nk))
    all_visible = jnp.broadcast_to(all_band, (groups, nq, nk))
  else:
    width = _band_width(band, nk, bq, bk)
    any_visible, all_visible = _evaluate(mod, consts, any_band, width, batch, heads, b_groups,
                                         h_groups, nq, nk, bq, bk, q_len, kv_len, q_offset)
    any_visible = any_visible & any_band
    all_visible = all_visible & any_visible
  full = all_visible
  partial = any_visible & ~all_visible
  full_num, full_idx = _visit_lists(full)
  partial_num, partial_idx = _visit_lists(partial)
  full_num_t, full_idx_t = _visit_lists(jnp.swapaxes(full, 1, 2))
  partial_num_t, partial_idx_t = _visit_lists(jnp.swapaxes(partial, 1, 2))
  return BlockMask(full_num, full_idx, partial_num, partial_idx, full_num_t, full_idx_t,
                   partial_num_t, partial_idx_t, q_offset, consts, mod, batch, heads, q_len,
                   kv_len, bq, bk, b_groups, h_groups)


def _band_width(band: Band, nk: int, bq: int, bk: int) -> int:
  """How many consecutive key blocks a query block can touch inside `band` (static): the keys
  visible to `bq` consecutive queries span `bq - 1 + hi - lo + 1` positions."""
  if band.lo is None or band.hi is None:
    return nk
  span = bq + band.hi - band.lo
  return max(1, min(nk, -(-span // bk) + 1))


def _evaluate(mod, consts, candidates, width, batch, heads, b_groups, h_groups, nq, nk, bq,
              bk, q_len, kv_len, q_offset):
  """(any, all) visible `[groups, nq, nk]` by evaluating the mask on the candidate blocks of
  each query block (a band bounds them to `width` consecutive blocks; else every key block),
  one query block at a time."""
  first = jnp.argmax(candidates, axis=1)  # [nq]: candidates are contiguous for a band
  b_vec = jnp.arange(batch) if b_groups > 1 else jnp.arange(1)
  h_vec = jnp.arange(heads) if h_groups > 1 else jnp.arange(1)

  def one_q_block(i):
    start = jnp.clip(first[i], 0, nk - width)
    kv_blocks = start + jnp.arange(width)
    kv_pos = (kv_blocks[:, None] * bk + jnp.arange(bk)[None, :]).reshape(-1)
    rows = i * bq + jnp.arange(bq)
    values = mod.grid(consts, b_vec, h_vec, q_offset + rows, kv_pos)  # [Bg|1, Hg|1, bq, w*bk]
    values = jnp.broadcast_to(values, (b_vec.size, h_vec.size, bq, width * bk))
    values = values & (kv_pos < kv_len)[None, None, None, :]
    real = (rows < q_len)[None, None, :, None]
    blocks = values.reshape(b_vec.size, h_vec.size, bq, width, bk)
    any_ = jnp.any(blocks & real[..., None], axis=(2, 4))
    all_ = jnp.all(blocks | ~real[..., None], axis=(2, 4))
    scatter = lambda x: jnp.zeros(x.shape[:2] + (nk,), bool).at[..., kv_blocks].set(x)  # noqa: E731
    return scatter(any_), scatter(all_)

  any_v, all_v = jax.lax.map(one_q_block, jnp.arange(nq))  # [nq, Bg, Hg, nk]
  groups = b_groups * h_groups
  any_v = jnp.moveaxis(any_v, 0, 2).reshape(groups, nq, nk)
  all_v = jnp.moveaxis(all_v, 0, 2).reshape(groups, nq, nk)
  return any_v, all_v
