"""How a sequence is laid out over the devices of a `sequence` mesh axis (context parallelism).

    contiguous   device i holds positions [i L, (i + 1) L)       (L = length / devices)
    zigzag       device i holds chunks i and 2n - 1 - i of size C = length / (2n)

Under a causal mask the contiguous layout gives the last device n times the work of the first
(its queries see every earlier key); the zig-zag layout pairs an early chunk with a late one, so
every device does the same work (Brandon et al. 2023 "striped" / zig-zag ring attention). A
model permutes its tokens into the layout once (`to_layout`, at the embedding), runs every
layer on the permuted sequence, and takes positions (RoPE, position embeddings) from
`layout_positions`, the true position of each slot; per-token losses need no un-permuting if
the targets were permuted with the tokens. Attention sees the true positions throughout.

Everything here is static index arithmetic on numbers known at trace time, except
`local_chunk_starts`/`local_positions`, which read the device's index inside `shard_map`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ('contiguous', 'zigzag')


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')


def chunks_per_device(layout: str) -> int:
  """How many contiguous chunks of the true sequence each device holds."""
  check_layout(layout)
  return 2 if layout == 'zigzag' else 1


def check_length(length: int, devices: int, layout: str, what: str = 'sequence length') -> None:
  """A `length` that the layout cannot split evenly over `devices` raises, naming the numbers
  (the ops do not pad: padding changes the sequence a model sees; pad the batch instead)."""
  chunks = devices * chunks_per_device(layout)
  if length % chunks:
    raise ValueError(
        f'{what} {length} does not split into {chunks} equal chunks ({devices} devices x '
        f'{chunks_per_device(layout)} chunk(s) each for layout {layout!r}); pad it to a '
        f'multiple of {chunks}')


def chunk_order(devices: int, layout: str) -> np.ndarray:
  """int `[devices * chunks]`: the true chunk held by each slot of the laid-out sequence
  (zigzag with 4 devices: 0 7 1 6 2 5 3 4)."""
  if chunks_per_device(layout) == 1:
    return np.arange(devices)
  early, late = np.arange(devices), 2 * devices - 1 - np.arange(devices)
  return np.stack([early, late], axis=1).reshape(-1)


def _reorder(x: jax.Array, order: np.ndarray, axis: int) -> jax.Array:
  axis = axis % x.ndim
  n = len(order)
  chunked = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1:])
  chunked = jnp.take(chunked, jnp.asarray(order), axis=axis)
  return chunked.reshape(x.shape)


def to_layout(x: jax.Array, devices: int, layout: str = 'zigzag', axis: int = 1) -> jax.Array:
  """Permutes the true sequence `x` (length along `axis`) into the layout; sharding the result's
  `axis` over `devices` gives each device its chunks. Identity for 'contiguous'."""
  check_length(x.shape[axis], devices, layout)
  return x if layout == 'contiguous' else _reorder(x, chunk_order(devices, layout), axis)


def from_layout(x: jax.Array, devices: int, layout: str = 'zigzag', axis: int = 1) -> jax.Array:
  """The inverse of `to_layout`: back to the true order."""
  check_length(x.shape[axis], devices, layout)
  if layout == 'contiguous':
    return x
  return _reorder(x, np.argsort(chunk_order(devices, layout)), axis)


def layout_positions(length: int, devices: int, layout: str = 'zigzag') -> jax.Array:
  """int32 `[length]`: the true position of each slot of the laid-out sequence (pass to RoPE
  or a position embedding in place of `arange(length)`)."""
  return to_layout(jnp.arange(length, dtype=jnp.int32), devices, layout, axis=0)


def local_chunk_starts(local_len: int, axis_name: str, layout: str, device=None
                       ) -> tuple[int, list[jax.Array]]:
  """Inside `shard_map`: the length of each local chunk and their true start positions
  (int32 scalars) on this device, or on `device` (an index along `axis_name`)."""
  n = jax.lax.axis_size(axis_name)
  per = chunks_per_device(layout)
  if local_len % per:
    raise ValueError(f'layout {layout!r} needs a per-device length divisible by {per}, got '
                     f'{local_len}')
  size = local_len // per
  i = jax.lax.axis_index(axis_name) if device is None else device
  starts = [i * size] if per == 1 else [i * size, (2 * n - 1 - i) * size]
  return size, [jnp.asarray(s, jnp.int32) for s in starts]


def local_positions(local_len: int, axis_name: str = 'sequence', layout: str = 'zigzag'
                    ) -> jax.Array:
  """Inside `shard_map`: int32 `[local_len]`, the true positions of this device's tokens."""
  size, starts = local_chunk_starts(local_len, axis_name, layout)
  return jnp.concatenate([s + jnp.arange(size, dtype=jnp.int32) for s in starts])
