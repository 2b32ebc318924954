r"""Ablation study (issue #13): train every run of configs/ablation.py's sweep() (or resume the
unfinished ones), then gather them into a table, a JSON file and a figure.

  PYTHONPATH=$PWD python experiments/ablation.py --workdir runs/ablation \
      --out experiments/figures

runs the 120 runs (3 tasks x 20 variants x 2 seeds) in `--workdir/<task>_<variant>_seed<s>`,
`--jobs` at a time (default 2, one per core of a 2-core CPU: each training process then runs
XLA single-threaded, `--xla_cpu_multi_thread_eigen=false`, which for these small models is
faster than two processes sharing two threads each), through `attn_jax.experiment.sweep`: a
finished run (DONE) is skipped, an unfinished one resumes from its checkpoint, a crash is
recorded and the study goes on. Both seeds of a variant go to the same job, one after the
other, so the second finds the first's compiled programs in the persistent compilation cache
(`--workdir/jax_cache`; the programs are the same, only the initial values differ).
Then it writes `--workdir/summary.{csv,md}` (every run's final metrics) and, to `--out`:

    ablation.md    variant x task: mean accuracy over seeds +- half their spread, parameters,
                   median training steps/s; and the settings
    ablation.json  every run's metrics, parameters, steps/s and wall time; the aggregates
    ablation.png   accuracy per variant and task (bars: mean, dots: seeds), parameters, steps/s

Time: the baseline's six runs took 36-72 s each with two jobs on the 2-core machine (the
second seed of a variant 25-35% less, from the compilation cache), the Performer's about 1.5x;
the 120 runs about an hour (see configs/ablation.py for the sizes).

`--gather_only` only rewrites those from the runs there are; `--tasks`, `--variants`,
`--seeds` select part of the sweep (e.g. one task per machine); `--arg=smoke` appends to every
run's config argument (a seconds-long check, in its own --workdir); `--set field=value` is
passed to every run (`--config.field=value`, e.g. `--set data_dir=/tmp/tfds`). A run alone is
`python experiments/train.py --config configs/ablation.py:task=T,variant=V,seed=S --workdir
--workdir/T_V_seedS`, the command this script launches. SIGTERM stops the study after the
current runs have checkpointed; run it again to resume.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attn_jax.experiment import config as experiment_config
from attn_jax.experiment import sweep, tasks
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.train import state as state_lib
from attn_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]

OUTPUT_STEM = 'ablation'
TIMING_FILE = 'ablation_timing.json'
CACHE_DIR = 'jax_cache'
SINGLE_THREAD_FLAG = '--xla_cpu_multi_thread_eigen=false'

_CONFIG = flags.DEFINE_string('config', 'configs/ablation.py', 'The study config (get_config, '
                              'sweep, TASKS, VARIANTS, LABELS, METRICS); a relative path not '
                              'found here is taken from the repository root.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/ablation', 'Base workdir: <base>/<run name>.')
_OUT = flags.DEFINE_string('out', None, 'Where ablation.{md,json,png} go (default: --workdir).')
_JOBS = flags.DEFINE_integer('jobs', 2, 'Training processes at a time (1: sequential, with '
                             "XLA's default threads).")
_SHARD = flags.DEFINE_string('shard', '', 'Internal: "k/n", run the k-th of n job shares and '
                             'do not gather.')
_GATHER_ONLY = flags.DEFINE_bool('gather_only', False, 'Only gather the runs there are.')
_TASKS = flags.DEFINE_list('tasks', None, 'Tasks to run and gather (default: all).')
_VARIANTS = flags.DEFINE_list('variants', None, 'Variants to run and gather (default: all).')
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds to run and gather (default: all).')
_ARG = flags.DEFINE_string('arg', '', 'Appended to every run\'s config arg, e.g. smoke.')
_SET = flags.DEFINE_multi_string('set', [], 'field=value for every run (--config.field=value).')
_TRAIN_SCRIPT = flags.DEFINE_string('train_script', str(ROOT / sweep.DEFAULT_TRAIN_SCRIPT),
                                    'Script launched per run.')


# --- Runs --------------------------------------------------------------------------------------


def run_keys(run: sweep.Run) -> dict[str, Any]:
  """`{'task', 'variant', 'seed'}` of a run, from its config arg."""
  items = dict(item.split('=', 1) for item in run.arg.split(',') if '=' in item)
  return {'task': items['task'], 'variant': items['variant'], 'seed': int(items['seed'])}


def select_runs(runs: Sequence[sweep.Run], *, tasks=None, variants=None, seeds=None,
                extra_arg: str = '') -> list[sweep.Run]:
  """The runs of the chosen tasks/variants/seeds (None: all), with `extra_arg` appended to
  each config arg (names unchanged: give such runs their own workdir)."""
  chosen = []
  for run in runs:
    keys = run_keys(run)
    if ((tasks and keys['task'] not in tasks) or (variants and keys['variant'] not in variants)
        or (seeds and str(keys['seed']) not in [str(s) for s in seeds])):
      continue
    arg = ','.join(p for p in (run.arg, extra_arg.strip()) if p)
    chosen.append(sweep.Run(name=run.name, arg=arg, overrides=run.overrides))
  if not chosen:
    raise ValueError(f'no run of the sweep is selected by tasks={tasks} variants={variants} '
                     f'seeds={seeds}')
  return chosen


def shard(runs: Sequence[sweep.Run], index: int, count: int) -> list[sweep.Run]:
  """Share `index` of `count`: runs of one (task, variant) stay together (so a later seed
  reuses the compiled programs of the first), groups dealt out in turn."""
  groups: list[list[sweep.Run]] = []
  for run in runs:
    keys = run_keys(run)
    if groups and run_keys(groups[-1][0]) | {'seed': 0} == keys | {'seed': 0}:
      groups[-1].append(run)
    else:
      groups.append([run])
  return [run for i, group in enumerate(groups) if i % count == index for run in group]


def train_runs(runs: Sequence[sweep.Run], *, config_path: str, base: pathlib.Path,
               train_script: str, common: Mapping[str, str]) -> dict[str, str]:
  """Trains the unfinished runs one after another (through `sweep.run_sweep`, which skips the
  finished ones), recording each launched run's wall time in its workdir."""
  statuses = {}
  for run in runs:
    workdir = base / run.name
    before = sweep.run_status(workdir)
    start = time.time()
    statuses.update(sweep.run_sweep([run], config_path=config_path, base_workdir=base,
                                    train_script=train_script, common_overrides=common))
    if before != 'done':
      timing = {'wall_s': time.time() - start, 'resumed': before != 'missing',
                'jobs': _JOBS.value, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
      (workdir / TIMING_FILE).write_text(json.dumps(timing, indent=1) + '\n', encoding='utf-8')
  return statuses


def _child_env(base: pathlib.Path, jobs: int) -> None:
  """Environment every training process inherits: the shared compilation cache and, with
  several jobs, single-threaded XLA (one core each)."""
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str((base / CACHE_DIR).resolve()))
  if jobs > 1 and SINGLE_THREAD_FLAG not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAG}".strip()


