"""The ablation's records, learning-rate choice, intervals, table, figure and JSON.

    records = [run_record(run, keys, base / run.name, metrics) for ...]
    choice, tuning = choose_learning_rates(tune_records, tune_metrics, scales)
    agg = aggregate(final_records, variants, metrics)
    paths = write_outputs(records, out_dir, ...)

A record holds one run's keys (task, variant, seed, lr), its status, its scores from
`ablation_eval` (each table metric and that run's standard error from its eval examples), its
parameter count and speed. A cell (task x variant) of the table is the mean over its final
runs' seeds with a 95% t-interval (`stats.t_interval`), a two-level bootstrap interval over
seeds and examples, and the difference from the baseline with Welch's interval and p-value;
`significant` is Holm's correction over the variants of a column. Lower is better for metrics
named in `LOWER_IS_BETTER` (bits per character), higher for the rest.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as scipy_stats

from attn_jax.experiment import stats

OUTPUT_STEM = 'ablation'
LOWER_IS_BETTER = ('bpc',)
BOOTSTRAP_SEED = 0


def lower_is_better(score: str) -> bool:
  return score in LOWER_IS_BETTER


def run_se(score: str, values: Sequence[float], weights: Sequence[float] | None) -> float:
  """One run's standard error of `score` from its per-example values: binomial for 0/1
  scores, the examples' spread for token accuracy and (token-weighted) bits per character."""
  if score in ('exact', 'accuracy'):
    return stats.binomial_se(float(np.mean(values)), len(values))
  return stats.mean_se(values, weights if score == 'bpc' else None)


def scores_of(evaluated: Mapping[str, Any] | None, metrics: Mapping[str, tuple[str, str]]
              ) -> tuple[dict[str, float | None], dict[str, float | None], dict[str, Any]]:
  """(value, standard error, per-example values) of each table metric of a run's
  `ablation_eval` result (None where the run has no such score)."""
  values, errors, examples = {}, {}, {}
  for label, (split, score) in metrics.items():
    per_split = (evaluated or {}).get('splits', {}).get(split, {})
    if score not in per_split:
      values[label] = errors[label] = examples[label] = None
      continue
    values[label] = evaluated['summary'][split][score]
    weights = per_split.get('weights')
    errors[label] = run_se(score, per_split[score], weights)
    examples[label] = {'values': per_split[score], 'weights': weights}
  return values, errors, examples


def choose_learning_rates(records: Sequence[Mapping[str, Any]],
                          tune_metrics: Mapping[str, tuple[str, str]],
                          scales: Sequence[float]) -> tuple[dict[str, float], dict[str, Any]]:
  """Each cell's rate: the scale whose tuning run scored best (`record['tune_score']`, in the
  direction 'max' or 'min' of its task's `tune_metrics` entry `(metric, direction)`); ties and
  cells without a score: the scale nearest 1. Returns `({'task/variant': scale},
  {'task/variant': {scale: score}})`."""
  tuning: dict[str, dict[str, float]] = {}
  for r in records:
    if r.get('tune_score') is not None:
      tuning.setdefault(f"{r['task']}/{r['variant']}", {})[f"{r['lr']:g}"] = r['tune_score']
  choice = {}
  for cell, by_scale in tuning.items():
    sign = 1.0 if tune_metrics[cell.split('/')[0]][1] == 'max' else -1.0
    ranked = sorted(by_scale, key=lambda s: (-sign * by_scale[s], abs(np.log(float(s)))))
    choice[cell] = float(ranked[0])
  for cell in {f"{r['task']}/{r['variant']}" for r in records} - set(choice):
    choice[cell] = min(scales, key=lambda s: abs(np.log(s)))
  return choice, tuning


