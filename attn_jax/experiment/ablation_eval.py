"""The ablation's evaluation of a trained run: per-example scores on whole eval splits.

    scores = evaluate_run('runs/ablation/reverse_rope_lr1_seed0')
    scores['splits']['test']['tokens']      # one free-running token accuracy per example

The table's numbers come from here rather than from the in-training eval, so that every run is
scored the same way on the same examples, and the per-example values give each run's standard
error (and a bootstrap over examples: `attn_jax.experiment.stats`). Per task:

- seq2seq (reverse, sort): greedy decoding of every example (`evaluation.decode_split`);
  `exact` (0/1: the whole output right) and `tokens` (`evaluation.token_accuracy`: the share
  of the target's tokens right at their position in the free-running output).
- classification (ListOps): `accuracy` (0/1 per example).
- lm: `bpc` per row: the row's negative log-likelihood in bits over its real tokens, with the
  token counts as `weights`, so a split's bits per token is `sum(bpc * weights) /
  sum(weights)` (with the char tokenizer a token is a character, or a verse's end).

The scores are cached in the workdir (`EVAL_FILE`, keyed by the step of its DONE record), so
gathering again reads them.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attn_jax import data as data_lib
from attn_jax.experiment import evaluation, inference
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.tokens import PAD_ID

EVAL_FILE = 'ablation_eval.json'


def _eval_data_config(config) -> ml_collections.ConfigDict:
  """`config.data` reading whole eval splits."""
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.eval_max_examples = 0
  return cfg


def seq2seq_scores(run, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, list[float]]:
  """`exact` and free-running `tokens` per example of `batches` (greedy decoding)."""
  max_len = int(run.meta['max_target_length'] or run.meta['max_length'])
  eval_config = ml_collections.ConfigDict(dict(run.config.eval.to_dict(),
                                               decode_method='greedy'))
  _, preds, targets = evaluation.decode_split(run.task, run.params, batches, eval_config,
                                              max_len)
  return {'exact': [float(list(p) == list(t)) for p, t in zip(preds, targets, strict=True)],
          'tokens': [evaluation.token_accuracy(p, t) for p, t in zip(preds, targets,
                                                                    strict=True)]}


def classification_scores(run, batches) -> dict[str, list[float]]:
  """`accuracy` (0/1) per real example (a row with a token) of `batches`."""
  apply = jax.jit(lambda params, inputs: run.task.apply(params, {'inputs': inputs}))
  correct: list[float] = []
  for batch in batches:
    inputs = np.asarray(batch['inputs'])
    real = np.any(inputs != PAD_ID, axis=-1)
    pred = np.argmax(np.asarray(apply(run.params, jnp.asarray(inputs))), axis=-1)
    correct += [float(c) for c in (pred == np.asarray(batch['label']))[real]]
  return {'accuracy': correct}


def _row_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: summed NLL in nats of the real (non-pad) targets, and their count."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  real = targets != PAD_ID
  return jnp.sum(jnp.where(real, nll, 0.0), axis=-1), jnp.sum(real, axis=-1)


def lm_scores(run, batches) -> dict[str, list[float]]:
  """`bpc` (bits per token) and `weights` (tokens) per row with a real token."""
  @jax.jit
  def rows(params, batch):
    logits = run.task.apply(params, batch)
    return _row_nll(logits, batch['inputs'])

  bits, weights = [], []
  for batch in batches:
    fields = {k: jnp.asarray(v) for k, v in batch.items()}
    nll, count = (np.asarray(x) for x in rows(run.params, fields))
    for n, c in zip(nll, count, strict=True):
      if c:
        bits.append(float(n / c / math.log(2)))
        weights.append(float(c))
  return {'bpc': bits, 'weights': weights}


SCORERS = {'seq2seq': seq2seq_scores, 'classification': classification_scores, 'lm': lm_scores}


def summary(scores: Mapping[str, list[float]]) -> dict[str, float]:
  """Each score's mean over the split (`bpc` weighted by tokens) and `n`, the examples."""
  weights = np.asarray(scores['weights']) if 'weights' in scores else None
  out: dict[str, float] = {}
  for name, values in scores.items():
    if name == 'weights':
      continue
    out[name] = float(np.average(values, weights=weights if name == 'bpc' else None))
  out['n'] = len(next(iter(scores.values())))
  return out


def evaluate_run(workdir: str | pathlib.Path, splits: tuple[str, ...] = ('validation', 'test')
                 ) -> dict[str, Any]:
  """Scores the final checkpoint of the finished run in `workdir` on whole `splits`; cached
  in `EVAL_FILE` under the step of its DONE record (a cached score restores nothing).

  Returns:
    `{'step', 'task', 'splits': {split: {score: [per example]}}, 'summary': {split: {score:
    mean, 'n': examples}}}`.
  """
  workdir = pathlib.Path(workdir)
  done = workdir_lib.read_done(workdir)
  if done is None:
    raise ValueError(f'{workdir}: training has not finished there (no DONE record)')
  key = {'step': done['step'], 'splits': list(splits)}
  path = workdir / EVAL_FILE
  if path.exists():
    cached = json.loads(path.read_text(encoding='utf-8'))
    if cached.get('key') == key:
      return cached['result']
  run = inference.load_run(workdir)
  data_cfg = _eval_data_config(run.config)
  data_cfg.eval_splits = ','.join(splits)
  bundle = data_lib.make_datasets(data_cfg, data_dir=run.config.data_dir or None,
                                  seed=run.config.train.seed)
  scorer = SCORERS[run.task.task]
  result: dict[str, Any] = {'step': run.step, 'task': run.task.task, 'splits': {}}
  for split in splits:
    logging.info('%s: scoring the %s split', workdir, split)
    result['splits'][split] = scorer(run, bundle.eval[split])
  result['summary'] = {s: summary(v) for s, v in result['splits'].items()}
  path.write_text(json.dumps({'key': key, 'result': result}), encoding='utf-8')
  return result
