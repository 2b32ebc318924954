"""Context parallelism in the models: when the ambient mesh has a `sequence` axis of size > 1,
every sequence's length is split over it and self-attention runs as ring attention
(`ops.sequence_sharded_attention`) instead of gathering the whole sequence on each device.

The train layer turns it on with one field, `config.parallel.mesh.sequence=N`
(`parallel.mode='sharded'`): the batch's length axis is placed over `sequence`, the step runs
under `jax.set_mesh(mesh)`, and the models read the mesh here. Per-token work (embeddings,
feed-forward, norms, projections) needs nothing: XLA keeps it sharded along the length.

Causal stacks load-balance the ring: a decoder permutes its tokens into the zig-zag layout
once (`to_layout`: each device holds an early and a late chunk, so no device idles while
another finishes the long end of the causal triangle) and back at its end (`from_layout`);
masks, score functions and RoPE follow the tokens' true positions. Bidirectional stacks keep
the contiguous layout (every device has the same work anyway).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models import names

BATCH_AXES = ('data', 'fsdp')  # the batch's mesh axes (train.config.BATCH_AXES)
HEAD_AXIS = 'tensor'


def _mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def sequence_devices() -> int:
  """Devices the ambient mesh splits sequences over (1: no context parallelism)."""
  mesh = _mesh()
  if mesh is None or names.SEQUENCE_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[names.SEQUENCE_AXIS])


def layout(causal: bool) -> str:
  """The token order of a stack under context parallelism: zig-zag for causal ones."""
  return 'zigzag' if causal else 'contiguous'


def to_layout(x: jax.Array | None, causal: bool) -> jax.Array | None:
  """`[batch, length, ...]` in true order -> the stack's layout (identity when off)."""
  devices = sequence_devices()
  if x is None or devices == 1 or layout(causal) == 'contiguous':
    return x
  return ops.sequence_layout.to_layout(x, devices, 'zigzag', axis=1)


def from_layout(x: jax.Array, causal: bool) -> jax.Array:
  """The inverse of `to_layout`."""
  devices = sequence_devices()
  if devices == 1 or layout(causal) == 'contiguous':
    return x
  return ops.sequence_layout.from_layout(x, devices, 'zigzag', axis=1)


def positions(batch: int, length: int, causal: bool) -> jax.Array:
  """int32 `[batch, length]` true positions `0..length-1` in the stack's layout."""
  return to_layout(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
                   causal)


def attention(query, key, value, *, causal: bool, mask, segment_ids, local_window, mask_mod,
              score_mod, sinks, scale, implementation) -> jax.Array:
  """Self-attention of a stack whose tokens are split over the `sequence` axis (in
  `layout(causal)` order): ring attention over the mesh, each device keeping its chunk.

  A key-padding `mask` `[batch, 1, 1, length]` becomes segment ids (padding apart from real
  tokens, as in packing); other dense masks have no place in a ring of chunks.
  """
  mesh = _mesh()
  if mask is not None:
    if segment_ids is not None or mask.shape[1:3] != (1, 1):
      raise ValueError(f'context parallelism takes a key-padding mask [batch, 1, 1, length] '
                       f'without segment ids, got mask {mask.shape} (write other masks as '
                       'mask_mod functions)')
    segment_ids = jnp.broadcast_to(mask[:, 0, 0, :], (query.shape[0], query.shape[1])
                                   ).astype(jnp.int32)
  axes = mesh.axis_names
  batch_axis = tuple(a for a in BATCH_AXES if a in axes and mesh.shape[a] > 1) or None
  head_axis = HEAD_AXIS if HEAD_AXIS in axes and mesh.shape[HEAD_AXIS] > 1 else None
  # The ring's own loops are traced inside its shard_map; under the step's mesh context they
  # would be traced in the outer (automatic) context while their values are per-device, which
  # JAX refuses: the shard_map gets its mesh explicitly and the context is left empty.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return ops.sequence_sharded_attention(
        query, key, value, mesh=mesh, axis_name=names.SEQUENCE_AXIS, batch_axis=batch_axis,
        head_axis=head_axis, layout=layout(causal), is_causal=causal,
        local_window=local_window, segment_ids=segment_ids, mask_mod=mask_mod,
        score_mod=score_mod, sinks=sinks, scale=scale, implementation=implementation)


def supported(config: Any, *, dropout: bool) -> str | None:
  """Why an attention layer of `config` cannot run context-parallel (None: it can)."""
  if config.kind != 'softmax':
    return f'attention kind={config.kind!r} (ring attention merges softmax parts)'
  if config.aggregation != 'forward':
    return "aggregation='backward'"
  if dropout:
    return 'attention dropout (set attention.dropout_rate=0)'
  if getattr(config, 'talking_heads', False):
    return 'talking_heads (its post-softmax mix needs whole rows of weights)'
  if getattr(config, 'num_memory_kv', 0):
    return 'num_memory_kv (the memory slots are not on the sequence axis)'
  return None