def rank_stability(tuning: Mapping[str, Mapping[str, float]], scales: Sequence[float]
                   ) -> dict[str, dict[str, float]]:
  """Per task, Spearman's rank correlation of the variants' tuning scores between every pair
  of rates: how far the ranking of variants depends on the rate."""
  out: dict[str, dict[str, float]] = {}
  tasks = sorted({cell.split('/')[0] for cell in tuning})
  keys = [f'{s:g}' for s in scales]
  for task in tasks:
    rows = [v for cell, v in tuning.items() if cell.startswith(task + '/')
            and all(k in v for k in keys)]
    out[task] = {}
    for i, a in enumerate(keys):
      for b in keys[i + 1:]:
        if len(rows) >= 3:
          rho = scipy_stats.spearmanr([r[a] for r in rows], [r[b] for r in rows]).statistic
          out[task][f'{a} vs {b}'] = float(rho)
  return out


def _cell_metric(done: Sequence[Mapping[str, Any]], label: str, score: str) -> dict[str, Any]:
  runs = [r for r in done if r['metrics'].get(label) is not None]
  values = [r['metrics'][label] for r in runs]
  out: dict[str, Any] = {'mean': float(np.mean(values)) if values else None,
                         'seeds': [r['seed'] for r in runs], 'values': values,
                         'per_run_se': [r['se'][label] for r in runs]}
  if len(values) >= 2:
    mean, half = stats.t_interval(values)
    out.update(half=half, ci95=[mean - half, mean + half])
    groups = [r['examples'][label]['values'] for r in runs]
    if score != 'bpc':  # bits per character is a weighted mean: its bootstrap is not this one
      out['bootstrap95'] = list(stats.bootstrap_interval(groups, seed=BOOTSTRAP_SEED,
                                                         samples=500))
  return out


def aggregate(records: Sequence[Mapping[str, Any]], variants: Sequence[str],
              metrics: Mapping[str, Mapping[str, tuple[str, str]]]) -> dict[str, Any]:
  """`{variant: {task: {'metrics': {label: {mean, half, ci95, seeds, values, per_run_se,
  bootstrap95, vs_baseline}}, 'num_params', 'steps_per_second', 'train_steps', 'wall_s',
  'runs'}}}` over the finished final runs; `vs_baseline` (variants but the first): `diff`,
  `half` (Welch), `p`, and `significant` (Holm over the column's variants)."""
  out: dict[str, dict[str, Any]] = {}
  for variant in variants:
    out[variant] = {}
    for task, labels in metrics.items():
      done = [r for r in records if r['variant'] == variant and r['task'] == task
              and r['status'] == 'done']
      if not done:
        continue
      cell: dict[str, Any] = {'runs': len(done), 'lr': done[0]['lr'], 'metrics': {
          label: _cell_metric(done, label, score) for label, (_, score) in labels.items()}}
      for key in ('num_params', 'steps_per_second', 'train_steps', 'wall_s'):
        values = [r[key] for r in done if r.get(key) is not None]
        cell[key] = float(np.mean(values)) if values else None
      out[variant][task] = cell
  _compare_with_baseline(out, variants, metrics)
  return out


def _compare_with_baseline(agg, variants, metrics) -> None:
  baseline = variants[0]
  for task, labels in metrics.items():
    for label in labels:
      base = agg.get(baseline, {}).get(task, {}).get('metrics', {}).get(label, {})
      tested = []
      for variant in variants[1:]:
        cell = agg.get(variant, {}).get(task, {}).get('metrics', {}).get(label)
        if cell and len(cell['values']) >= 2 and len(base.get('values', [])) >= 2:
          diff, half, p = stats.welch_difference(cell['values'], base['values'])
          cell['vs_baseline'] = {'diff': diff, 'half': half, 'p': p}
          tested.append(cell['vs_baseline'])
      for comparison, rejected in zip(tested, stats.holm([c['p'] for c in tested]),
                                      strict=True):
        comparison['significant'] = rejected


def _fmt(value: float | None, spec: str) -> str:
  return '' if value is None else format(value, spec)


def _cell_text(stats_: Mapping[str, Any] | None, score: str) -> str:
  """`mean ± half` and, for a Holm-significant difference from the baseline, ▲ (better) or
  ▼ (worse)."""
  if not stats_ or stats_['mean'] is None:
    return ''
  text = f"{stats_['mean']:.3f}" + (f" ± {stats_['half']:.3f}" if 'half' in stats_ else '')
  vs = stats_.get('vs_baseline')
  if vs and vs.get('significant'):
    better = (vs['diff'] < 0) if lower_is_better(score) else (vs['diff'] > 0)
    text += ' ▲' if better else ' ▼'
  return text


