"""Attention heatmaps: the captured attention weights of a few eval examples, drawn at the end.

    AttentionMapEvaluator(config, task, bundle, workdir)(state, step) -> {}

At the final step it plots every captured attention map (each layer of each attention module
the model sows, `attn_jax.models.names`) of the first `config.eval.attention_examples` real
rows of the first eval split into `workdir/attention/step_<N>/`, with
`attn_jax.experiment.plots.plot_attention`. The task labels the axes (`Task.attention_axes`).
It writes no metrics. `attention_panels` gives the same maps of one example, labelled, for
figures.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from attn_jax.experiment import plots
from attn_jax.experiment.evaluators.base import Evaluator, eval_splits
from attn_jax.models import names

ATTENTION_DIR = 'attention'  # Under the workdir.


def attention_maps(intermediates: Any) -> list[tuple[str, int, np.ndarray]]:
  """Sown attention weights -> `[(module, layer, weights [b, heads, q, kv])]`.

  Handles unrolled layers (`layer_<i>` in the path), scanned layers (leading `[layers]` axis)
  and the RNN's `rnn_attention` `[b, q, kv]` (given one head).
  """
  maps = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    kind = next((k for k in keys if k in names.ATTENTION_MODULES), None)
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
  keep = np.flatnonzero(np.asarray(task.real_rows(batch)))[:num_examples]
  if not len(keep):
    return []
  small = {k: np.asarray(v)[keep] for k, v in batch.items()}
  _, inter = task.apply(params, small, capture=True)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for kind, layer, w in attention_maps(inter):
    for i in range(len(keep)):
      q_tok, k_tok = task.attention_axes(kind, {k: v[i] for k, v in small.items()}, tokenizers)
      weights = w[i][:, :len(q_tok), :len(k_tok)]
      path = directory / f'example{i}_{kind}_layer{layer}.png'
      plot_fn(weights, query_tokens=q_tok, key_tokens=k_tok,
              title=f'{kind} layer {layer}, example {i}', path=str(path))
      paths.append(str(path))
  return paths


class AttentionMapEvaluator(Evaluator):
  """At the final step, plots attention of `config.eval.attention_examples` eval rows."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.attention_examples)

  def __init__(self, config, task, bundle, workdir):
    super().__init__(config, task, bundle, workdir)
    self.split = eval_splits(config, bundle)[0]

  def __call__(self, state, step) -> dict[str, float]:
    if step != self.config.train.num_steps or jax.process_index() != 0:
      return {}
    batch = next(iter(self.bundle.eval[self.split]))
    directory = os.path.join(self.workdir, ATTENTION_DIR, f'step_{step}')
    paths = attention_plots(self.task, state.params, batch, self.bundle.tokenizers, directory,
                            num_examples=self.config.eval.attention_examples)
    logging.info('wrote %d attention heatmaps under %s', len(paths), directory)
    return {}


def attention_panels(task, params, inputs: Sequence[int], targets: Sequence[int], tokenizers
                     ) -> list[dict[str, Any]]:
  """Teacher-forced attention weights of one seq2seq example, cut to its real tokens and
  labelled.

  Args:
    inputs, targets: token ids of the example, each ending in EOS (see `until_eos`).
    tokenizers: {'inputs': ..., 'targets': ...} for the axis labels (`task.attention_axes`).

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
  example = {k: v[0] for k, v in batch.items()}
  panels = []
  order = {k: i for i, k in enumerate(names.ATTENTION_MODULES)}
  maps = sorted(attention_maps(inter), key=lambda m: (order[m[0]], m[1]))
  for kind, layer, w in maps:
    q_tok, k_tok = task.attention_axes(kind, example, tokenizers)
    panels.append({'kind': kind, 'layer': layer, 'weights': w[0][:, :len(q_tok), :len(k_tok)],
                   'query_tokens': q_tok, 'key_tokens': k_tok})
  return panels
