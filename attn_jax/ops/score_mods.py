"""Ready-made score functions `score_mod(score, b, h, q_idx, kv_idx) -> score`, applied to the
scaled logit `q.k * scale` before masking and softmax.

    alibi(slopes)                       ALiBi, `score - slope[h] * |q - kv|` (Press et al. 2022)
    t5_bias(table, ...)                 T5 relative position buckets from a learned table
    soft_cap(cap)                       `cap * tanh(score / cap)` (Gemma 2)
    chain(*mods)                        apply several in order

Arrays a function closes over (ALiBi's slopes, T5's table) are hoisted by the attention op;
floating-point ones receive gradients, so a learned table trains through either path.
"""

from __future__ import annotations

import jax.numpy as jnp

from attn_jax.ops.mods import ScoreMod
from attn_jax.ops.positional import relative_position_buckets


def alibi(slopes) -> ScoreMod:
  """ALiBi: `score - slopes[h] * |q_idx - kv_idx|`; the same numbers as `bias_fn=alibi_bias`.

  Args:
    slopes: float `[heads]` (`ops.alibi_slopes(heads)`).
  """
  slopes = jnp.asarray(slopes, jnp.float32)
  if slopes.ndim != 1:
    raise ValueError(f'alibi: slopes must be [heads], got {slopes.shape}')

  def alibi_score(score, b, h, q_idx, kv_idx):
    del b
    return score - slopes[h] * jnp.abs(q_idx - kv_idx).astype(jnp.float32)

  return alibi_score


def t5_bias(table, *, bidirectional: bool = True, max_distance: int = 128) -> ScoreMod:
  """T5 relative position bias (Raffel et al. 2020): `score + table[bucket(kv - q), h]`.

  Args:
    table: float `[num_buckets, heads]`, learned (its gradient flows through the op).
    bidirectional: separate buckets for keys ahead of the query (encoders).
    max_distance: distances beyond it share the last bucket.
  """
  table = jnp.asarray(table)
  if table.ndim != 2:
    raise ValueError(f't5_bias: table must be [num_buckets, heads], got {table.shape}')

  def t5_score(score, b, h, q_idx, kv_idx):
    del b
    bucket = relative_position_buckets(kv_idx - q_idx, bidirectional=bidirectional,
                                       num_buckets=table.shape[0], max_distance=max_distance)
    return score + table[bucket, h].astype(jnp.float32)

  return t5_score


def soft_cap(cap: float) -> ScoreMod:
  """Logit soft-capping `cap * tanh(score / cap)` (Gemma 2 uses 50 for attention): keeps
  logits in `(-cap, cap)` without a hard clip's zero gradient."""
  if cap <= 0:
    raise ValueError(f'soft_cap: cap={cap} must be positive')

  def capped(score, b, h, q_idx, kv_idx):
    del b, h, q_idx, kv_idx
    return cap * jnp.tanh(score / cap)

  return capped


def chain(*score_mods: ScoreMod | None) -> ScoreMod | None:
  """Applies the score functions left to right (None arguments are skipped), e.g.
  `chain(alibi(slopes), soft_cap(30.0))` caps the biased logit."""
  mods = [m for m in score_mods if m is not None]
  if not mods:
    return None
  if len(mods) == 1:
    return mods[0]

  def chained(score, b, h, q_idx, kv_idx):
    for mod in mods:
      score = mod(score, b, h, q_idx, kv_idx)
    return score

  return chained
