"""Eval hooks beyond the loss: decoding metrics, BLEU, LM samples, attention heatmaps.

    hooks = make_eval_hooks(config, task, bundle, workdir)
    train_loop(..., eval_hooks=hooks)      # each hook: (state, step) -> {name: float}

- seq2seq: decodes `config.eval.decode_splits` (greedy, sampling or beam) and reports the
  exact-sequence accuracy (overall and per target-length quarter, so length generalization
  shows) and, with `config.eval.bleu`, corpus BLEU of the detokenized text with sacrebleu.
- lm: samples continuations of validation prompts into `workdir/samples/step_<N>.txt`.
- all: at the final step, attention-weight heatmaps of a few validation examples into
  `workdir/attention/` with `attn_jax.experiment.plots.plot_attention`.

Decoding runs on this process's eval shard. With several processes the hooks are disabled
(a warning says so): the loss-based eval metrics still aggregate exactly across hosts.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax import models
from attn_jax.experiment import plots
from attn_jax.models import names
from attn_jax.models.decoding import METHODS as DECODE_METHODS
from attn_jax.models.decoding import max_lengths_for
from attn_jax.tokens import EOS_ID, PAD_ID, SPECIAL_TOKENS

EvalHook = Callable[[Any, int], Mapping[str, float]]
ATTENTION_KINDS = names.ATTENTION_MODULES


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


def _real_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """bool [b]: rows that are examples, not the all-pad rows padding eval batches."""
  return np.any(np.asarray(batch['inputs']) != PAD_ID, axis=-1)


def _splits(config, bundle) -> list[str]:
  names = [s.strip() for s in config.eval.decode_splits.split(',') if s.strip()]
  names = names or list(bundle.eval)
  unknown = sorted(set(names) - set(bundle.eval))
  if unknown:
    raise ValueError(f'config.eval.decode_splits names {unknown}; eval splits are '
                     f'{sorted(bundle.eval)}')
  return names


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
  """Decodes every real row of `batches`: (inputs, predictions, targets) as id lists, in the
  order of `batches`.

  The rows are decoded sorted by input length, in batches of the first batch's size (the
  last one filled up with padding rows), each padded to `padded_width` of its longest
  input: less padding to attend over, and a batch of short inputs stops early.
  """
  inputs, srcs, tgts, batch_size = [], [], [], 0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch_size = batch_size or len(batch['inputs'])
    for j in np.flatnonzero(_real_rows(batch)):
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


def seq2seq_hook(config, task, bundle) -> EvalHook:
  """Exact-sequence accuracy (and BLEU) of decoded eval splits."""
  splits = _splits(config, bundle)
  max_len = int(bundle.meta['max_target_length'] or bundle.meta['max_length'])
  detok = bundle.tokenizers['targets']

  def hook(state, step):
    del step
    out = {}
    for split in splits:
      _, preds, tgts = decode_split(task, state.params, bundle.eval[split], config.eval,
                                    max_len, config.eval.max_decode_batches)
      if config.eval.exact_match:
        out.update(exact_match_by_length(preds, tgts, f'{split}/', max_len))
      if config.eval.bleu:
        out[f'{split}/bleu'] = bleu([detok.decode(p) for p in preds],
                                    [detok.decode(t) for t in tgts])
    return out

  return hook


def lm_samples_hook(config, task, bundle, workdir) -> EvalHook:
  """Writes sampled continuations of validation prompts to `workdir/samples/step_<N>.txt`."""
  split = _splits(config, bundle)[0]
  e = config.eval
  detok = bundle.tokenizers['inputs']
  out_dir = pathlib.Path(workdir) / 'samples'

  def hook(state, step):
    batch = next(iter(bundle.eval[split]))
    prompt = np.asarray(batch['inputs'])[:e.num_samples, :e.prompt_length]
    if 'inputs_segmentation' in batch:  # keep only the first document of each row
      seg = np.asarray(batch['inputs_segmentation'])[:e.num_samples, :e.prompt_length]
      prompt = np.where(seg == seg[:, :1], prompt, 0)
    prompt = np.where(np.cumsum(prompt == EOS_ID, axis=1) > 0, 0, prompt)
    out = generate(task, state.params, e, prompt=prompt, max_decode_len=e.sample_length,
                   rng=jax.random.fold_in(jax.random.key(config.train.seed), step))
    lines = [f'{detok.decode(p)!r} -> {detok.decode(o)!r}' for p, o in zip(prompt, out,
                                                                           strict=True)]
    if jax.process_index() == 0:
      out_dir.mkdir(parents=True, exist_ok=True)
      (out_dir / f'step_{step}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
      for line in lines:
        logging.info('sample @%d: %s', step, line)
    return {f'{split}/sample_length': float(np.mean([len(until_eos(r)) for r in out]))}

  return hook


def token_strings(tokenizer, ids: Iterable[int]) -> list[str]:
  """One display string per id (special ids by name), for heatmap axes."""
  return [(SPECIAL_TOKENS[int(i)] if 0 <= int(i) < len(SPECIAL_TOKENS) else None)
          or tokenizer.decode([int(i)]) or f'#{int(i)}' for i in ids]


def attention_maps(intermediates: Any) -> list[tuple[str, int, np.ndarray]]:
  """Sown attention weights -> `[(kind, layer, weights [b, heads, q, kv])]`.

  Handles unrolled layers (`layer_<i>` in the path), scanned layers (leading `[layers]` axis)
  and the RNN's `rnn_attention` `[b, q, kv]` (given one head).
  """
  maps = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    kind = next((k for k in keys if k in ATTENTION_KINDS), None)
    if kind is None:
      continue
    w = np.asarray(leaf, np.float32)
    if kind == names.RNN_ATTENTION:
      maps.append((kind, 0, w[:, None]))
      continue
    layer = next((i for i in map(names.layer_index, keys) if i is not None), None)
    if layer is None and w.ndim == 5:  # nn.scan: [layers, b, heads, q, kv]
      maps.extend((kind, i, w[i]) for i in range(w.shape[0]))
    else:
      maps.append((kind, layer or 0, w))
  return maps


def attention_plots(task, params, batch, tokenizers, directory, *, num_examples: int,
                    plot_fn=None) -> list[str]:
  """Heatmaps of every captured attention for the first real rows of `batch`; PNG paths."""
  if plot_fn is None:
    plot_fn = plots.plot_attention
  keep = np.flatnonzero(_real_rows(batch))[:num_examples]
  if not len(keep):
    return []
  small = {k: np.asarray(v)[keep] for k, v in batch.items()}
  _, inter = task.apply(params, small, capture=True)
  src = [until_eos(r) for r in small['inputs']]
  tgt = [until_eos(r) for r in small['targets']] if 'targets' in small else src
  cls = task.kind == 'encoder_classifier' and task.model_config.pooling == 'cls'
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for kind, layer, w in attention_maps(inter):
    for i in range(len(keep)):
      if kind == 'encoder_self':
        q_tok = k_tok = (['<cls>'] if cls else []) + token_strings(tokenizers['inputs'], src[i])
      elif kind == 'cross' or kind == 'rnn_attention':
        q_tok = token_strings(tokenizers['targets'], tgt[i])
        k_tok = token_strings(tokenizers['inputs'], src[i])
      else:  # decoder_self: query i predicts target i and attends to the shifted inputs.
        q_tok = token_strings(tokenizers['targets'], tgt[i])
        k_tok = ['<s>'] + q_tok[:-1]
      weights = w[i][:, :len(q_tok), :len(k_tok)]
      path = directory / f'example{i}_{kind}_layer{layer}.png'
      plot_fn(weights, query_tokens=q_tok, key_tokens=k_tok,
              title=f'{kind} layer {layer}, example {i}', path=str(path))
      paths.append(str(path))
  return paths


def attention_hook(config, task, bundle, workdir) -> EvalHook:
  """At the final step, plots attention of `config.eval.attention_examples` eval rows."""
  split = _splits(config, bundle)[0]

  def hook(state, step):
    if step != config.train.num_steps or jax.process_index() != 0:
      return {}
    batch = next(iter(bundle.eval[split]))
    paths = attention_plots(task, state.params, batch, bundle.tokenizers,
                            os.path.join(workdir, 'attention', f'step_{step}'),
                            num_examples=config.eval.attention_examples)
    logging.info('wrote %d attention heatmaps under %s/attention', len(paths), workdir)
    return {}

  return hook


def make_eval_hooks(config, task, bundle, workdir) -> list[EvalHook]:
  """The hooks `config.eval` (validated by `validate_config`) asks for, for this task."""
  if jax.process_count() > 1:
    logging.warning('decoding/sampling/attention eval hooks are disabled with %d processes '
                    '(they would score one shard); loss and accuracy are still exact',
                    jax.process_count())
    return []
  hooks = []
  if task.task == 'seq2seq' and (config.eval.exact_match or config.eval.bleu):
    hooks.append(seq2seq_hook(config, task, bundle))
  if task.task == 'lm' and config.eval.num_samples:
    hooks.append(lm_samples_hook(config, task, bundle, workdir))
  if config.eval.attention_examples:
    hooks.append(attention_hook(config, task, bundle, workdir))
  return hooks


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


# --- Attention of one example, labelled (for figures) -----------------------------------------


def attention_panels(task, params, inputs: Sequence[int], targets: Sequence[int], tokenizers
                     ) -> list[dict[str, Any]]:
  """Teacher-forced attention weights of one example, cut to its real tokens and labelled.

  Args:
    inputs, targets: token ids of the example, each ending in EOS (see `until_eos`).
    tokenizers: {'inputs': ..., 'targets': ...} for the axis labels.

  Returns:
    One dict per captured map, encoder self, decoder self, then cross (each by layer):
    `{'kind', 'layer', 'weights': float32
    [heads, q_len, kv_len], 'query_tokens', 'key_tokens'}` (RNN additive attention: one head,
    target tokens over source tokens).
  """
  src, tgt = list(map(int, inputs)), list(map(int, targets))
  width = max(len(src), len(tgt))
  batch = {'inputs': np.zeros((1, width), np.int32), 'targets': np.zeros((1, width), np.int32)}
  batch['inputs'][0, :len(src)] = src
  batch['targets'][0, :len(tgt)] = tgt
  _, inter = task.apply(params, batch, capture=True)
  src_tok = token_strings(tokenizers['inputs'], src)
  tgt_tok = token_strings(tokenizers['targets'], tgt)
  panels = []
  order = {k: i for i, k in enumerate(ATTENTION_KINDS)}
  maps = sorted(attention_maps(inter), key=lambda m: (order[m[0]], m[1]))
  for kind, layer, w in maps:
    if kind == 'encoder_self':
      q_tok, k_tok = src_tok, src_tok
    elif kind == 'decoder_self':  # query i predicts target i from BOS + targets[:i].
      q_tok, k_tok = tgt_tok, ['<s>'] + tgt_tok[:-1]
    else:  # cross, rnn_attention
      q_tok, k_tok = tgt_tok, src_tok
    panels.append({'kind': kind, 'layer': layer, 'weights': w[0][:, :len(q_tok), :len(k_tok)],
                   'query_tokens': q_tok, 'key_tokens': k_tok})
  return panels
