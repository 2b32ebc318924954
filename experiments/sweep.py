r"""Runs the `sweep()` of a config file, one training process per entry, then a summary table.

  python experiments/sweep.py --config configs/algorithmic.py --base_workdir /tmp/sweep
  python experiments/sweep.py --config configs/algorithmic.py --base_workdir /tmp/sweep \
      --only reverse_rnn_lr0.001,copy_transformer --dry_run > jobs.txt  # a command per line
  python experiments/sweep.py --config configs/translation.py --base_workdir /tmp/mt \
      --override data.local.train=/data/train --override data.local.validation=/data/dev ...

On a SLURM cluster, as one job array through submitit (settings from the config's
`cluster()` and `--cluster field=value`; see attn_jax.experiment.cluster):

  python experiments/sweep.py --config configs/ablation.py --base_workdir /shared/ablation \
      --launcher=slurm --cluster partition=gpu --cluster gpus_per_node=1 \
      --cluster "setup=source $PWD/.venv/bin/activate"

`--launcher=submitit_local` runs the same array through submitit's local executor.

Runs go one after another in BASE/NAME (or as array tasks); a finished run (DONE file) is
skipped, an unfinished one is launched again and resumes from its checkpoint, a crashed one is
reported (FAILED, BASE/NAME/sweep.log) and the sweep goes on. After running, BASE/summary.csv and
BASE/summary.md list each run's status and final/best eval metrics (see attn_jax.experiment.sweep).
SIGTERM (a preempted sweep job) is passed to the current run, which checkpoints; no further
run starts and the exit code is 143. Otherwise the exit code is 1 if any selected run failed.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from attn_jax.experiment import cli, cluster, sweep

_CONFIG = flags.DEFINE_string('config', None, 'config file defining sweep()', required=True)
_BASE = flags.DEFINE_string('base_workdir', None, 'runs go to BASE/NAME', required=True)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'print the commands of unfinished runs only')
_ONLY = flags.DEFINE_list('only', [], 'run names to restrict the sweep to')
_TRAIN_SCRIPT = flags.DEFINE_string('train_script', sweep.DEFAULT_TRAIN_SCRIPT,
                                    'script launched per run')
_PYTHON = flags.DEFINE_string('python', sys.executable, 'interpreter for the train script')
_OVERRIDE = flags.DEFINE_multi_string(
    'override', [], 'field=value added to every run as --config.field=value (repeatable), '
    'e.g. --override data.local.train=/data/train')
_SUMMARY_METRICS = flags.DEFINE_list(
    'summary_metrics', None, 'eval metrics in the summary table (default: all), e.g. '
    'validation/sequence_accuracy,test/loss')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False, 'only (re)write the summary table')
_LAUNCHER = flags.DEFINE_enum(
    'launcher', 'here', ['here', 'slurm', 'submitit_local'],
    'here: one run after another in this process; slurm: a job array through submitit; '
    'submitit_local: the same array as local processes')
_CLUSTER = flags.DEFINE_multi_string(
    'cluster', [], 'field=value of attn_jax.experiment.cluster.ClusterSettings (repeatable), '
    'over the config\'s cluster(); e.g. --cluster partition=gpu --cluster time_minutes=600')
_WAIT = flags.DEFINE_bool('wait', True, 'with a cluster launcher: wait for the tasks, resubmit '
                          'unfinished runs and write the summary (else submit and exit)')


def _cluster_overrides(items: list[str]) -> dict:
  """`['partition=gpu', 'gpus_per_node=1']` -> typed values for ClusterSettings."""
  types = {f.name: f.type for f in cluster.dataclasses.fields(cluster.ClusterSettings)}
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or key not in types:
      raise app.UsageError(f'--cluster {item!r}: want field=value with field in {sorted(types)}')
    kind = str(types[key])
    out[key] = (int(value) if kind == 'int' else float(value) if kind == 'float'
                else value)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common = sweep.parse_common_overrides(_OVERRIDE.value)
  runs = sweep.load_sweep(_CONFIG.value, common_overrides=common)
  statuses, exit_code = {}, 0
  if _LAUNCHER.value != 'here' and not _SUMMARY_ONLY.value and not _DRY_RUN.value:
    settings = cluster.settings(sweep.load_config_module(_CONFIG.value),
                                _cluster_overrides(_CLUSTER.value))
    statuses = cluster.run_sweep_on_cluster(
        runs, config_path=_CONFIG.value, base_workdir=_BASE.value, cluster=settings,
        launcher='slurm' if _LAUNCHER.value == 'slurm' else 'local',
        train_script=_TRAIN_SCRIPT.value, python=_PYTHON.value, only=_ONLY.value,
        common_overrides=common, wait=_WAIT.value)
    if not _WAIT.value:
      return 0
  elif not _SUMMARY_ONLY.value:
    try:
      statuses = sweep.run_sweep(
          runs, config_path=_CONFIG.value, base_workdir=_BASE.value,
          train_script=_TRAIN_SCRIPT.value, python=_PYTHON.value, only=_ONLY.value,
          dry_run=_DRY_RUN.value, common_overrides=common)
    except sweep.SweepInterrupted as e:
      logging.warning('%s', e)
      statuses, exit_code = e.statuses, 128 + e.signum
  if _DRY_RUN.value:
    return 0
  csv_path, md_path = sweep.write_summary(runs, _BASE.value, _SUMMARY_METRICS.value)
  print(md_path.read_text(), end='')
  logging.info('summary written to %s and %s', csv_path, md_path)
  if exit_code:
    return exit_code
  failed = [name for name, status in statuses.items() if status == 'failed']
  if failed:
    logging.error('%d run(s) failed: %s', len(failed), failed)
    return 1
  return 0


if __name__ == '__main__':
  cli.run(main)
