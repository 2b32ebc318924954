"""Rows of token batches, as the data contract lays them out (`attn_jax.data`): which rows are
examples, a row's ids up to EOS, and display strings of ids. Tasks and evaluators share them.

Eval batches are padded to a fixed number of rows with all-pad rows, and every row to a fixed
width with pad ids (0); a row's sequence ends with EOS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from attn_jax.tokens import EOS_ID, PAD_ID, SPECIAL_TOKENS


def rows_with_tokens(tokens: Any) -> Any:
  """bool `[b]`: rows of `tokens` `[b, L]` that hold a token (the others pad a batch).

  numpy in, numpy out (host code); a jax array or tracer in, a jax array out (a loss)."""
  xp = np if isinstance(tokens, np.ndarray) else jnp
  return xp.any(tokens != PAD_ID, axis=-1)


def until_eos(row: Iterable[int]) -> list[int]:
  """Token ids up to and including the first EOS (pad/ids after it dropped)."""
  out = []
  for t in row:
    t = int(t)
    if t == PAD_ID:
      continue
    out.append(t)
    if t == EOS_ID:
      break
  return out


def token_strings(tokenizer, ids: Iterable[int]) -> list[str]:
  """One display string per id (special ids by name), for heatmap axes."""
  return [(SPECIAL_TOKENS[int(i)] if 0 <= int(i) < len(SPECIAL_TOKENS) else None)
          or tokenizer.decode([int(i)]) or f'#{int(i)}' for i in ids]
