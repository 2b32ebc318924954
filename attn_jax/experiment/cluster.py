"""Sweeps on a cluster: a config's `sweep()` as one SLURM job array, through submitit.

    python experiments/sweep.py --config configs/ablation.py --base_workdir /shared/ablation \
        --launcher=slurm --cluster partition=gpu --cluster gpus_per_node=1

Each unfinished entry of the sweep becomes one task of a job array (`submitit`, the scheduler
library of the FAIR codebases; no launcher of ours): the task runs the same training command
the local runner runs (`sweep.train_command`), in `BASE/<name>`, with its output in
`BASE/<name>/sweep.log`. What the local runner guarantees holds here too:

- a finished run (DONE) is never submitted again;
- a run that stopped without DONE (preempted, timed out: its training saved a checkpoint on
  SIGTERM, which the task forwards) is submitted again, up to `max_resubmits` rounds, and
  resumes from its checkpoint; a run that crashed (FAILED) is reported, not retried;
- when every task has ended, the summary (`BASE/summary.{csv,md}`) is written.

The executor settings come from the config file (a `cluster()` function beside `sweep()`
returning `ClusterSettings` fields) and the command line (`--cluster <field>=<value>`, which
win).
`launcher='local'` runs the same array through submitit's local executor (processes on this
machine): what the tests use, and a way to try a sweep before a cluster does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attn_jax.experiment import sweep

LAUNCHERS = ('slurm', 'local')
JOBS_FILE = 'submitit_jobs.jsonl'  # under BASE: every submitted task, one JSON line each


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
  """How a sweep's job array is submitted (SLURM names in comments).

  Attributes:
    partition, account, qos: `--partition`, `--account`, `--qos` ('' = the cluster's default).
    time_minutes: wall-clock limit of one task (`--time`); a longer run is resubmitted and
      resumes from its checkpoint.
    nodes, gpus_per_node, cpus_per_task, mem_gb: the task's resources (`mem_gb` 0 = default).
    array_parallelism: tasks of the array running at once (`--array=...%N`).
    max_resubmits: rounds in which runs that ended without DONE are submitted again.
    setup: shell lines run before each task (e.g. `source /path/.venv/bin/activate`).
    extra: more submitit `slurm_*` parameters as 'key=value' (e.g. 'constraint=a100').
    poll_seconds: how often the waiting driver checks the tasks.
  """
  partition: str = ''
  account: str = ''
  qos: str = ''
  time_minutes: int = 240
  nodes: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int = 4
  mem_gb: float = 0.0
  array_parallelism: int = 16
  max_resubmits: int = 2
  setup: tuple[str, ...] = ()
  extra: tuple[str, ...] = ()
  poll_seconds: float = 10.0

  def __post_init__(self):
    for name in ('time_minutes', 'nodes', 'cpus_per_task', 'array_parallelism'):
      if getattr(self, name) < 1:
        raise ValueError(f'cluster.{name}={getattr(self, name)} must be >= 1')
    for name in ('gpus_per_node', 'max_resubmits', 'mem_gb', 'poll_seconds'):
      if getattr(self, name) < 0:
        raise ValueError(f'cluster.{name}={getattr(self, name)} must be >= 0')
    for item in self.extra:
      if '=' not in item:
        raise ValueError(f"cluster.extra item {item!r} must be 'key=value'")


def settings(config_module: Any, overrides: Mapping[str, Any]) -> ClusterSettings:
  """`ClusterSettings` from the config module's `cluster()` (if it has one), then `overrides`
  (the command line's `--cluster <field>=<value>`); unknown fields raise, naming them."""
  fields = {f.name: f for f in dataclasses.fields(ClusterSettings)}
  values: dict[str, Any] = {}
  for where, given in (('cluster()', getattr(config_module, 'cluster', dict)()),
                       ('--cluster', overrides)):
    unknown = sorted(set(given) - set(fields))
    if unknown:
      raise ValueError(f'{where} sets unknown field(s) {unknown}; known: {sorted(fields)}')
    values.update(given)
  for name in ('setup', 'extra'):
    if isinstance(values.get(name), str):
      values[name] = tuple(s for s in values[name].split(';') if s.strip())
  return ClusterSettings(**values)


class TrainTask:
  """One sweep entry as a cluster task: the training command, run as the local runner runs it
  (`sweep.launch`: output to `sweep.log`, SIGTERM forwarded so that training checkpoints,
  FAILED on a crash). Returns the run's status afterwards."""

  def __init__(self, run: sweep.Run, cmd: list[str], workdir: str):
    self.run, self.cmd, self.workdir = run, list(cmd), workdir

  def __call__(self) -> str:
    status, _ = sweep.launch(self.run, self.cmd, pathlib.Path(self.workdir))
    return status

  def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
    """submitit's hook on a timeout: requeue this task; the training resumes from the
    checkpoint it saved when the forwarded SIGTERM stopped it."""
    del args, kwargs
    import submitit

    return submitit.helpers.DelayedSubmission(TrainTask(self.run, self.cmd, self.workdir))


def make_executor(launcher: str, folder: pathlib.Path, cluster: ClusterSettings):
  """A submitit executor for `launcher` ('slurm' or 'local') with `cluster`'s settings."""
  import submitit

  if launcher not in LAUNCHERS:
    raise ValueError(f'launcher={launcher!r} is not one of {LAUNCHERS}')
  executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher)
  params: dict[str, Any] = dict(
      name='attn_jax_sweep', timeout_min=cluster.time_minutes, nodes=cluster.nodes,
      gpus_per_node=cluster.gpus_per_node, cpus_per_task=cluster.cpus_per_task,
      slurm_array_parallelism=cluster.array_parallelism)
  if cluster.mem_gb:
    params['mem_gb'] = cluster.mem_gb
  for name in ('partition', 'account', 'qos'):
    if getattr(cluster, name):
      params[f'slurm_{name}'] = getattr(cluster, name)
  if cluster.setup:
    params['slurm_setup'] = list(cluster.setup)
  for item in cluster.extra:
    key, _, value = item.partition('=')
    params[f'slurm_{key.strip()}'] = value.strip()
  if launcher == 'local':  # the local executor takes only the generic parameters
    params = {k: v for k, v in params.items() if not k.startswith('slurm_')}
  executor.update_parameters(**params)
  return executor


def _submit(executor, tasks: Sequence[TrainTask], base: pathlib.Path, round_: int) -> list:
  with executor.batch():
    jobs = [executor.submit(task) for task in tasks]
  with (base / JOBS_FILE).open('a', encoding='utf-8') as f:
    for task, job in zip(tasks, jobs, strict=True):
      f.write(json.dumps({'round': round_, 'run': task.run.name, 'job_id': job.job_id,
                          'time': time.time()}) + '\n')
  logging.info('round %d: submitted %d task(s) as job array %s', round_, len(jobs),
               jobs[0].job_id.split('_')[0] if jobs else '-')
  return jobs


def _wait(jobs: Sequence[Any], poll_seconds: float) -> None:
  while not all(job.done() for job in jobs):
    time.sleep(poll_seconds)


def run_sweep_on_cluster(runs: Sequence[sweep.Run], *, config_path: str,
                         base_workdir: str | pathlib.Path, cluster: ClusterSettings,
                         launcher: str = 'slurm', train_script: str = sweep.DEFAULT_TRAIN_SCRIPT,
                         python: str | None = None, only: Iterable[str] | None = None,
                         common_overrides: Mapping[str, str] | None = None,
                         wait: bool = True) -> dict[str, str]:
  """Submits the unfinished runs as a job array, resubmits those that end without DONE (up to
  `cluster.max_resubmits` rounds) and returns `{name: status}` once every task has ended
  (with `wait=False`, right after the first submission: statuses as they were).

  Raises:
    ValueError: a bad launcher or setting, a missing train script (before any submission).
  """
  import sys

  python = python or sys.executable
  selected = sweep.select_runs(runs, only)
  if not pathlib.Path(train_script).is_file():
    raise ValueError(f'train script {train_script!r} does not exist (run from the repository '
                     'root or pass --train_script)')
  base = pathlib.Path(base_workdir)
  base.mkdir(parents=True, exist_ok=True)
  executor = make_executor(launcher, base / 'submitit', cluster)
  statuses = {run.name: sweep.run_status(base / run.name) for run in selected}
  for round_ in range(cluster.max_resubmits + 1):
    # Done: never again. Failed (a crash): reported, not retried. The rest (not started, or
    # stopped without DONE) is submitted; training resumes from its checkpoint.
    pending = [run for run in selected if statuses[run.name] in ('missing', 'running')]
    if not pending:
      break
    tasks = [TrainTask(run, sweep.train_command(
        run, config_path=config_path, base_workdir=base, train_script=train_script,
        python=python, common_overrides=common_overrides), str(base / run.name))
             for run in pending]
    jobs = _submit(executor, tasks, base, round_)
    if not wait:
      return statuses
    _wait(jobs, cluster.poll_seconds)
    for run, job in zip(pending, jobs, strict=True):
      try:
        job.result()
      except Exception as e:  # noqa: BLE001  the task itself died (scheduler, node): report
        logging.error('task of run %s (job %s) ended with an error: %s', run.name, job.job_id,
                      e)
      statuses[run.name] = sweep.run_status(base / run.name)
  unfinished = sorted(name for name, status in statuses.items() if status == 'running')
  if unfinished:
    logging.warning('%d run(s) still unfinished after %d round(s): %s', len(unfinished),
                    cluster.max_resubmits + 1, unfinished)
  return statuses