def markdown_table(agg: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                   metrics: Mapping[str, Mapping[str, tuple[str, str]]]) -> str:
  """Variant rows; a column per task metric (mean ± 95% t half-width over seeds, ▲/▼ where
  the difference from the baseline is significant), then the learning-rate factors, the
  parameters and the speed per task."""
  tasks = list(metrics)
  header = ['variant'] + [f'{t} {label}' for t in tasks for label in metrics[t]]
  header += ['lr factor (' + ', '.join(tasks) + ')'] + [f'params ({t})' for t in tasks]
  header += [f'steps/s ({t})' for t in tasks]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for variant, cells in agg.items():
    row = [labels.get(variant, variant)]
    row += [_cell_text(cells.get(t, {}).get('metrics', {}).get(label), score)
            for t in tasks for label, (_, score) in metrics[t].items()]
    row.append(' / '.join(_fmt(cells.get(t, {}).get('lr'), 'g') or '-' for t in tasks))
    row += [_fmt(None if cells.get(t, {}).get('num_params') is None
                 else cells[t]['num_params'] / 1000, '.0f') + ('k' if t in cells else '')
            for t in tasks]
    row += [_fmt(cells.get(t, {}).get('steps_per_second'), '.1f') for t in tasks]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def noise_notes(agg: Mapping[str, Mapping[str, Any]],
                metrics: Mapping[str, Mapping[str, tuple[str, str]]]) -> list[str]:
  """Per column: the median per-run standard error (eval examples) and the median 95%
  half-width over seeds, so a reader sees which noise dominates."""
  notes = []
  for task, labels in metrics.items():
    for label in labels:
      cells = [c[task]['metrics'][label] for c in agg.values() if task in c]
      ses = [se for c in cells for se in c['per_run_se'] if se is not None]
      halves = [c['half'] for c in cells if 'half' in c]
      if ses:
        notes.append(f'{task} {label}: per-run standard error from the eval examples, median '
                     f'{statistics.median(ses):.4f}; 95% half-width over seeds, median '
                     f'{statistics.median(halves) if halves else float("nan"):.3f}')
  return notes


