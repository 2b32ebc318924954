"""Block sizes of the Pallas kernels: the one table, and the rules each platform imposes.

Two granularities, so that one block mask serves every platform:

* **Visit blocks** `(block_q, block_kv)`: the `BlockMask`'s blocks, the unit the visit lists
  name. The block mask is built once per call, before the platform's kernel is chosen at
  lowering time, so the visit block cannot depend on the platform: `VISIT_BLOCK` is a multiple
  of every platform's tile (a user's `BlockMask`, default 512, is one too).
* **Tiles** `(tile_q, tile_kv)`: what one kernel step computes; a visit block is walked in
  tiles (a visited block of 128 x 128 is two 128 x 64 tiles for the GPU forward kernel).

Constraints (checked here at trace time, so a call that could not compile fails as a
`ValueError` naming the sizes):

* GPU (Triton): every tile side a power of two >= 16 (`tl.dot`'s minimum); the head dims
  padded to a power of two >= 16.
* TPU (Mosaic): a query tile a multiple of 128 (the backward kernels hold per-query rows in
  vector lanes) and a key tile a multiple of 128 (lanes), or one tile covering the whole
  padded length; head dims up to 128 as they are, larger ones padded to a multiple of 128.
* A visit block must be a multiple of the tile, unless there is one visit block along that
  axis (then the tiles cover the padded length).
"""

from __future__ import annotations

import dataclasses

import numpy as np

LANES = 128  # TPU vector lanes
SUBLANES = 8  # TPU vector sublanes
GPU_MIN_TILE = 16  # Triton's smallest dot operand side

# The BlockMask granularity for calls that build their own: 128 x 128 is a multiple of every
# tile below and fine enough that a 1K window at 32K visits ~10 of 256 key blocks per row.
VISIT_BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiles of one platform for one dtype: forward and both backward kernels."""
  fwd: tuple[int, int]  # (tile_q, tile_kv) of the forward kernel
  bwd: tuple[int, int]  # of the dK/dV and dQ kernels
  num_warps: int = 4  # GPU only
  num_stages: int = 2  # GPU only


# (platform, bytes per input element) -> tiles, for head dims up to 128. FlashAttention-2's
# Triton defaults on GPU (fp32 halves them: twice the registers per element); splash
# attention's defaults on TPU. Not tuned on a device: no GPU or TPU was available (the device
# benchmark, experiments/bench_attention.py --suite=device, is where to tune them).
TILES = {
    ('gpu', 2): Tiles(fwd=(128, 64), bwd=(64, 64), num_warps=4),
    ('gpu', 4): Tiles(fwd=(64, 32), bwd=(32, 32), num_warps=4),
    ('tpu', 2): Tiles(fwd=(128, 128), bwd=(128, 128)),
    ('tpu', 4): Tiles(fwd=(128, 128), bwd=(128, 128)),
}


def table_tiles(platform: str, itemsize: int, head_dim: int) -> Tiles:
  """The table's tiles; head dims above 128 halve the GPU query tiles (registers)."""
  tiles = TILES[(platform, 4 if itemsize >= 4 else 2)]
  if platform == 'gpu' and head_dim > 128:
    halve = lambda t: (max(GPU_MIN_TILE, t[0] // 2), t[1])  # noqa: E731
    tiles = dataclasses.replace(tiles, fwd=halve(tiles.fwd), bwd=halve(tiles.bwd), num_warps=8)
  elif platform == 'gpu' and head_dim > 64:
    tiles = dataclasses.replace(tiles, num_warps=8)
  return tiles


def padded_head_dim(platform: str, dim: int) -> int:
  """The head dim a kernel computes with (inputs are zero-padded to it)."""
  if platform == 'gpu':
    return max(GPU_MIN_TILE, 1 << (dim - 1).bit_length())
  return dim if dim <= LANES else -(-dim // LANES) * LANES


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _valid(platform: str, tile: int) -> bool:
  """A tile side the platform's kernels take when there are several tiles along the axis."""
  if platform == 'gpu':
    return tile >= GPU_MIN_TILE and tile & (tile - 1) == 0
  return tile % LANES == 0


def choose_tile(platform: str, axis: str, want: int, visit_block: int, num_blocks: int,
                length: int) -> int | None:
  """The largest valid tile <= `want` for one axis ('q' or 'kv'), or None if there is none.

  With several visit blocks the tile must divide the visit block; with one, any valid tile
  does (the tiles then cover the padded length, at most `want` each).
  """
  if num_blocks == 1:
    if platform == 'gpu':
      return min(want, max(GPU_MIN_TILE, 1 << (length - 1).bit_length()))
    # One tile covering the whole (8-row padded) length is always valid on TPU.
    whole = _round_up(length, SUBLANES if axis == 'q' else LANES)
    return whole if whole <= want else (want if _valid(platform, want) else None)
  for tile in range(min(want, visit_block), 0, -1):
    if visit_block % tile == 0 and _valid(platform, tile):
      return tile
  return None


@dataclasses.dataclass(frozen=True)
class Layout:
  """The tiles and padded sizes of one call on one platform (static)."""
  fwd: tuple[int, int]
  bwd: tuple[int, int]
  q_pad: int  # padded q length: a multiple of every q tile, >= num_q_blocks * block_q
  kv_pad: int
  head_dim: int  # padded
  v_dim: int  # padded
  num_warps: int
  num_stages: int


def layout(platform: str, itemsize: int, *, q_len: int, kv_len: int, head_dim: int, v_dim: int,
           block_q: int, block_kv: int, num_q_blocks: int, num_kv_blocks: int,
           tiles: Tiles | None = None) -> Layout | str:
  """The layout of a call, or a sentence saying why this platform's kernel cannot take it."""
  tiles = tiles or table_tiles(platform, itemsize, max(head_dim, v_dim))
  chosen = []
  for want in (tiles.fwd, tiles.bwd):
    tq = choose_tile(platform, 'q', want[0], block_q, num_q_blocks, q_len)
    tk = choose_tile(platform, 'kv', want[1], block_kv, num_kv_blocks, kv_len)
    if tq is None or tk is None:
      rule = ('power-of-two tiles >= 16 dividing it' if platform == 'gpu'
              else 'tiles that are multiples of 128 dividing it')
      return (f'the block mask\'s blocks (block_q, block_kv) = ({block_q}, {block_kv}) admit no '
              f'{platform} kernel tile: {platform} needs {rule} (build it with block_size='
              f'{VISIT_BLOCK}, or a multiple)')
    chosen.append((tq, tk))
  (fq, fk), (bq, bk) = chosen
  q_pad = _round_up(max(q_len, num_q_blocks * block_q if num_q_blocks > 1 else 0),
                    int(np.lcm(fq, bq)))
  kv_pad = _round_up(max(kv_len, num_kv_blocks * block_kv if num_kv_blocks > 1 else 0),
                     int(np.lcm(fk, bk)))
  return Layout(fwd=(fq, fk), bwd=(bq, bk), q_pad=q_pad, kv_pad=kv_pad,
                head_dim=padded_head_dim(platform, head_dim),
                v_dim=padded_head_dim(platform, v_dim), num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)
