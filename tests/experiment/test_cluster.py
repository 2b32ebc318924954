"""Sweeps on a cluster through submitit (`attn_jax.experiment.cluster`), end to end on
submitit's local executor: the sweep's entries go out as one job array of `fake_train.py`
runs; finished runs are not submitted, preempted ones are submitted again and resume, a crash
is reported, and the summary is written when the tasks end."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from attn_jax.experiment import cluster, sweep

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
CONFIG = str(FIXTURES / 'sweep_config.py')
FAKE_TRAIN = str(FIXTURES / 'fake_train.py')
REPO = pathlib.Path(__file__).parents[2]


def _launches(workdir: pathlib.Path) -> int:
  path = workdir / 'launches.txt'
  return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_job_array_skips_finished_resubmits_preempted_and_reports_crashes(tmp_path):
  module = sweep.load_config_module(CONFIG)
  runs = sweep.parse_sweep(
      [{'arg': 'model=rnn', 'name': 'finished'},
       {'arg': 'model=rnn', 'overrides': {'fake.preempt_launches': 1}, 'name': 'preempted'},
       {'arg': 'model=transformer', 'overrides': {'fake.fail_at_step': 2,
                                                  'fake.fail_launches': 9}, 'name': 'crashes'},
       {'arg': 'model=transformer,steps=4', 'name': 'fresh'}], get_config=module.get_config)
  (tmp_path / 'finished').mkdir()
  (tmp_path / 'finished' / 'DONE').write_text('earlier\n')
  settings = cluster.settings(module, {'poll_seconds': 0.2, 'max_resubmits': 2})
  assert (settings.time_minutes, settings.cpus_per_task) == (30, 1)  # from the config's cluster()

  statuses = cluster.run_sweep_on_cluster(
      runs, config_path=CONFIG, base_workdir=tmp_path, cluster=settings, launcher='local',
      train_script=FAKE_TRAIN)

  assert statuses == {'finished': 'done', 'preempted': 'done', 'crashes': 'failed',
                      'fresh': 'done'}
  assert [_launches(tmp_path / n) for n in ('finished', 'preempted', 'crashes', 'fresh')] == [
      0, 2, 1, 1]  # the preempted run went out twice; the crash was not retried
  records = map(json.loads, (tmp_path / 'preempted' / 'metrics.jsonl').read_text().splitlines())
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]  # resumed
  rounds = [json.loads(line) for line in (tmp_path / cluster.JOBS_FILE).read_text().splitlines()]
  assert sorted((r['round'], r['run']) for r in rounds) == [
      (0, 'crashes'), (0, 'fresh'), (0, 'preempted'), (1, 'preempted')]
  assert 'exit code 3' in (tmp_path / 'crashes' / 'FAILED').read_text()


def test_sweep_cli_submits_through_submitit_and_writes_the_summary(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/sweep.py', f'--config={CONFIG}',
       f'--base_workdir={tmp_path}', f'--train_script={FAKE_TRAIN}',
       '--launcher=submitit_local', '--cluster', 'poll_seconds=0.2', '--only',
       'model=rnn+learning_rate=0.002'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert (tmp_path / 'model=rnn+learning_rate=0.002' / 'DONE').exists()
  assert 'model=rnn+learning_rate=0.002' in (tmp_path / 'summary.md').read_text()


@pytest.mark.parametrize('overrides, message', [
    ({'partitionn': 'gpu'}, r"unknown field\(s\) \['partitionn'\]"),
    ({'time_minutes': 0}, 'time_minutes=0 must be >= 1'),
    ({'extra': ('constraint',)}, "'key=value'"),
])
def test_bad_cluster_settings_are_refused_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    cluster.settings(sweep.load_config_module(CONFIG), overrides)


def test_multihost_sbatch_script_gives_every_task_the_jax_runtime_variables(tmp_path):
  """The SLURM example starts one `train.py` per task with JAX's coordinator, process count
  and rank; stand-ins for `scontrol` and `srun` run the tasks here and record them."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'scontrol').write_text('#!/bin/bash\nprintf "node7\\nnode8\\n"\n')
  # srun: run the command once per task with SLURM_PROCID set; python: print what it got.
  (bin_dir / 'srun').write_text(
      '#!/bin/bash\nshift\nfor i in 0 1; do SLURM_PROCID=$i "$@"; done\n')
  (bin_dir / 'python').write_text(
      '#!/bin/bash\necho "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*"\n')
  for script in bin_dir.iterdir():
    script.chmod(0o755)
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'SLURM_JOB_NODELIST': 'node[7-8]',
         'SLURM_NTASKS': '2'}
  proc = subprocess.run(
      ['bash', 'experiments/slurm/multihost.sbatch', 'configs/translation.py:model=base',
       '/shared/run', '--config.train.num_steps=10'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert [line.split()[:3] for line in lines] == [['node7:12345', '2', '0'],
                                                  ['node7:12345', '2', '1']]
  for line in lines:
    assert line.endswith('experiments/train.py --config configs/translation.py:model=base '
                         '--workdir /shared/run --config.parallel.mode=sharded '
                         '--config.train.num_steps=10')
