"""The length study: seq2seq models trained on lengths 1..L, scored at every length 1..2L.

    results = {m: run_model(get_config(f'model={m}'), f'runs/length_study/{m}') for m in models}
    write_outputs(results, 'runs/length_study', train_max=20)

`run_model` trains (through `run_lib.train_and_evaluate`, so an unfinished workdir resumes
and a finished one is not retrained), then decodes the whole test split greedily and scores
it per source length (`evaluation.accuracy_by_length`). The scores are cached in the workdir
(`length_eval.json`, keyed by checkpoint step and dataset), so running the study again only
redraws. `write_outputs` writes, for all models together:

    length_study.json   per model: per-length rows, in/out-of-range summary, seeds, timings
    length_study.md     summary table + per-length table (markdown)
    length_study.csv    model,length,count,sequence_accuracy,token_accuracy
    length_study.png    accuracy against length, one line per model, training lengths shaded
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pathlib
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from attn_jax import data as data_lib
from attn_jax.data import config as data_config
from attn_jax.experiment import evaluation, inference, plots, provenance
from attn_jax.experiment import run as run_lib
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.train import state as state_lib
from attn_jax.train.metrics import read_metrics

EVAL_FILE = 'length_eval.json'
TIMING_FILE = 'length_study_timing.json'
OUTPUT_STEM = 'length_study'


def _train_lengths(config) -> tuple[int, int]:
  return tuple(int(x) for x in config.data.algorithmic.train_length)


def _eval_data_config(config) -> ml_collections.ConfigDict:
  """`config.data` reading the whole test split (smoke configs cap eval examples)."""
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  cfg.eval_splits = 'test'
  cfg.eval_max_examples = 0
  return cfg


def _steps_per_second(workdir: pathlib.Path) -> float | None:
  """Median training speed over the run's logged intervals (robust to one slow interval)."""
  speeds = [r['train/steps_per_second'] for r in read_metrics(workdir)
            if r.get('train/steps_per_second') is not None]
  return float(statistics.median(speeds)) if speeds else None


