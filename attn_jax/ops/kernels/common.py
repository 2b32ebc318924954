"""What the GPU and TPU kernels share: the static plan of a call and the code that turns a tile
of raw logits into scores and a visibility mask.

The plan is everything static about one call (sizes, visit blocks, the split mask and score
functions, the scale); the platform files add their tiles (`blocks.Layout`) and write the
kernels. Inside a kernel a tile is `[tile_q, tile_kv]` logits (or `[tile_kv, tile_q]` in the
TPU dK/dV kernel); `tile_scores` applies the score function and, on partly visible blocks,
the mask function and the key-padding mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax.ops.kernels.mod_eval import KernelMod


def pad(x, axis: int, size: int, value=0):
  """`x` padded with `value` to `size` along `axis`."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def div(x, n: int):
  """`x // n` for traced `x >= 0`. jnp's floor division lowers through `sign`, which Mosaic
  lowers only with a TPU attached: a CPU-only export for TPU would fail."""
  return x if n == 1 else jax.lax.div(x, jnp.int32(n))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one call (hashable: kernels are specialised on it)."""
  batch: int
  heads: int
  kv_heads: int
  q_len: int
  kv_len: int
  head_dim: int
  v_dim: int
  block_q: int  # visit blocks: the BlockMask's
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  batch_groups: int  # the BlockMask's row groups
  head_groups: int
  mask: KernelMod | None
  score: KernelMod | None
  has_sinks: bool
  scale: float
  precision: Any
  max_visits: int  # static bound on the key blocks one query block visits
  max_visits_t: int  # on the query blocks that visit one key block

  @property
  def q_per_kv(self) -> int:
    """Query heads per key/value head (the GQA group)."""
    return self.heads // self.kv_heads

  def group(self, b, h):
    """The block mask's row group of (batch row b, query head h)."""
    bg = b if self.batch_groups > 1 else 0
    hg = h if self.head_groups > 1 else 0
    return bg * self.head_groups + hg

  def tiles_per_block(self, axis: str, tile: int, padded: int) -> int:
    """Tiles in one visit block (one block: the tiles cover the padded length)."""
    blocks, block = ((self.num_q_blocks, self.block_q) if axis == 'q'
                     else (self.num_kv_blocks, self.block_kv))
    return block // tile if blocks > 1 else padded // tile

  def block_of_tile(self, axis: str, tile_index, tile: int):
    """The visit block holding tile `tile_index` (of size `tile`) along `axis`."""
    blocks, block = ((self.num_q_blocks, self.block_q) if axis == 'q'
                     else (self.num_kv_blocks, self.block_kv))
    return div(tile_index, block // tile) if blocks > 1 else 0 * tile_index

  def block_start(self, axis: str, block):
    return block * (self.block_q if axis == 'q' else self.block_kv)


@dataclasses.dataclass(frozen=True)
class ModReaders:
  """How a kernel reads the inputs of the mask and the score function for the current tile:
  `read(i)` / `table(i, index)` per function, and whether tables take array indices (see
  `KernelMod.evaluate`)."""
  mask_read: Any = None
  mask_table: Any = None
  score_read: Any = None
  score_table: Any = None
  gather: bool = False


def tile_scores(plan: Plan, logits, *, b, h, q_idx, kv_idx, readers: ModReaders, masked: bool,
                pad_keys: bool, grad: bool = False):
  """Scores and visibility of a tile of scaled logits (float32).

  Args:
    masked: a partly visible block: evaluate the mask function.
    pad_keys: the tile may hold padding keys (`kv_idx >= kv_len`): hide them.
    grad: also return d score / d logit (the score function is elementwise in the logit).

  Returns:
    `(scores, visible, d_scores)`: visible is a bool array broadcasting to the tile (None:
    all visible), d_scores None without a score function or `grad`.
  """
  d_scores = None
  if plan.score is not None:
    def score(x):
      out = plan.score.evaluate(readers.score_read, readers.score_table, b, h, q_idx, kv_idx,
                                score=x, gather=readers.gather)
      return jnp.broadcast_to(out, x.shape).astype(jnp.float32)
    if grad:
      logits, d_scores = jax.jvp(score, (logits,), (jnp.ones_like(logits),))
    else:
      logits = score(logits)
  visible = None
  if masked and plan.mask is not None:
    visible = plan.mask.evaluate(readers.mask_read, readers.mask_table, b, h, q_idx, kv_idx,
                                 gather=readers.gather)
  if masked or pad_keys:
    real = kv_idx < plan.kv_len
    visible = real if visible is None else jnp.logical_and(visible, real)
  return logits, visible, d_scores


# --- Visit lists, as the kernels take them -------------------------------------------------


def combined_visits(full_num, full_idx, partial_num, partial_idx, width: int):
  """One list per row: the fully visible blocks, then the partly visible ones.

  Args: the BlockMask lists `[groups, n]` and `[groups, n, m]`; width: static bound on the
  entries (the TPU grid's width).

  Returns:
    `(num [groups, n], num_full [groups, n], idx [groups, n, width])` int32; entries at and
    past `num` repeat the last valid one (so a TPU index map fetches nothing new there).
  """
  m = full_idx.shape[-1]
  total = full_num + partial_num
  n = jnp.arange(width)[None, None, :]
  n = jnp.maximum(jnp.minimum(n, total[..., None] - 1), 0)  # past the end: the last entry
  from_partial = n >= full_num[..., None]
  full = jnp.take_along_axis(full_idx, jnp.clip(n, 0, m - 1), axis=-1)
  partial = jnp.take_along_axis(partial_idx, jnp.clip(n - full_num[..., None], 0, m - 1),
                                axis=-1)
  idx = jnp.where(from_partial, partial, full)
  return total.astype(jnp.int32), full_num.astype(jnp.int32), idx.astype(jnp.int32)


def band_visits(band, block_rows: int, block_cols: int, num_cols: int) -> int:
  """A static bound on the column blocks a row block visits inside `band` (lo <= col - row <=
  hi; None: unbounded): the columns visible to `block_rows` consecutive rows span
  `block_rows + hi - lo` positions."""
  if band is None or band.lo is None or band.hi is None:
    return num_cols
  span = block_rows + band.hi - band.lo
  return max(1, min(num_cols, -(-span // block_cols) + 1))