def _run_shards(jobs: int) -> tuple[int, int | None]:
  """Launches `jobs` copies of this script, each on its share (`--shard=k/n`), passing a
  SIGTERM on to them; returns the worst exit code and the signal received (or None)."""
  procs: list[subprocess.Popen] = []
  received: list[int] = []

  def forward(signum, frame):
    del frame
    received.append(signum)
    for proc in procs:
      proc.send_signal(signum)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    for k in range(jobs):
      procs.append(subprocess.Popen([sys.executable, str(pathlib.Path(__file__).resolve()),
                                     *sys.argv[1:], f'--shard={k}/{jobs}']))
    codes = [proc.wait() for proc in procs]
  finally:
    signal.signal(signal.SIGTERM, previous)
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return max(codes, key=abs), (received[0] if received else None)


# --- Gathering --------------------------------------------------------------------------------


def _median_steps_per_second(records: Sequence[Mapping[str, Any]]) -> float | None:
  """Median over the logged intervals (robust to the first, which includes compilation)."""
  speeds = [r['train/steps_per_second'] for r in records
            if r.get('train/steps_per_second') is not None]
  return float(statistics.median(speeds)) if speeds else None


def num_params(workdir: pathlib.Path) -> int | None:
  """Parameters of a run's model, from its config.json and data_meta.json (shapes only:
  nothing is compiled or restored)."""
  try:
    config = workdir_lib.read_json(workdir / workdir_lib.CONFIG_FILE)
    meta = workdir_lib.read_json(workdir / workdir_lib.DATA_META_FILE)
  except ValueError:
    return None
  task = tasks.make_task(experiment_config.saved_config(config), meta)
  return int(state_lib.param_count(jax.eval_shape(task.init_params, jax.random.key(0))))