def run_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains `config` in `workdir` unless finished, then scores its test split per length.

  Returns:
    `{'arg', 'step', 'seeds', 'num_params', 'train_length', 'test_length', 'rows',
    'in_range', 'out_of_range', 'train_wall_s', 'steps_per_second', 'eval_wall_s'}`; rows as
    `evaluation.accuracy_by_length`. `train_wall_s` is the wall time of the training process
    (data, compiles, steps, final eval) when this study ran it, else None.
  """
  workdir = pathlib.Path(workdir)
  timing_path = workdir / TIMING_FILE
  if not workdir_lib.is_finished(workdir, config.train.num_steps):
    resumed, t0 = (workdir / workdir_lib.CHECKPOINTS_DIR).exists(), time.time()
    run_lib.train_and_evaluate(config, workdir)
    timing = {'train_wall_s': time.time() - t0, 'resumed': resumed}
    timing_path.write_text(json.dumps(timing, indent=1), encoding='utf-8')
  run = inference.load_run(workdir)
  data_cfg = _eval_data_config(run.config)
  key = {'step': run.step, 'split': 'test',
         'data': data_config.algorithmic_params(data_cfg, data_cfg.data_seed),
         'decode_method': run.config.eval.decode_method}
  cache_path = workdir / EVAL_FILE
  if cache_path.exists():
    cached = json.loads(cache_path.read_text(encoding='utf-8'))
    if cached.get('key') == key:
      logging.info('%s: reusing the per-length scores of step %d', workdir, run.step)
      return cached['result']
  t0 = time.time()
  bundle = data_lib.make_datasets(data_cfg, data_dir=run.config.data_dir or None,
                                  seed=run.config.train.seed)
  max_len = int(bundle.meta['max_target_length'] or bundle.meta['max_length'])
  rows = evaluation.evaluate_by_length(run.task, run.params, bundle.eval['test'],
                                       run.config.eval, max_len)
  eval_wall = time.time() - t0
  lo, hi = _train_lengths(run.config)
  longest = max(r['length'] for r in rows)
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  result = {
      'arg': run.config.arg, 'step': run.step,
      'seeds': {'train.seed': run.config.train.seed, 'data.data_seed': run.config.data.data_seed},
      'num_params': int(state_lib.param_count(run.params)),
      'train_length': [lo, hi], 'test_length': list(run.config.data.algorithmic.test_length),
      'rows': rows,
      'in_range': evaluation.summarize_length_range(rows, lo, hi),
      'out_of_range': evaluation.summarize_length_range(rows, hi + 1, longest),
      'train_wall_s': timing.get('train_wall_s'), 'steps_per_second': _steps_per_second(workdir),
      'eval_wall_s': eval_wall,
  }
  cache_path.write_text(json.dumps({'key': key, 'result': result}, indent=1), encoding='utf-8')
  return result


def _fmt(value: Any, spec: str = '.3f') -> str:
  return '' if value is None else format(value, spec)


def markdown_tables(results: Mapping[str, Mapping[str, Any]],
                    labels: Mapping[str, str] | None = None) -> str:
  """A summary table (a row per model) and a per-length table (a column pair per model).

  Raises:
    ValueError: if the models were scored on different test examples (per-length counts).
  """
  labels = labels or {}
  models = list(results)
  if not models:
    raise ValueError('results is empty')
  counts = {m: {r['length']: r['count'] for r in results[m]['rows']} for m in models}
  if any(counts[m] != counts[models[0]] for m in models):
    raise ValueError(f'models {models} were scored on different test sets (per-length counts '
                     'differ); run them with the same config arg')
  lo, hi = results[models[0]]['train_length']
  lines = [f'| model | exact match, lengths {lo}-{hi} | token acc. {lo}-{hi} | '
           f'exact match, lengths > {hi} | token acc. > {hi} | steps | steps/s | '
           'train wall (s) |', '|---|---|---|---|---|---|---|---|']
  for m in models:
    r = results[m]
    lines.append(f"| {labels.get(m, m)} | {_fmt(r['in_range']['sequence_accuracy'])} | "
                 f"{_fmt(r['in_range']['token_accuracy'])} | "
                 f"{_fmt(r['out_of_range']['sequence_accuracy'])} | "
                 f"{_fmt(r['out_of_range']['token_accuracy'])} | {r['step']} | "
                 f"{_fmt(r['steps_per_second'], '.1f')} | {_fmt(r['train_wall_s'], '.0f')} |")
  lines += ['', '| length | examples | ' + ' | '.join(
      f'{m} exact | {m} token' for m in models) + ' |',
      '|---|---|' + '---|---|' * len(models)]
  by_length = {m: {r['length']: r for r in results[m]['rows']} for m in models}
  for n, count in sorted(counts[models[0]].items()):
    cells = [f"{_fmt(by_length[m][n]['sequence_accuracy'])} | "
             f"{_fmt(by_length[m][n]['token_accuracy'])}" for m in models]
    lines.append(f'| {n}{"*" if n > hi else ""} | {count} | ' + ' | '.join(cells) + ' |')
  lines.append(f'\n`*` longer than every training sequence (training lengths {lo}-{hi}).')
  return '\n'.join(lines) + '\n'


def csv_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """Long format: one line per (model, length)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['model', 'length', 'count', 'sequence_accuracy', 'token_accuracy'])
  for m, result in results.items():
    for r in result['rows']:
      writer.writerow([m, r['length'], r['count'], repr(r['sequence_accuracy']),
                       repr(r['token_accuracy'])])
  return out.getvalue()


def write_outputs(results: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  labels: Mapping[str, str] | None = None,
                  commands: Sequence[str] = (), title: str | None = None
                  ) -> dict[str, pathlib.Path]:
  """Writes length_study.{json,md,csv,png} under `out_dir`; returns {suffix: path}."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  labels = {m: (labels or {}).get(m, m) for m in results}
  md = markdown_tables(results, labels)  # Checks the models share one test set.
  first = next(iter(results.values()))
  paths = {s: out / f'{OUTPUT_STEM}.{s}' for s in ('json', 'md', 'csv', 'png')}
  summary = {'provenance': provenance.collect(),
             'train_length': first['train_length'], 'test_length': first['test_length'],
             'labels': labels, 'commands': list(commands), 'models': dict(results)}
  paths['json'].write_text(json.dumps(summary, indent=1) + '\n', encoding='utf-8')
  paths['md'].write_text(md, encoding='utf-8')
  paths['csv'].write_text(csv_table(results), encoding='utf-8')
  plots.plot_length_accuracy({labels[m]: r['rows'] for m, r in results.items()},
                             first['train_length'][1], paths['png'], title=title)
  return paths
