"""Context extension: language models trained on short rows, scored on rows up to 8x longer.

    rows = evaluate_run('runs/context/rope_seed0', lengths=(64, 128, 256, 512))
    write_outputs({'rope_seed0': ('rope', 0, rows), ...}, 'experiments/figures')

`evaluate_run` reloads a finished run and scores its validation text cut into rows of each
length (every position of a row predicts the next character from the row's earlier ones), as
bits per character. A RoPE run is scored again under every frequency scaling of `ops.rope`
with factor `length / training length` (applied at evaluation only: the parameters are the
trained ones). Scores are cached in the run's workdir (`context_eval.json`, keyed by checkpoint
step), so running the study again only redraws. `write_outputs` aggregates the seeds of each
method with a 95% t-interval (`stats.t_interval`) into `context_extension.{json,md,png}`.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from attn_jax import data as data_lib
from attn_jax.experiment import inference, plots, provenance, stats, tasks

EVAL_FILE = 'context_eval.json'
OUTPUT_STEM = 'context_extension'
SCALINGS = ('none', 'linear', 'ntk', 'yarn', 'llama3')
TOKENS_PER_BATCH = 4096  # eval rows per batch: this many characters over the row length
METHOD_LABELS = {
    ('rope', 'none'): 'RoPE', ('rope', 'linear'): 'RoPE + position interpolation',
    ('rope', 'ntk'): 'RoPE + NTK-aware', ('rope', 'yarn'): 'RoPE + YaRN',
    ('rope', 'llama3'): 'RoPE + Llama 3.1', ('alibi', 'none'): 'ALiBi',
    ('nope', 'none'): 'NoPE',
}


def eval_config(config: ml_collections.ConfigDict, length: int, scaling: str
                ) -> ml_collections.ConfigDict:
  """`config` scoring the whole validation split in rows of `length`, with RoPE scaled by
  `length / training length` (`scaling` 'none': as trained)."""
  c = ml_collections.ConfigDict(config.to_dict())
  train_length = int(config.data.max_length)
  c.data.max_length = length
  c.data.eval_batch_size = max(1, TOKENS_PER_BATCH // length)
  c.data.eval_max_examples = 0
  c.data.eval_splits = 'validation'
  if scaling != 'none':
    if config.model.positional != 'rope':
      raise ValueError(f'scaling={scaling!r} applies to RoPE, not positional='
                       f'{config.model.positional!r}')
    attention = c.model.attention
    attention.rope_scaling = scaling
    attention.rope_scaling_factor = length / train_length
    attention.rope_original_length = train_length
  return c


def _bits_per_char(task, params, batches) -> tuple[float, int]:
  """Mean next-character loss in bits over every real token of `batches`, and the count."""
  loss_fn = jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.key(0), False)[1]['loss'])
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, n = loss_fn(params, batch)
    total, count = total + float(loss_sum), count + float(n)
  if not count:
    raise ValueError('the validation split gave no tokens to score')
  return total / count / math.log(2), int(count)


def _methods(positional: str) -> tuple[str, ...]:
  return SCALINGS if positional == 'rope' else ('none',)


def evaluate_run(workdir: str | pathlib.Path, lengths: Sequence[int], *,
                 data_dir: str | None = None) -> list[dict[str, Any]]:
  """`[{'length', 'scaling', 'bits_per_char', 'tokens'}]` of a finished run, every length
  and (RoPE) scaling; cached in `workdir/context_eval.json` by checkpoint step."""
  workdir = pathlib.Path(workdir)
  run = inference.load_run(workdir)
  positional = 'nope' if run.config.model.positional == 'none' else run.config.model.positional
  cache_path = workdir / EVAL_FILE
  cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
  if cache.get('step') != run.step:
    cache = {'step': run.step, 'rows': {}}
  train_length = int(run.config.data.max_length)
  for length in lengths:
    for scaling in _methods(positional):
      key = f'{length}/{scaling}'
      if key in cache['rows'] or (scaling != 'none' and length <= train_length):
        continue  # factor 1: every scaling is plain RoPE
      config = eval_config(run.config, length, scaling)
      bundle = data_lib.make_datasets(config.data, data_dir=data_dir or config.data_dir or None)
      task = tasks.make_task(config, bundle.meta)
      bpc, tokens = _bits_per_char(task, run.params, bundle.eval['validation'])
      cache['rows'][key] = {'length': length, 'scaling': scaling, 'bits_per_char': bpc,
                            'tokens': tokens}
      logging.info('%s: length %d, %s: %.4f bits/char over %d tokens', workdir.name, length,
                   scaling, bpc, tokens)
      cache_path.write_text(json.dumps(cache, indent=1))
  return [r for r in cache['rows'].values() if r['length'] in lengths]


def summarize(runs: Mapping[str, tuple[str, int, Sequence[Mapping[str, Any]]]]
              ) -> list[dict[str, Any]]:
  """Per (method, length) over seeds: mean bits/char with its 95% t-interval.

  Args:
    runs: `{run name: (positional, seed, evaluate_run rows)}`.
  """
  cells: dict[tuple[str, str, int], list[float]] = {}
  for positional, _, rows in runs.values():
    for r in rows:
      cells.setdefault((positional, r['scaling'], r['length']), []).append(r['bits_per_char'])
  order = {key: i for i, key in enumerate(METHOD_LABELS)}  # the table's and figure's order
  out = []
  for (positional, scaling, length), values in sorted(
      cells.items(), key=lambda item: (order[item[0][:2]], item[0][2])):
    mean, half = stats.t_interval(values)
    out.append({'method': METHOD_LABELS[(positional, scaling)], 'positional': positional,
                'scaling': scaling, 'length': length, 'bits_per_char': mean,
                'ci95': half, 'seeds': len(values)})
  return out


def _table(summary: Sequence[Mapping[str, Any]], lengths: Sequence[int]) -> str:
  methods = list(dict.fromkeys(s['method'] for s in summary))
  by = {(s['method'], s['length']): s for s in summary}
  lines = ['| method | ' + ' | '.join(f'{n} chars' for n in lengths) + ' |',
           '|---|' + '---|' * len(lengths)]
  for method in methods:
    cells = []
    for n in lengths:
      s = by.get((method, n))
      if s is None:  # a scaling at the training length is the plain model
        positional = next(x['positional'] for x in summary if x['method'] == method)
        s = by.get((METHOD_LABELS[(positional, 'none')], n))
      cells.append('-' if s is None else f"{s['bits_per_char']:.3f} ± {s['ci95']:.3f}")
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_outputs(runs: Mapping[str, tuple[str, int, Sequence[Mapping[str, Any]]]],
                  out_dir: str | pathlib.Path, *, lengths: Sequence[int], train_length: int,
                  settings: Mapping[str, Any]) -> dict[str, pathlib.Path]:
  """`context_extension.json` (every run's rows, the summary, provenance), `.md` (the table)
  and `.png` (bits/char against length, one line per method, 95% bands)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summary = summarize(runs)
  record = {'provenance': provenance.collect(), 'settings': dict(settings),
            'train_length': train_length, 'lengths': list(lengths),
            'runs': [{'name': name, 'positional': p, 'seed': seed, 'rows': list(rows)}
                     for name, (p, seed, rows) in sorted(runs.items())],
            'summary': summary}
  paths = {'json': out_dir / f'{OUTPUT_STEM}.json', 'md': out_dir / f'{OUTPUT_STEM}.md',
           'png': out_dir / f'{OUTPUT_STEM}.png'}
  paths['json'].write_text(json.dumps(record, indent=1))
  paths['md'].write_text(
      f'Bits per character on held-out text (mean ± 95% t-interval over seeds), trained on '
      f'{train_length}-character rows:\n\n{_table(summary, lengths)}\n')
  _figure(summary, train_length, paths['png'])
  return paths


def _figure(summary: Sequence[Mapping[str, Any]], train_length: int, path: pathlib.Path):
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.2))
  ax = fig.add_subplot()
  plain = {s['length']: s for s in summary if s['method'] == 'RoPE'}
  for method in dict.fromkeys(s['method'] for s in summary):
    points = sorted((s['length'], s) for s in summary if s['method'] == method)
    if method.startswith('RoPE + ') and train_length in plain:
      points = [(train_length, plain[train_length])] + points
    xs = np.array([n for n, _ in points])
    ys = np.array([s['bits_per_char'] for _, s in points])
    err = np.nan_to_num(np.array([s['ci95'] for _, s in points]))
    (line,) = ax.plot(xs, ys, marker='o', label=method)
    ax.fill_between(xs, ys - err, ys + err, color=line.get_color(), alpha=0.15)
  ax.axvline(train_length, color='grey', linestyle=':', label='training length')
  ax.set(xscale='log', xlabel='evaluation row length (characters)', ylabel='bits per character',
         title='Context extension of a character LM (mean, 95% band over seeds)')
  ax.set_xticks(sorted({s['length'] for s in summary}),
                [str(n) for n in sorted({s['length'] for s in summary})])
  ax.minorticks_off()  # a log axis otherwise labels its minor ticks as 6x10^1, 2x10^2, ...
  ax.legend(fontsize=7)
  plots.save_figure(fig, path)
