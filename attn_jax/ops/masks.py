"""Boolean attention masks: `True` means "may attend".

Every mask here broadcasts to `[batch, heads, q_len, kv_len]`. Query position `i`
(0-based within the query block) sits at absolute position `i + q_offset`, key `j`
at `j`; `q_offset` is what cached decoding needs (the cache index) and may be a
traced scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Window = int | tuple[int, int]


def normalize_window(window: Window | None) -> tuple[int, int] | None:
  """`w` -> `(w, w)`; `(left, right)` checked non-negative."""
  if window is None:
    return None
  if isinstance(window, int):
    window = (window, window)
  if len(window) != 2 or any(int(w) < 0 for w in window):
    raise ValueError(f'local window must be an int or (left, right) >= 0, got {window!r}')
  return int(window[0]), int(window[1])


def _positions(q_len: int, kv_len: int, q_offset) -> tuple[jax.Array, jax.Array]:
  q_pos = jnp.arange(q_len)[:, None] + q_offset
  kv_pos = jnp.arange(kv_len)[None, :]
  return q_pos, kv_pos


def causal_mask(q_len: int, kv_len: int | None = None, q_offset=0) -> jax.Array:
  """Key `j` visible to query `i` iff `j <= i + q_offset`.

  With `q_offset=0` and `q_len != kv_len` this is the top-left aligned mask of
  `jax.nn.dot_product_attention`; decoding with a cache passes the cache index
  (bottom-right alignment is `q_offset = kv_len - q_len`).

  Returns:
    bool `[1, 1, q_len, kv_len]`.
  """
  kv_len = q_len if kv_len is None else kv_len
  q_pos, kv_pos = _positions(q_len, kv_len, q_offset)
  return (kv_pos <= q_pos)[None, None]


def local_mask(q_len: int, kv_len: int, window: Window, q_offset=0) -> jax.Array:
  """Sliding window: key `j` visible to query `i` iff `i - left <= j <= i + right`.

  Args:
    window: `(left, right)` extents, inclusive, or an int for a symmetric window
      (as `local_window_size` in `jax.nn.dot_product_attention`). Combine with
      `causal_mask` (or pass `right=0`) for a causal sliding window.

  Returns:
    bool `[1, 1, q_len, kv_len]`.
  """
  left, right = normalize_window(window)
  q_pos, kv_pos = _positions(q_len, kv_len, q_offset)
  return ((kv_pos >= q_pos - left) & (kv_pos <= q_pos + right))[None, None]


def valid_positions(lengths: jax.Array | None = None, *, tokens: jax.Array | None = None,
                    length: int | None = None, pad_id: int = 0) -> jax.Array:
  """Which positions hold real tokens: bool `[batch, length]`.

  Args:
    lengths: int `[batch]` true lengths; needs `length` (the padded length).
    tokens: int `[batch, length]`; positions equal to `pad_id` are padding.
  """
  if (lengths is None) == (tokens is None):
    raise ValueError('give exactly one of lengths or tokens')
  if tokens is not None:
    if tokens.ndim != 2:
      raise ValueError(f'tokens must be [batch, length], got shape {tokens.shape}')
    return tokens != pad_id
  lengths = jnp.asarray(lengths)
  if lengths.ndim != 1:
    raise ValueError(f'lengths must be [batch], got shape {lengths.shape}')
  if length is None:
    raise ValueError('padding from lengths needs the padded length (length=...)')
  return jnp.arange(length)[None, :] < lengths[:, None]


def padding_mask(lengths: jax.Array | None = None, *, tokens: jax.Array | None = None,
                 length: int | None = None, pad_id: int = 0) -> jax.Array:
  """Key-padding mask: no query attends to a padded key.

  Returns:
    bool `[batch, 1, 1, kv_len]`. Pair with `query_key_mask` when padded queries
    must also be masked (their rows then come out as zeros).
  """
  return valid_positions(lengths, tokens=tokens, length=length, pad_id=pad_id)[:, None, None, :]


def query_key_mask(q_valid: jax.Array, kv_valid: jax.Array) -> jax.Array:
  """Pairwise mask from per-position validity: bool `[batch, 1, q_len, kv_len]`."""
  if q_valid.ndim != 2 or kv_valid.ndim != 2 or q_valid.shape[0] != kv_valid.shape[0]:
    raise ValueError(
        f'query_key_mask: expected [batch, q_len] and [batch, kv_len], got {q_valid.shape} '
        f'and {kv_valid.shape}')
  return (q_valid[:, :, None] & kv_valid[:, None, :])[:, None]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Packed sequences: attend only within the same segment id.

  Args:
    q_segment_ids: int `[batch, q_len]`.
    kv_segment_ids: int `[batch, kv_len]`; defaults to `q_segment_ids`.

  Returns:
    bool `[batch, 1, q_len, kv_len]`.
  """
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  if (q_segment_ids.ndim != 2 or kv_segment_ids.ndim != 2
      or q_segment_ids.shape[0] != kv_segment_ids.shape[0]):
    raise ValueError(
        f'segment ids must be [batch, q_len] and [batch, kv_len], got {q_segment_ids.shape} '
        f'and {kv_segment_ids.shape}')
  return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None (broadcasting); None if all are."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  for m in masks:
    if m.ndim != 4:
      raise ValueError(f'masks must be 4-D [batch, heads, q_len, kv_len], got shape {m.shape}')
  out = masks[0].astype(bool)
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def mask_to_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Additive bias: 0 where attending, half the dtype's most negative value elsewhere.

  Finite (not -inf), and half the minimum so that two such biases added together
  still do not overflow, so `bias + logits` stays NaN-free; a row masked entirely
  through a bias gets uniform weights, so prefer passing `mask=` to the attention
  op, which returns zeros for such rows.
  """
  return jnp.where(mask, jnp.zeros((), dtype), jnp.asarray(jnp.finfo(dtype).min / 2, dtype))
