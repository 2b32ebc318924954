"""Decoding and its scores: exact-sequence accuracy by target length, BLEU and chrF.

    DecodingEvaluator(config, task, bundle, workdir)(state, step)
      -> {'<split>/sequence_accuracy': ..., '<split>/sequence_accuracy_len_<lo>_<hi>': ...,
          '<split>/bleu': ...}

It decodes `config.eval.decode_splits` (greedy, sampling or beam, as `config.eval` says) and
reports the exact-sequence accuracy (overall and per quarter of the target-length range, so
length generalization shows) and, with `config.eval.bleu`, corpus BLEU of the detokenized text
(sacrebleu). The helpers (`generate`, `decode_split`, `pad_rows`, ...) serve inference and the
length study too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import models
from attn_jax.experiment.batches import rows_with_tokens, until_eos
from attn_jax.experiment.evaluators.base import Evaluator, eval_splits
from attn_jax.models.decoding import max_lengths_for
from attn_jax.tokens import PAD_ID


def generate(task, params, eval_config, *, inputs=None, prompt=None, max_decode_len: int,
             rng=None) -> np.ndarray:
  """`models.generate` with the settings of `config.eval`; int32 `[batch, max_decode_len]`.

  With `inputs` (seq2seq), each row's output is capped by its source length
  (`eval.max_len_a`, `eval.max_len_b`)."""
  e = eval_config
  max_lengths = None
  if inputs is not None:
    max_lengths = max_lengths_for(
        np.sum(np.asarray(inputs) != PAD_ID, axis=-1), e.get('max_len_a', 0.0),
        e.get('max_len_b', 0), max_decode_len)
  return np.asarray(models.generate(
      task.model, params, inputs=None if inputs is None else jnp.asarray(inputs),
      prompt=None if prompt is None else jnp.asarray(prompt), max_decode_len=max_decode_len,
      method=e.decode_method, beam_size=e.beam_size, length_penalty=e.length_penalty,
      temperature=e.temperature, top_k=e.top_k or None,
      top_p=e.top_p if e.top_p < 1.0 else None,
      rng=rng if rng is not None else jax.random.key(0), max_lengths=max_lengths))


def exact_match_by_length(predictions: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                          prefix: str, max_length: int, num_bins: int = 4) -> dict[str, float]:
  """Exact-sequence accuracy overall and per quarter of the target-length range.

  Args:
    predictions, targets: per example, token ids up to EOS (see `until_eos`).
    prefix: metric name prefix, e.g. 'test/'.
    max_length: longest possible target (tokens incl. EOS); the bins split `[1, max_length]`
      the same way at every eval, so curves are comparable.

  Returns:
    `{prefix + 'sequence_accuracy': float, prefix + 'sequence_accuracy_len_<lo>_<hi>': ...}`.
  """
  correct = np.array([list(p) == list(t) for p, t in zip(predictions, targets, strict=True)])
  lengths = np.array([len(t) for t in targets])
  out = {prefix + 'sequence_accuracy': float(np.mean(correct)) if len(correct) else 0.0}
  if not len(correct):
    return out
  edges = np.unique(np.linspace(1, max_length + 1, num_bins + 1).astype(int))
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    sel = (lengths >= a) & (lengths < b)
    if sel.any():
      out[f'{prefix}sequence_accuracy_len_{a}_{b - 1}'] = float(np.mean(correct[sel]))
  return out


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus BLEU (sacrebleu, its default 13a tokenization) of detokenized text."""
  import sacrebleu

  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2) of detokenized text."""
  import sacrebleu

  return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def padded_width(length: int) -> int:
  """A batch width for `length` tokens from few distinct values (each one compiles the
  decoding loop once): multiples of 8 up to 64, then of 16 up to 128, of 32 up to 256, ...
  (at most 1/8 padding beyond 64)."""
  step = max(8, 1 << max(0, (max(length, 1) - 1).bit_length() - 3))
  return max(8, -(-length // step) * step)


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int | None = None) -> np.ndarray:
  """int32 `[num_rows or len(rows), padded_width(longest)]`, rows left-aligned, pad 0."""
  out = np.zeros((num_rows or len(rows), padded_width(max(len(r) for r in rows))), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def decode_split(task, params, batches: Iterable[Mapping[str, np.ndarray]], eval_config,
                 max_decode_len: int, max_batches: int = 0):
  """Decodes every real row of `batches` (a row with an input token; eval batches are
  padded with all-pad rows): (inputs, predictions, targets) as id lists, in their order.

  The rows are decoded sorted by input length, in batches of the first batch's size (the
  last one filled up with padding rows), each padded to `padded_width` of its longest
  input: less padding to attend over, and a batch of short inputs stops early.
  """
  inputs, srcs, tgts, batch_size = [], [], [], 0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch_size = batch_size or len(batch['inputs'])
    for j in np.flatnonzero(rows_with_tokens(batch['inputs'])):
      row = np.asarray(batch['inputs'][j])
      inputs.append(row[:np.flatnonzero(row != PAD_ID)[-1] + 1])  # without trailing padding
      srcs.append(until_eos(row))
      tgts.append(until_eos(batch['targets'][j]))
  order = sorted(range(len(inputs)), key=lambda r: len(inputs[r]))
  preds: list[list[int]] = [[] for _ in inputs]
  for start in range(0, len(order), batch_size or 1):
    picked = order[start:start + batch_size]
    out = generate(task, params, eval_config,
                   inputs=pad_rows([inputs[r] for r in picked], batch_size),
                   max_decode_len=max_decode_len)
    for r, row in zip(picked, out, strict=False):  # `out` also has the filler rows
      preds[r] = until_eos(row)
  return srcs, preds, tgts


class DecodingEvaluator(Evaluator):
  """Exact-sequence accuracy (and BLEU) of the decoded eval splits (seq2seq)."""

  metrics = {'sequence_accuracy': 'max', 'sequence_accuracy_len_*': 'max', 'bleu': 'max'}

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.exact_match or config.eval.bleu)

  def __init__(self, config, task, bundle, workdir):
    super().__init__(config, task, bundle, workdir)
    self.splits = eval_splits(config, bundle)
    self.max_len = int(bundle.meta['max_target_length'] or bundle.meta['max_length'])
    self.detok = bundle.tokenizers['targets']

  def __call__(self, state, step) -> dict[str, float]:
    del step
    e, out = self.config.eval, {}
    for split in self.splits:
      _, preds, tgts = decode_split(self.task, state.params, self.bundle.eval[split], e,
                                    self.max_len, e.max_decode_batches)
      if e.exact_match:
        out.update(exact_match_by_length(preds, tgts, f'{split}/', self.max_len))
      if e.bleu:
        out[f'{split}/bleu'] = bleu([self.detok.decode(p) for p in preds],
                                    [self.detok.decode(t) for t in tgts])
    return out
