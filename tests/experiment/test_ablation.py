"""The ablation study (configs/ablation.py, experiments/ablation.py): its smoke runs train and
gather into the table, JSON and figure; the study command runs its shares in parallel (seeds
of a variant in one share, after each other) and records each run's time."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from attn_jax.experiment import run, sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'configs' / 'ablation.py'


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The study script defines absl flags: load it once per session.
study = _load('ablation_study', ROOT / 'experiments' / 'ablation.py')
config_module = _load('configs_ablation', CONFIG)


def test_sweep_covers_every_task_variant_and_seed_and_shards_keep_seeds_together():
  runs = sweep.load_sweep(str(CONFIG), check=False)
  assert len(runs) == len(config_module.TASKS) * len(config_module.VARIANTS) * 2 == 120
  keys = [study.run_keys(r) for r in runs]
  assert {(k['task'], k['variant'], k['seed']) for k in keys} == {
      (t, v, s) for t in config_module.TASKS for v in config_module.VARIANTS for s in (0, 1)}
  shares = [study.shard(runs, k, 2) for k in range(2)]
  assert sorted(r.name for share in shares for r in share) == sorted(r.name for r in runs)
  for share in shares:  # seed 1 right after seed 0 of the same variant, in the same share
    for first, second in zip(share[::2], share[1::2], strict=True):
      a, b = study.run_keys(first), study.run_keys(second)
      assert (a['task'], a['variant'], a['seed'], b['seed']) == (b['task'], b['variant'], 0, 1)
  smoke = study.select_runs(runs, tasks=['sort'], variants=['rope'], seeds=['1'],
                            extra_arg='smoke')
  assert [(r.name, r.arg) for r in smoke] == [('sort_rope_seed1',
                                               'task=sort,variant=rope,seed=1,smoke')]
  with pytest.raises(ValueError, match='no run of the sweep is selected'):
    study.select_runs(runs, tasks=['copy'])


def test_smoke_runs_gather_into_table_json_and_figure(tmp_path):
  base = tmp_path / 'study'
  data_dir = tmp_path / 'tfds'
  trained = [('sort', 'baseline'), ('listops', 'linear')]  # the two cheapest to compile
  for task, variant in trained:
    config = config_module.get_config(f'task={task},variant={variant},seed=0,smoke')
    config.data_dir = str(data_dir)
    run.train_and_evaluate(config, base / config_module.run_name(task, variant, 0))
  runs = study.select_runs(sweep.load_sweep(str(CONFIG), check=False),
                           tasks=['sort', 'listops'], variants=['baseline', 'linear'],
                           seeds=['0'])
  metrics = {t: config_module.METRICS[t] for t in ('sort', 'listops')}
  records = study.gather(runs, base, metrics)
  status = {r['name']: r['status'] for r in records}
  assert status == {'sort_baseline_seed0': 'done', 'sort_linear_seed0': 'missing',
                    'listops_baseline_seed0': 'missing', 'listops_linear_seed0': 'done'}
  done = [r for r in records if r['status'] == 'done']
  assert all(r['num_params'] > 1000 and r['steps_per_second'] > 0 for r in done)
  assert all(0.0 <= v <= 1.0 for r in done for v in r['metrics'].values())

  paths = study.write_outputs(records, tmp_path / 'out', variants=['baseline', 'linear'],
                              labels=config_module.LABELS, metrics=metrics,
                              settings=config_module.SETTINGS, command='python ... --arg=smoke')
  table = paths['md'].read_text()
  assert '2 of 4 runs finished' in table
  rows = [line for line in table.splitlines() if line.startswith('| ')]
  assert rows[0] == ('| variant | sort | listops | params (sort) | params (listops) | '
                     'steps/s (sort) | steps/s (listops) |')
  assert rows[1].startswith(f"| {config_module.LABELS['baseline']} | ")
  assert rows[2].startswith(f"| {config_module.LABELS['linear']} | ")
  saved = json.loads(paths['json'].read_text())
  assert set(saved['aggregate']) == {'baseline', 'linear'}
  assert saved['aggregate']['linear']['listops']['metrics']['accuracy']['seeds'] == [
      next(r for r in done if r['task'] == 'listops')['metrics']['accuracy']]
  assert paths['png'].stat().st_size > 10_000


FAKE_TRAIN = '''
"""Writes what experiments/train.py would: the real config, data meta, metrics, DONE."""
import json, os, pathlib, sys
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config')
_WORKDIR = flags.DEFINE_string('workdir', None, '')


def main(argv):
  config, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'data_meta.json').write_text(json.dumps(
      {'task': 'seq2seq', 'input_vocab_size': 14, 'target_vocab_size': 14, 'max_length': 21}))
  (workdir / 'env.json').write_text(json.dumps({
      'parent': os.getppid(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'cache': os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}))
  final = {'test/sequence_accuracy': 0.5 + 0.25 * config.train.seed}
  (workdir / 'metrics.jsonl').write_text(
      json.dumps({'step': 1, 'time': 1.0, 'train/steps_per_second': 10.0}) + '\\n'
      + json.dumps({'step': 1, 'time': 2.0, **final}) + '\\n')
  (workdir / 'DONE').write_text(json.dumps({'step': 1, 'final': final}))


app.run(main)
'''


def test_study_command_runs_two_shares_and_gathers(tmp_path):
  fake = tmp_path / 'fake_train.py'
  fake.write_text(textwrap.dedent(FAKE_TRAIN))
  base, out = tmp_path / 'study', tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  result = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'ablation.py'), f'--workdir={base}',
       f'--out={out}', '--tasks=sort', '--variants=baseline,rope', f'--train_script={fake}',
       '--jobs=2'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  names = [f'sort_{v}_seed{s}' for v in ('baseline', 'rope') for s in (0, 1)]
  envs = {n: json.loads((base / n / 'env.json').read_text()) for n in names}
  for variant in ('baseline', 'rope'):  # both seeds launched by the same share
    assert envs[f'sort_{variant}_seed0']['parent'] == envs[f'sort_{variant}_seed1']['parent']
  assert envs['sort_baseline_seed0']['parent'] != envs['sort_rope_seed0']['parent']
  for e in envs.values():
    assert '--xla_cpu_multi_thread_eigen=false' in e['xla_flags']
    assert e['cache'] == str((base / 'jax_cache').resolve())
  for n in names:
    timing = json.loads((base / n / study.TIMING_FILE).read_text())
    assert timing['wall_s'] > 0 and not timing['resumed']
  saved = json.loads((out / 'ablation.json').read_text())
  exact = saved['aggregate']['rope']['sort']['metrics']['exact match']
  assert exact['mean'] == pytest.approx(0.625) and exact['spread'] == pytest.approx(0.125)
  assert saved['aggregate']['rope']['sort']['num_params'] > 1000
  assert (base / 'summary.csv').exists() and (out / 'ablation.png').exists()
  assert '0.625 ± 0.125' in (out / 'ablation.md').read_text()