def gather(runs: Sequence[sweep.Run], base: pathlib.Path,
           metrics: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
  """One record per run: keys, status, final value of each task metric (None if absent),
  parameters, median steps/s, steps and the wall time this script measured."""
  records, params = [], {}
  for run in runs:
    keys = run_keys(run)
    workdir = base / run.name
    status = sweep.run_status(workdir)
    done = workdir_lib.read_done(workdir) if status == 'done' else None
    final = (done or {}).get('final', {})
    timing_path = workdir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    history = read_metrics(workdir) if workdir.exists() else []
    model = (keys['task'], keys['variant'])
    if done and params.get(model) is None:  # The seeds of a variant build the same model.
      params[model] = num_params(workdir)
    records.append({
        'name': run.name, **keys, 'status': status, 'step': (done or {}).get('step'),
        'metrics': {label: final.get(key) for label, key in metrics[keys['task']].items()},
        'num_params': params.get(model) if done else None,
        'steps_per_second': _median_steps_per_second(history),
        'wall_s': timing.get('wall_s'), 'resumed': timing.get('resumed'),
    })
  return records


def _mean_spread(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and half the range (for two seeds, their population standard deviation)."""
  if not values:
    return None, None
  return statistics.fmean(values), (max(values) - min(values)) / 2


def aggregate(records: Sequence[Mapping[str, Any]], variants: Sequence[str],
              metrics: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, Any]]:
  """`{variant: {task: {'metrics': {label: {mean, spread, seeds: [...]}}, 'num_params',
  'steps_per_second', 'wall_s', 'runs'}}}` over the finished runs."""
  out: dict[str, dict[str, Any]] = {}
  for variant in variants:
    out[variant] = {}
    for task, labels in metrics.items():
      done = [r for r in records if r['variant'] == variant and r['task'] == task
              and r['status'] == 'done']
      if not done:
        continue
      cell: dict[str, Any] = {'runs': len(done), 'metrics': {}}
      for label in labels:
        values = [r['metrics'][label] for r in done if r['metrics'][label] is not None]
        mean, spread = _mean_spread(values)
        cell['metrics'][label] = {'mean': mean, 'spread': spread, 'seeds': values}
      params = [r['num_params'] for r in done if r['num_params'] is not None]
      cell['num_params'] = params[0] if params else None
      speeds = [r['steps_per_second'] for r in done if r['steps_per_second'] is not None]
      cell['steps_per_second'] = statistics.fmean(speeds) if speeds else None
      walls = [r['wall_s'] for r in done if r['wall_s'] is not None]
      cell['wall_s'] = statistics.fmean(walls) if walls else None
      out[variant][task] = cell
  return out


def _fmt(value: float | None, spec: str) -> str:
  return '' if value is None else format(value, spec)


def _cell(stats: Mapping[str, Any] | None) -> str:
  if not stats or stats['mean'] is None:
    return ''
  return f"{stats['mean']:.3f} ± {stats['spread']:.3f}"


def _params_text(n: int | None) -> str:
  return '' if n is None else f'{n / 1000:.0f}k'


def markdown_table(agg: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                   metrics: Mapping[str, Mapping[str, str]]) -> str:
  """Variant rows; a column per task metric (mean ± half the seed spread), then parameters
  and median steps/s per task."""
  tasks = list(metrics)
  header = ['variant'] + [f'{t} {label}' if len(metrics[t]) > 1 else t
                          for t in tasks for label in metrics[t]]
  header += [f'params ({t})' for t in tasks] + [f'steps/s ({t})' for t in tasks]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for variant, cells in agg.items():
    row = [labels.get(variant, variant)]
    row += [_cell(cells.get(t, {}).get('metrics', {}).get(label)) for t in tasks
            for label in metrics[t]]
    row += [_params_text(cells.get(t, {}).get('num_params')) for t in tasks]
    row += [_fmt(cells.get(t, {}).get('steps_per_second'), '.1f') for t in tasks]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def ablation_figure(agg: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                    metrics: Mapping[str, Mapping[str, str]], title: str | None = None):
  """Horizontal bars per variant: one panel per task metric (bar = mean over seeds, dots =
  the seeds, line = their range), then parameters and steps/s (one bar per task)."""
  variants = list(agg)
  panels = [(t, label) for t in metrics for label in metrics[t]]
  fig = Figure(figsize=(3.0 * (len(panels) + 2), 0.32 * len(variants) + 1.6),
               layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels) + 2, sharey=True, squeeze=False)[0]
  ys = list(range(len(variants)))[::-1]  # baseline on top
  for ax, (task, label) in zip(axes, panels, strict=False):
    for y, variant in zip(ys, variants, strict=True):
      stats = agg[variant].get(task, {}).get('metrics', {}).get(label)
      if not stats or stats['mean'] is None:
        continue
      ax.barh(y, stats['mean'], color='C7' if variant == variants[0] else 'C0', alpha=0.7)
      seeds = stats['seeds']
      ax.plot([min(seeds), max(seeds)], [y, y], color='black', linewidth=1)
      ax.scatter(seeds, [y] * len(seeds), color='black', s=8, zorder=3)
    base = agg[variants[0]].get(task, {}).get('metrics', {}).get(label)
    if base and base['mean'] is not None:  # one change at a time: compare with the baseline
      ax.axvline(base['mean'], color='C7', linestyle='--', linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_title(f'{task}: {label}', fontsize=9)
    ax.grid(axis='x', alpha=0.3)
  for ax, key, name in ((axes[-2], 'num_params', 'parameters (k)'),
                        (axes[-1], 'steps_per_second', 'training steps/s')):
    height = 0.8 / len(metrics)
    for i, task in enumerate(metrics):
      values = [agg[v].get(task, {}).get(key) for v in variants]
      scale = 1e-3 if key == 'num_params' else 1.0
      ax.barh([y + (i - (len(metrics) - 1) / 2) * height for y in ys],
              [0 if x is None else x * scale for x in values], height=height, label=task)
    ax.set_title(name, fontsize=9)
    ax.grid(axis='x', alpha=0.3)
  axes[-1].legend(fontsize=7, loc='lower right')
  axes[0].set_yticks(ys, [labels.get(v, v) for v in variants], fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def write_outputs(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  variants: Sequence[str], labels: Mapping[str, str],
                  metrics: Mapping[str, Mapping[str, str]], settings: Mapping[str, Any],
                  command: str) -> dict[str, pathlib.Path]:
  """Writes ablation.{md,json,png} under `out_dir`; returns {suffix: path}."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  agg = aggregate(records, variants, metrics)
  agg = {v: cells for v, cells in agg.items() if cells}
  if not agg:
    raise ValueError('no finished run to gather')
  paths = {s: out / f'{OUTPUT_STEM}.{s}' for s in ('md', 'json', 'png')}
  finished = sum(r['status'] == 'done' for r in records)
  walls = [r['wall_s'] for r in records if r['wall_s'] is not None]
  md = [f'Ablation: {finished} of {len(records)} runs finished; accuracy is the mean over '
        'seeds ± half their spread. Command: `' + command + '`.', '',
        markdown_table(agg, labels, metrics)]
  md.append('Settings: ' + ', '.join(f'{k} {v}' for k, v in settings.items()) + '.')
  if walls:
    md.append(f'Training wall time per run (as launched here): median '
              f'{statistics.median(walls):.0f} s, total {sum(walls) / 60:.0f} min of runs.')
  paths['md'].write_text('\n'.join(md) + '\n', encoding='utf-8')
  summary = {'command': command, 'settings': dict(settings), 'labels': dict(labels),
             'metrics': {t: dict(m) for t, m in metrics.items()}, 'aggregate': agg,
             'runs': list(records)}
  paths['json'].write_text(json.dumps(summary, indent=1) + '\n', encoding='utf-8')
  fig = ablation_figure(agg, labels, metrics,
                        title='One change at a time from the baseline Transformer')
  fig.savefig(paths['png'], dpi=110)
  fig.clear()
  return paths


# --- Entry point -----------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  path = pathlib.Path(_CONFIG.value)
  config_path = str(path if path.exists() else ROOT / path)
  module = sweep.load_config_module(config_path)
  common = sweep.parse_common_overrides(_SET.value)
  runs = select_runs(sweep.load_sweep(config_path, common_overrides=common),
                     tasks=_TASKS.value, variants=_VARIANTS.value, seeds=_SEEDS.value,
                     extra_arg=_ARG.value)
  base = pathlib.Path(_WORKDIR.value)
  base.mkdir(parents=True, exist_ok=True)
  if not _GATHER_ONLY.value:
    jobs = max(1, _JOBS.value)
    _child_env(base, jobs)
    try:
      if _SHARD.value:
        k, n = (int(x) for x in _SHARD.value.split('/'))
        train_runs(shard(runs, k, n), config_path=config_path, base=base,
                   train_script=_TRAIN_SCRIPT.value, common=common)
        return 0
      if jobs > 1:
        code, signum = _run_shards(jobs)
        if signum is not None:
          raise sweep.SweepInterrupted(signum, {})
        if code:
          logging.warning('a job share exited with %d; gathering what finished', code)
      else:
        train_runs(runs, config_path=config_path, base=base, train_script=_TRAIN_SCRIPT.value,
                   common=common)
    except sweep.SweepInterrupted as e:  # The running trainings have checkpointed.
      logging.warning('%s', e)
      return 128 + e.signum
  sweep.write_summary(runs, base)
  variants = [v for v in module.VARIANTS if not _VARIANTS.value or v in _VARIANTS.value]
  metrics = {t: m for t, m in module.METRICS.items() if not _TASKS.value or t in _TASKS.value}
  records = gather(runs, base, metrics)
  settings = getattr(module, 'SETTINGS', {})
  command = ' '.join(['python experiments/ablation.py', *sys.argv[1:]])
  paths = write_outputs(records, _OUT.value or base, variants=variants, labels=module.LABELS,
                        metrics=metrics, settings=settings, command=command)
  print(paths['md'].read_text())
  for p in paths.values():
    print(p)
  return 0


if __name__ == '__main__':
  app.run(main)