def ablation_figure(agg: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                    metrics: Mapping[str, Mapping[str, tuple[str, str]]],
                    title: str | None = None):
  """A panel per task metric: bar = mean over seeds, line = its 95% t-interval, dots = the
  seeds, dashed = the baseline's mean; a filled marker beside a bar is a significant
  difference. Then parameters and training steps/s per task."""
  variants = list(agg)
  panels = [(t, label, score) for t in metrics for label, (_, score) in metrics[t].items()]
  fig = Figure(figsize=(2.8 * (len(panels) + 2), 0.3 * len(variants) + 1.8),
               layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels) + 2, sharey=True, squeeze=False)[0]
  ys = list(range(len(variants)))[::-1]  # baseline on top
  for ax, (task, label, score) in zip(axes, panels, strict=False):
    for y, variant in zip(ys, variants, strict=True):
      cell = agg[variant].get(task, {}).get('metrics', {}).get(label)
      if not cell or cell['mean'] is None:
        continue
      ax.barh(y, cell['mean'], color='C7' if variant == variants[0] else 'C0', alpha=0.6)
      if 'ci95' in cell:
        ax.plot(cell['ci95'], [y, y], color='black', linewidth=1.2)
      ax.scatter(cell['values'], [y] * len(cell['values']), color='black', s=6, zorder=3)
      if cell.get('vs_baseline', {}).get('significant'):
        ax.scatter([cell['ci95'][1]], [y], marker='*', color='C3', s=30, zorder=4)
    base = agg[variants[0]].get(task, {}).get('metrics', {}).get(label)
    if base and base['mean'] is not None:
      ax.axvline(base['mean'], color='C7', linestyle='--', linewidth=1)
    if not lower_is_better(score):
      ax.set_xlim(0, 1)
    ax.set_title(f'{task}: {label}' + (' (lower better)' if lower_is_better(score) else ''),
                 fontsize=8)
    ax.grid(axis='x', alpha=0.3)
  for ax, key, name in ((axes[-2], 'num_params', 'parameters (k)'),
                        (axes[-1], 'steps_per_second', 'training steps/s')):
    height = 0.8 / len(metrics)
    for i, task in enumerate(metrics):
      values = [agg[v].get(task, {}).get(key) for v in variants]
      scale = 1e-3 if key == 'num_params' else 1.0
      ax.barh([y + (i - (len(metrics) - 1) / 2) * height for y in ys],
              [0 if x is None else x * scale for x in values], height=height, label=task)
    ax.set_title(name, fontsize=8)
    ax.grid(axis='x', alpha=0.3)
  axes[-1].legend(fontsize=7, loc='lower right')
  axes[0].set_yticks(ys, [labels.get(v, v) for v in variants], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def _json_safe(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Records without their per-example values (kept in each run's workdir)."""
  return [{k: v for k, v in r.items() if k != 'examples'} for r in records]


def write_outputs(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  variants: Sequence[str], labels: Mapping[str, str],
                  metrics: Mapping[str, Mapping[str, tuple[str, str]]],
                  settings: Mapping[str, Any], command: str, provenance: Mapping[str, Any],
                  lr_choice: Mapping[str, float] | None = None,
                  tuning: Mapping[str, Any] | None = None,
                  stability: Mapping[str, Any] | None = None) -> dict[str, pathlib.Path]:
  """Writes ablation.{md,json,png} under `out_dir` from the final runs of `records` (tuning
  runs, `phase='tune'`, are listed in the JSON too); returns {suffix: path}."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  final = [r for r in records if r.get('phase', 'final') == 'final']
  agg = {v: cells for v, cells in aggregate(final, variants, metrics).items() if cells}
  if not agg:
    raise ValueError('no finished run to gather')
  paths = {s: out / f'{OUTPUT_STEM}.{s}' for s in ('md', 'json', 'png')}
  finished = sum(r['status'] == 'done' for r in final)
  walls = [r['wall_s'] for r in records if r.get('wall_s') is not None]
  md = [f'Ablation: {finished} of {len(final)} reported runs finished. Each cell: the mean '
        'over seeds ± the half-width of its 95% t-interval; ▲/▼: better/worse than the '
        'baseline (Welch t-test over seeds, Holm-corrected over the variants of the column, '
        'family-wise α = 0.05); no mark: not significant. Command: `' + command + '`.', '',
        markdown_table(agg, labels, metrics)]
  md.append('Settings: ' + '; '.join(f'{k}: {v}' for k, v in settings.items()) + '.')
  md += ['', 'Noise:'] + [f'- {n}' for n in noise_notes(agg, metrics)]
  if stability:
    md += ['', 'Ranking of the variants across the learning-rate grid (Spearman, tuning seed): '
           + '; '.join(f'{t}: ' + ', '.join(f'{k} {v:.2f}' for k, v in pairs.items())
                       for t, pairs in stability.items())]
  if walls:
    md.append(f'\nWall time per run (training + evaluation, as launched here): median '
              f'{statistics.median(walls):.0f} s, total {sum(walls) / 3600:.1f} h of runs.')
  paths['md'].write_text('\n'.join(md) + '\n', encoding='utf-8')
  summary = {'command': command, 'provenance': dict(provenance), 'settings': dict(settings),
             'labels': dict(labels),
             'metrics': {t: {k: list(v) for k, v in m.items()} for t, m in metrics.items()},
             'lr_choice': dict(lr_choice or {}), 'tuning': dict(tuning or {}),
             'rank_stability': dict(stability or {}), 'aggregate': agg,
             'runs': _json_safe(records)}
  paths['json'].write_text(json.dumps(summary, indent=1) + '\n', encoding='utf-8')
  fig = ablation_figure(agg, labels, metrics,
                        title='One change at a time from the baseline Transformer '
                              '(mean, 95% interval over seeds)')
  fig.savefig(paths['png'], dpi=110)
  fig.clear()
  return paths
