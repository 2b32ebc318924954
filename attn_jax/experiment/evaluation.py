"""Evaluation beyond the loss: the `config.eval` rules, accuracy by sequence length (the length
study), and the helpers of the evaluators, re-exported here where earlier code finds them.

The evaluators themselves are classes in `attn_jax.experiment.evaluators` (one module each:
`decoding`, `lm_samples`, `attention_maps`), listed by each task (`Task.evaluators`) and built
for a run by `evaluators.make_evaluators(config, task, bundle, workdir)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from attn_jax.experiment.batches import token_strings, until_eos
from attn_jax.experiment.evaluators.attention_maps import (
    attention_maps,
    attention_panels,
    attention_plots,
)
from attn_jax.experiment.evaluators.base import make_evaluators
from attn_jax.experiment.evaluators.decoding import (
    bleu,
    chrf,
    decode_split,
    exact_match_by_length,
    generate,
    pad_rows,
    padded_width,
)
from attn_jax.models.decoding import METHODS as DECODE_METHODS
from attn_jax.tokens import EOS_ID

__all__ = ['accuracy_by_length', 'attention_maps', 'attention_panels', 'attention_plots',
           'bleu', 'chrf', 'decode_split', 'evaluate_by_length', 'exact_match_by_length',
           'generate', 'make_evaluators', 'pad_rows', 'padded_width', 'summarize_length_range',
           'symbol_length', 'token_accuracy', 'token_strings', 'until_eos', 'validate_config']


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.eval` field that cannot work."""
  e = config.eval
  if e.decode_method not in DECODE_METHODS:
    raise ValueError(f'config.eval.decode_method={e.decode_method!r} is not one of '
                     f'{DECODE_METHODS}')
  for name in ('beam_size', 'sample_length'):
    if e[name] < 1:
      raise ValueError(f'config.eval.{name}={e[name]} must be >= 1')
  for name in ('top_k', 'max_decode_batches', 'num_samples', 'prompt_length',
               'attention_examples'):
    if e[name] < 0:
      raise ValueError(f'config.eval.{name}={e[name]} must be >= 0')
  if e.max_len_a < 0 or e.max_len_b < 0:
    raise ValueError(f'config.eval: max_len_a={e.max_len_a} and max_len_b={e.max_len_b} must '
                     'be >= 0')
  if e.temperature <= 0 or not 0 < e.top_p <= 1 or e.length_penalty < 0:
    raise ValueError(f'config.eval: temperature={e.temperature} must be > 0, top_p={e.top_p} '
                     f'in (0, 1], length_penalty={e.length_penalty} >= 0')



# --- Accuracy by sequence length (the length study) -------------------------------------------


def symbol_length(ids: Sequence[int]) -> int:
  """Tokens before the first EOS (the sequence's length in symbols)."""
  ids = [int(t) for t in ids]
  return ids.index(EOS_ID) if EOS_ID in ids else len(ids)


def token_accuracy(prediction: Sequence[int], target: Sequence[int]) -> float:
  """Fraction of the target's tokens (incl. EOS) matched at the same position of the decoded
  prediction; a prediction that is too short or too long scores the positions it misses."""
  if not len(target):
    raise ValueError('token_accuracy: empty target')
  hits = sum(int(p) == int(t) for p, t in zip(prediction, target, strict=False))
  return hits / len(target)


def accuracy_by_length(sources: Sequence[Sequence[int]], predictions: Sequence[Sequence[int]],
                       targets: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
  """Exact-sequence and token accuracy per source length, one row per length that occurs.

  Args:
    sources, predictions, targets: per example, token ids up to EOS (see `until_eos`); the
      decoded `predictions` are free-running (greedy), not teacher-forced.

  Returns:
    `[{'length': n, 'count': examples of n source symbols, 'sequence_accuracy': exact-match
    rate, 'token_accuracy': mean of `token_accuracy`}]`, sorted by length.
  """
  if not len(sources) == len(predictions) == len(targets):
    raise ValueError(f'{len(sources)} sources, {len(predictions)} predictions and '
                     f'{len(targets)} targets: expected one of each per example')
  by_length: dict[int, list[tuple[bool, float]]] = {}
  for s, p, t in zip(sources, predictions, targets, strict=True):
    score = (list(map(int, p)) == list(map(int, t)), token_accuracy(p, t))
    by_length.setdefault(symbol_length(s), []).append(score)
  rows = []
  for n in sorted(by_length):
    exact, tokens = zip(*by_length[n], strict=True)
    rows.append({'length': n, 'count': len(exact), 'sequence_accuracy': float(np.mean(exact)),
                 'token_accuracy': float(np.mean(tokens))})
  return rows


def summarize_length_range(rows: Sequence[Mapping[str, Any]], lo: int, hi: int
                           ) -> dict[str, float | int]:
  """Example-weighted accuracies over the rows with `lo <= length <= hi` (0 counts: zeros)."""
  sel = [r for r in rows if lo <= r['length'] <= hi]
  count = sum(r['count'] for r in sel)
  out: dict[str, float | int] = {'count': count}
  for key in ('sequence_accuracy', 'token_accuracy'):
    out[key] = sum(r[key] * r['count'] for r in sel) / count if count else 0.0
  return out


def evaluate_by_length(task, params, batches: Iterable[Mapping[str, np.ndarray]], eval_config,
                       max_decode_len: int) -> list[dict[str, Any]]:
  """Decodes every real row of `batches` with `config.eval`'s method; `accuracy_by_length`."""
  srcs, preds, tgts = decode_split(task, params, batches, eval_config, max_decode_len)
  return accuracy_by_length(srcs, preds, tgts)
