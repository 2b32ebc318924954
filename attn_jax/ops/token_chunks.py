"""Per-token work on the real tokens only: padding is sorted to the end and skipped by chunk.

A padded batch `[batch, length]` with lengths drawn from 16-64 is a third padding, and every
per-token matmul (feed-forward, output logits) spends that third on rows nobody reads. With
static shapes the rows cannot be dropped, but they can be moved: a stable sort puts the real
tokens first, the sorted rows are cut into chunks, and each chunk runs under `lax.cond`, so a
chunk of padding only costs its branch test. Forward and backward both skip (the transpose of
a `cond` is a `cond`). The result is exact: a row's output depends only on that row, and
skipped rows come back as zeros.

Measured on 2 cores (AMD EPYC, float32, 2048 tokens, 1,321 real): a 256 -> 1024 -> 256
feed-forward's forward+backward 121 -> 96 ms and tied logits + cross-entropy over 8,000 words
610 -> 448 ms, both at 512-token chunks; with no padding the chunked path costs 1-4% more.
Chunks of 256 skip finer but cost 15% more without padding.

    y = ops.map_valid_chunks(
        lambda active, xc: jax.lax.cond(active, f, lambda xc: jnp.zeros_like(xc), xc),
        x, valid, chunk=512)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def valid_first_order(valid: jax.Array) -> jax.Array:
  """int32 `[n]`: a permutation listing the True positions of bool `[n]` first, each group in
  its original order."""
  if valid.ndim != 1:
    raise ValueError(f'valid must be [n], got shape {valid.shape}')
  return jnp.argsort(~valid, stable=True).astype(jnp.int32)


def map_valid_chunks(run_chunk: Callable[[jax.Array, Any], Any], rows: Any, valid: jax.Array,
                     *, chunk: int) -> Any:
  """Applies a row-wise function to the real rows only, one chunk of rows at a time.

  Args:
    run_chunk: `(active, rows_chunk) -> outputs_chunk`; `active` is a bool scalar, False when
      the chunk holds no real row (the caller's `cond` then skips the work and returns zeros);
      `rows_chunk` is `rows` with `c <= chunk` rows, real ones first; every output leaf has
      `c` leading rows, row i computed from row i of the input alone.
    rows: a pytree of arrays `[n, ...]` (e.g. tokens `[n, d_model]`, targets `[n]`).
    valid: bool `[n]`, True for the rows whose outputs are used.
    chunk: rows per `run_chunk` call, > 0.

  Returns:
    `run_chunk`'s outputs for all `n` rows, in the input order; rows of skipped chunks hold
    what `run_chunk` returned for them (zeros, by convention).
  """
  if chunk <= 0:
    raise ValueError(f'chunk must be positive, got {chunk}')
  leaves = jax.tree.leaves(rows)
  n = valid.shape[0] if valid.ndim == 1 else None
  if n is None or any(leaf.shape[:1] != (n,) for leaf in leaves):
    raise ValueError(f'valid must be [n] and every rows leaf [n, ...], got valid '
                     f'{valid.shape} and rows {[leaf.shape for leaf in leaves]}')
  order = valid_first_order(valid)
  sorted_rows = jax.tree.map(lambda a: a[order], rows)
  sorted_valid = valid[order]
  outputs = []
  for start in range(0, n, chunk):
    part = slice(start, min(start + chunk, n))
    # Real rows come first, so a chunk is active iff its first row is real.
    outputs.append(run_chunk(sorted_valid[start],
                             jax.tree.map(lambda a, part=part: a[part], sorted_rows)))
  merged = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *outputs)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype),
                                                  unique_indices=True)
  return jax.tree.map(lambda a: a[inverse], merged)
