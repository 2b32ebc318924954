r"""Ablation study (issues #13, #26): train every run of configs/ablation.py (or resume the
unfinished ones), score each, choose each cell's learning rate, then gather the reported runs
into a table, a JSON file and a figure.

  PYTHONPATH=$PWD python experiments/ablation.py --workdir runs/ablation \
      --out experiments/figures

Two phases, each through `attn_jax.experiment.sweep` (a finished run, with a DONE file, is
skipped; an unfinished one resumes from its checkpoint; a crash is recorded and the study goes
on), `--jobs` processes at a time (default 2, one per core of a 2-core CPU: each runs XLA
single-threaded, `--xla_cpu_multi_thread_eigen=false`):

  1. tuning: `sweep()`, every variant of the tuning tasks (the config's `TUNE_ON`) at each
     learning-rate factor on the tuning seed; then `--workdir/lr_choice.json`, each one's best
     factor on its validation score;
  2. final: `final_sweep(choice)`, every cell at its chosen factor on the reported seeds.

After training, each run is scored in the job that trained it (`ablation_eval.evaluate_run`:
whole eval splits, per example; cached in the run's workdir). The runs of one cell (and rate)
go to the same job, one after another, so later seeds find the first one's compiled programs
in the persistent compilation cache (`--workdir/jax_cache`); the Bible runs go first in each
job, so every wall-clock budget runs beside another job, as the others do.

Then it writes `--workdir/summary.{csv,md}` and, to `--out`: ablation.md (the table: mean ±
95% t half-width over seeds, ▲/▼ where Holm-significant against the baseline; the noise per
column), ablation.json (every run with its seed, lr and scores and their standard errors;
each cell's mean, `ci95`, bootstrap interval and comparison with the baseline; the
learning-rate choice and tuning scores; the provenance record) and ablation.png.

`--gather_only` only rewrites those from the runs there are; `--tasks`, `--variants` select
part of the sweep; `--arg=smoke` appends to every run's config argument (a seconds-long check,
in its own --workdir); `--set field=value` is passed to every run (`--config.field=value`).
SIGTERM stops the study after the current runs have checkpointed; run it again to resume.
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

from attn_jax.experiment import ablation_eval, ablation_report, provenance, sweep, tasks
from attn_jax.experiment import config as experiment_config
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.train import state as state_lib
from attn_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]

TIMING_FILE = 'ablation_timing.json'
CHOICE_FILE = 'lr_choice.json'
CACHE_DIR = 'jax_cache'
SINGLE_THREAD_FLAG = '--xla_cpu_multi_thread_eigen=false'
PHASES = ('tune', 'final')
FIRST_TASKS = ('bible',)  # budgeted runs first in each job (see the module docstring)
# What `ablation_eval` scores per phase: a tuning run is chosen by its own final evaluation
# (`TUNE_METRICS`), so it decodes nothing more.
SCORED_SPLITS = {'tune': (), 'final': ('validation', 'test')}

_CONFIG = flags.DEFINE_string('config', 'configs/ablation.py', 'The study config (get_config, '
                              'sweep, final_sweep, cells, STUDY_TASKS, VARIANTS, LABELS, '
                              'METRICS, TUNE_METRICS, LR_SCALES); a relative path not '
                              'found here is taken from the repository root.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/ablation', 'Base workdir: <base>/<run name>.')
_OUT = flags.DEFINE_string('out', None, 'Where ablation.{md,json,png} go (default: --workdir).')
_JOBS = flags.DEFINE_integer('jobs', 2, 'Training processes at a time (1: sequential, with '
                             "XLA's default threads).")
_SHARD = flags.DEFINE_string('shard', '', 'Internal: "k/n", run the k-th of n job shares of '
                             '--phase and do not gather.')
_PHASE = flags.DEFINE_enum('phase', 'tune', PHASES, 'Internal: the phase a --shard runs.')
_GATHER_ONLY = flags.DEFINE_bool('gather_only', False, 'Only gather the runs there are.')
_TASKS = flags.DEFINE_list('tasks', None, 'Tasks to run and gather (default: all).')
_VARIANTS = flags.DEFINE_list('variants', None, 'Variants to run and gather (default: all).')
_ARG = flags.DEFINE_string('arg', '', 'Appended to every run\'s config arg, e.g. smoke.')
_SET = flags.DEFINE_multi_string('set', [], 'field=value for every run (--config.field=value).')
_TRAIN_SCRIPT = flags.DEFINE_string('train_script', str(ROOT / sweep.DEFAULT_TRAIN_SCRIPT),
                                    'Script launched per run.')


# --- Runs --------------------------------------------------------------------------------------


def run_keys(run: sweep.Run) -> dict[str, Any]:
  """`{'task', 'variant', 'seed', 'lr'}` of a run, from its config arg."""
  items = dict(item.split('=', 1) for item in run.arg.split(',') if '=' in item)
  return {'task': items['task'], 'variant': items['variant'], 'seed': int(items['seed']),
          'lr': float(items.get('lr', 1.0))}


def select_runs(runs: Sequence[sweep.Run], *, tasks=None, variants=None,
                extra_arg: str = '') -> list[sweep.Run]:
  """The runs of the chosen tasks/variants (None: all), with `extra_arg` appended to each
  config arg (names unchanged: give such runs their own workdir)."""
  chosen = []
  for run in runs:
    keys = run_keys(run)
    if (tasks and keys['task'] not in tasks) or (variants and keys['variant'] not in variants):
      continue
    arg = ','.join(p for p in (run.arg, extra_arg.strip()) if p)
    chosen.append(sweep.Run(name=run.name, arg=arg, overrides=run.overrides))
  if not chosen:
    raise ValueError(f'no run of the sweep is selected by tasks={tasks} variants={variants}')
  return chosen


def shard(runs: Sequence[sweep.Run], index: int, count: int) -> list[sweep.Run]:
  """Share `index` of `count`: runs of one cell and rate stay together (a later seed reuses
  the first's compiled programs), groups dealt out in turn, FIRST_TASKS' groups first."""
  groups: dict[tuple, list[sweep.Run]] = {}
  for run in runs:
    keys = run_keys(run)
    groups.setdefault((keys['task'], keys['variant'], keys['lr']), []).append(run)
  ordered = sorted(groups.values(), key=lambda g: run_keys(g[0])['task'] not in FIRST_TASKS)
  return [run for i, group in enumerate(ordered) if i % count == index for run in group]


def train_and_score(runs: Sequence[sweep.Run], *, config_path: str, base: pathlib.Path,
                    train_script: str, common: Mapping[str, str],
                    splits: tuple[str, ...] = SCORED_SPLITS['final']) -> dict[str, str]:
  """Trains the unfinished runs one after another (through `sweep.run_sweep`, which skips the
  finished ones) and scores each finished one on `splits` (`ablation_eval`), recording the
  wall times."""
  statuses = {}
  for run in runs:
    workdir = base / run.name
    before = sweep.run_status(workdir)
    start = time.time()
    statuses.update(sweep.run_sweep([run], config_path=config_path, base_workdir=base,
                                    train_script=train_script, common_overrides=common))
    trained = time.time()
    if statuses[run.name] != 'done':
      continue
    try:
      if splits:
        ablation_eval.evaluate_run(workdir, splits)
    except Exception:  # One run's evaluation must not stop the study; gather reports it.
      logging.exception('%s: the evaluation failed', run.name)
      continue
    if before != 'done':
      timing = {'train_s': trained - start, 'eval_s': time.time() - trained,
                'resumed': before != 'missing', 'jobs': _JOBS.value,
                'xla_flags': os.environ.get('XLA_FLAGS', '')}
      (workdir / TIMING_FILE).write_text(json.dumps(timing, indent=1) + '\n', encoding='utf-8')
  return statuses


def _child_env(base: pathlib.Path, jobs: int) -> None:
  """Environment every training process inherits: the shared compilation cache and, with
  several jobs, single-threaded XLA (one core each)."""
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str((base / CACHE_DIR).resolve()))
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  if jobs > 1 and SINGLE_THREAD_FLAG not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAG}".strip()


def _run_shards(jobs: int, phase: str) -> tuple[int, int | None]:
  """Launches `jobs` copies of this script, each on its share of `phase` (`--shard=k/n`),
  passing a SIGTERM on to them; returns the worst exit code and the signal received."""
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
                                     *sys.argv[1:], f'--shard={k}/{jobs}', f'--phase={phase}']))
    codes = [proc.wait() for proc in procs]
  finally:
    signal.signal(signal.SIGTERM, previous)
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return max(codes, key=abs), (received[0] if received else None)


# --- Gathering --------------------------------------------------------------------------------


def _median_steps_per_second(history: Sequence[Mapping[str, Any]]) -> float | None:
  """Median over the logged intervals (robust to the first, which includes compilation)."""
  speeds = [r['train/steps_per_second'] for r in history
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


def _evaluated(workdir: pathlib.Path) -> dict[str, Any] | None:
  path = workdir / ablation_eval.EVAL_FILE
  return json.loads(path.read_text(encoding='utf-8'))['result'] if path.exists() else None


def gather(runs: Sequence[sweep.Run], base: pathlib.Path, module, phase: str
           ) -> list[dict[str, Any]]:
  """One record per run: keys, phase, status, each table metric with that run's standard
  error (and per-example values), the tuning score, parameters, speed and wall time."""
  records, params = [], {}
  for run in runs:
    keys = run_keys(run)
    workdir = base / run.name
    status = sweep.run_status(workdir)
    done = workdir_lib.read_done(workdir) if status == 'done' else None
    evaluated = _evaluated(workdir) if status == 'done' else None
    if phase == 'final' and status == 'done' and evaluated is None:
      status = 'unscored'
    values, errors, examples = ablation_report.scores_of(evaluated, module.METRICS[keys['task']])
    tune = (done or {}).get('final', {}).get(module.TUNE_METRICS[keys['task']][0])
    timing_path = workdir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    history = read_metrics(workdir) if workdir.exists() else []
    cell = (keys['task'], keys['variant'])
    if done and params.get(cell) is None:  # every seed and rate builds the same model
      params[cell] = num_params(workdir)
    records.append({
        'name': run.name, **keys, 'phase': phase, 'status': status,
        'step': (done or {}).get('step'), 'metrics': values, 'se': errors,
        'examples': examples, 'tune_score': tune,
        'num_params': params.get(cell) if done else None,
        'steps_per_second': _median_steps_per_second(history),
        'train_steps': (done or {}).get('step'),
        'wall_s': (timing['train_s'] + timing['eval_s']) if timing else None,
    })
  return records


# --- Entry point -----------------------------------------------------------------------------


def _phase_runs(module, phase: str, base: pathlib.Path, common) -> list[sweep.Run]:
  """The selected runs of `phase` ('final' reads the learning rates chosen; 'tune' has the
  runs of the tasks whose tuning chooses the selected tasks' rates)."""
  tasks = _TASKS.value
  if phase == 'tune':
    entries = module.sweep()
    tasks = tasks and sorted({module.TUNE_ON[t] for t in tasks})
  else:
    choice = json.loads((base / CHOICE_FILE).read_text(encoding='utf-8'))['choice']
    only = {f'{t}/{v}' for t, v in module.cells()
            if (not _TASKS.value or t in _TASKS.value)
            and (not _VARIANTS.value or v in _VARIANTS.value)}
    entries = module.final_sweep(choice, only)
  runs = sweep.parse_sweep(entries, get_config=module.get_config, common_overrides=common)
  return select_runs(runs, tasks=tasks, variants=_VARIANTS.value, extra_arg=_ARG.value)


def _train_phase(module, phase: str, base: pathlib.Path, config_path: str, common) -> None:
  jobs = max(1, _JOBS.value)
  runs = _phase_runs(module, phase, base, common)
  if jobs == 1:
    train_and_score(runs, config_path=config_path, base=base,
                    train_script=_TRAIN_SCRIPT.value, common=common,
                    splits=SCORED_SPLITS[phase])
    return
  code, signum = _run_shards(jobs, phase)
  if signum is not None:
    raise sweep.SweepInterrupted(signum, {})
  if code:
    logging.warning('a job share exited with %d; going on with what finished', code)


def _choose(module, base: pathlib.Path, common) -> dict[str, Any]:
  """Chooses each cell's rate from the tuning runs; writes and returns `lr_choice.json`."""
  runs = _phase_runs(module, 'tune', base, common)
  records = gather(runs, base, module, 'tune')
  choice, tuning = ablation_report.choose_learning_rates(records, module.TUNE_METRICS,
                                                         module.LR_SCALES)
  chosen = {'choice': choice, 'tuning': tuning,
            'stability': ablation_report.rank_stability(tuning, module.LR_SCALES)}
  (base / CHOICE_FILE).write_text(json.dumps(chosen, indent=1) + '\n', encoding='utf-8')
  return chosen | {'records': records}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  path = pathlib.Path(_CONFIG.value)
  config_path = str(path if path.exists() else ROOT / path)
  module = sweep.load_config_module(config_path)
  common = sweep.parse_common_overrides(_SET.value)
  base = pathlib.Path(_WORKDIR.value)
  base.mkdir(parents=True, exist_ok=True)
  _child_env(base, max(1, _JOBS.value))
  if _SHARD.value:
    k, n = (int(x) for x in _SHARD.value.split('/'))
    runs = _phase_runs(module, _PHASE.value, base, common)
    train_and_score(shard(runs, k, n), config_path=config_path, base=base,
                    train_script=_TRAIN_SCRIPT.value, common=common,
                    splits=SCORED_SPLITS[_PHASE.value])
    return 0
  try:
    if not _GATHER_ONLY.value:
      _train_phase(module, 'tune', base, config_path, common)
    chosen = _choose(module, base, common)
    if not _GATHER_ONLY.value:
      _train_phase(module, 'final', base, config_path, common)
  except sweep.SweepInterrupted as e:  # The running trainings have checkpointed.
    logging.warning('%s', e)
    return 128 + e.signum
  final_runs = _phase_runs(module, 'final', base, common)
  sweep.write_summary(final_runs, base)
  tasks_ = [t for t in module.STUDY_TASKS if not _TASKS.value or t in _TASKS.value]
  variants = [v for v in module.VARIANTS if not _VARIANTS.value or v in _VARIANTS.value]
  records = chosen['records'] + gather(final_runs, base, module, 'final')
  command = ' '.join(['python experiments/ablation.py', *sys.argv[1:]])
  paths = ablation_report.write_outputs(
      records, _OUT.value or base, variants=variants, labels=module.LABELS,
      metrics={t: module.METRICS[t] for t in tasks_}, settings=getattr(module, 'SETTINGS', {}),
      command=command, provenance=provenance.collect(matmul=True),
      lr_choice=chosen['choice'], tuning=chosen['tuning'], stability=chosen['stability'])
  print(paths['md'].read_text())
  for p in paths.values():
    print(p)
  return 0


if __name__ == '__main__':
  app.run(main)
