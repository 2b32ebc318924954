"""The ablation study (configs/ablation.py, experiments/ablation.py, attn_jax.experiment.
ablation_eval and ablation_report): its two phases cover every cell, its arguments are checked,
the learning-rate choice and the table follow from the runs' scores, the real-data task trains
and scores on a generated text, and the study command runs both phases in parallel shares."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attn_jax.experiment import ablation_eval, ablation_report, run, stats, sweep

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


def test_phases_cover_every_cell_and_shards_keep_a_cells_seeds_together():
  m = config_module
  cells = m.cells()
  assert len(cells) == len(m.STUDY_TASKS) * len(m.VARIANTS) - len(m.SKIPPED)
  assert {'latent', 'differential', 'gated', 'value_residual', 'talking_heads',
          'memory_kv'} <= set(m.VARIANTS)
  tune = sweep.parse_sweep(m.sweep())
  assert m.TUNE_ON['sort'] == 'reverse'  # sort takes the rates reverse chose
  assert {(k['task'], k['variant'], k['seed'], k['lr'])
          for k in map(study.run_keys, tune)} == {
              (t, v, m.TUNE_SEED, lr) for t, v in cells for lr in m.LR_SCALES
              if t in ('reverse', 'bible')}
  choice = {f'{t}/{v}': 2.0 if v == 'rope' else 0.5 for t, v in cells if t != 'sort'}
  final = sweep.parse_sweep(m.final_sweep(choice))
  assert len(final) == len(cells) * len(m.SEEDS)
  assert m.TUNE_SEED not in {study.run_keys(r)['seed'] for r in final}
  assert {study.run_keys(r)['lr'] for r in final if 'rope' in r.name} == {2.0}
  assert {study.run_keys(r)['lr'] for r in final if r.name.startswith('sort_')} == {0.5, 2.0}
  shares = [study.shard(final, k, 2) for k in range(2)]
  assert sorted(r.name for s in shares for r in s) == sorted(r.name for r in final)
  for share in shares:
    assert study.run_keys(share[0])['task'] == 'bible'  # budgeted runs first
    for i in range(0, len(share), 3):  # a cell's seeds together, one after another
      keys = [study.run_keys(r) for r in share[i:i + 3]]
      assert [k['seed'] for k in keys] == list(m.SEEDS)
      assert len({(k['task'], k['variant']) for k in keys}) == 1
  with pytest.raises(ValueError, match='no learning rate chosen'):
    m.final_sweep({})
  picked = study.select_runs(final, tasks=['sort'], variants=['rope'], extra_arg='smoke')
  assert [r.arg for r in picked] == [f'task=sort,variant=rope,seed={s},lr=2,smoke'
                                     for s in m.SEEDS]


def test_config_arguments_set_rate_budget_and_data_and_refuse_bad_ones():
  m = config_module
  c = m.get_config('task=bible,variant=latent,seed=1,lr=2')
  assert c.optim.learning_rate == pytest.approx(2 * m.BASE_LR['bible'])
  assert c.train.budget_minutes == m.BUDGET_MINUTES and c.train.seed == 1
  assert c.data.local.test.endswith('data/bible/test.en') and c.data.tokenizer.kind == 'char'
  assert (c.model.attention.kind, c.model.positional) == ('latent', 'rope')
  assert c.model.attention.kv_lora_rank == m.LM_MODEL['d_model'] // 2
  sort = m.get_config('task=sort,variant=talking_heads,lr=0.5')
  assert sort.data.algorithmic.num_symbols == 40 and sort.train.num_steps == m.STEPS
  assert sort.data.algorithmic.num_validation == m.EVAL_EXAMPLES
  assert not sort.eval.exact_match  # scored once after training, by ablation_eval
  for arg, message in [('task=bible,variant=backward_aggregation', 'does not apply'),
                       ('lr=0', 'lr=0.0'), ('variant=gated2', 'variant'),
                       ('task=reverse,learning_rate=1', 'unknown config arg')]:
    with pytest.raises(ValueError, match=message):
      m.get_config(arg)


def _record(task, variant, seed, lr, value, phase='final', n=2000):
  score = 'bpc' if task == 'bible' else 'exact'
  label = next(iter(config_module.METRICS[task]))
  examples = [1.0] * int(value * n) + [0.0] * (n - int(value * n))
  return {'name': f'{task}_{variant}_{seed}', 'task': task, 'variant': variant, 'seed': seed,
          'lr': lr, 'phase': phase, 'status': 'done', 'metrics': {label: value},
          'se': {label: ablation_report.run_se(score, examples, None)},
          'examples': {label: {'values': examples, 'weights': None}}, 'tune_score': value,
          'num_params': 1000, 'steps_per_second': 10.0, 'train_steps': 700, 'wall_s': 30.0}


def test_learning_rate_choice_intervals_and_table_from_given_scores(tmp_path):
  tune = [_record('reverse', 'baseline', 100, lr, v, 'tune')
          for lr, v in ((0.5, 0.4), (1.0, 0.6), (2.0, 0.6))]
  tune += [_record('bible', 'baseline', 100, lr, v, 'tune') for lr, v in ((0.5, 2.1), (2.0, 2.0))]
  choice, tuning = ablation_report.choose_learning_rates(tune, config_module.TUNE_METRICS,
                                                         config_module.LR_SCALES)
  # reverse: a tie of 1 and 2 goes to the factor nearer 1; bible: lower bits are better.
  assert choice == {'reverse/baseline': 1.0, 'bible/baseline': 2.0}
  assert tuning['reverse/baseline'] == {'0.5': 0.4, '1': 0.6, '2': 0.6}

  final = [_record('reverse', 'baseline', s, 1.0, v) for s, v in enumerate((0.50, 0.52, 0.54))]
  final += [_record('reverse', 'rope', s, 2.0, v) for s, v in enumerate((0.88, 0.90, 0.91))]
  final += [_record('reverse', 'gqa', s, 1.0, v) for s, v in enumerate((0.40, 0.56, 0.60))]
  metrics = {'reverse': {'exact, 1-20': ('validation', 'exact')}}
  paths = ablation_report.write_outputs(
      tune + final, tmp_path, variants=['baseline', 'rope', 'gqa'],
      labels=config_module.LABELS, metrics=metrics, settings={'seeds': '0, 1, 2'},
      command='python experiments/ablation.py', provenance={'git_revision': 'abc'},
      lr_choice=choice, tuning=tuning)
  saved = json.loads(paths['json'].read_text())
  rope = saved['aggregate']['rope']['reverse']['metrics']['exact, 1-20']
  mean, half = stats.t_interval([0.88, 0.90, 0.91])
  assert rope['mean'] == pytest.approx(mean) and rope['ci95'] == pytest.approx(
      [mean - half, mean + half])
  assert rope['seeds'] == [0, 1, 2] and rope['vs_baseline']['significant']
  gqa = saved['aggregate']['gqa']['reverse']['metrics']['exact, 1-20']
  assert not gqa['vs_baseline']['significant']  # its seeds span the baseline's
  assert rope['per_run_se'][0] == pytest.approx(np.sqrt(0.88 * 0.12 / 2000), rel=1e-3)
  assert saved['provenance'] == {'git_revision': 'abc'} and saved['lr_choice'] == choice
  assert {r['seed'] for r in saved['runs'] if r['phase'] == 'tune'} == {100}
  assert all('examples' not in r for r in saved['runs'])
  table = paths['md'].read_text()
  assert '| RoPE | 0.897 ± ' in table and ' ▲ |' in table
  gqa_row = next(line for line in table.splitlines() if line.startswith('| GQA'))
  assert gqa_row.startswith('| GQA, 2 key/value heads | 0.520 ± ') and '▼' not in gqa_row
  assert 'per-run standard error from the eval examples, median 0.0' in table
  assert paths['png'].stat().st_size > 10_000


def test_bible_task_trains_and_scores_on_a_generated_text(tmp_path):
  """The real-data task end to end on a small generated text (CI has no apt): training at its
  smoke size, then the per-row bits per character on both eval splits."""
  words = ['and', 'the', 'lord', 'said', 'unto', 'him', 'in', 'the', 'beginning', 'light']
  rng = np.random.default_rng(0)
  text = tmp_path / 'verses.txt'
  text.write_text('\n'.join(' '.join(rng.choice(words, size=12)).capitalize() + '.'
                            for _ in range(120)) + '\n', encoding='utf-8')
  config = config_module.get_config('task=bible,variant=gated,seed=0,smoke')
  with config.unlocked():
    config.data.local.train = str(text)
    config.data_dir = str(tmp_path / 'tfds')
  workdir = tmp_path / 'bible_gated'
  run.train_and_evaluate(config, workdir)
  scored = ablation_eval.evaluate_run(workdir)
  for split in ('validation', 'test'):
    per_row = scored['splits'][split]
    assert len(per_row['bpc']) == len(per_row['weights']) == scored['summary'][split]['n'] > 0
    assert 0.0 < scored['summary'][split]['bpc'] < 12.0  # below log2(vocabulary) plus slack
  assert ablation_eval.evaluate_run(workdir) == scored  # cached: read back, not recomputed
  runs = sweep.parse_sweep([{'arg': 'task=bible,variant=gated,seed=0,lr=1,smoke',
                             'name': 'bible_gated'}])
  (record,) = study.gather(runs, tmp_path, config_module, 'final')
  assert record['status'] == 'done' and record['num_params'] > 1000
  assert record['metrics']['test bits/char'] == scored['summary']['test']['bpc']
  assert record['se']['test bits/char'] > 0


FAKE_TRAIN = '''
"""Writes what experiments/train.py and the scoring would: config, data meta, metrics, DONE
with the final validation score that chooses the rate, and the per-example scores; the scores
are best at lr=2 (and grow with the seed)."""
import json, os, pathlib
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config')
_WORKDIR = flags.DEFINE_string('workdir', None, '')


def main(argv):
  config, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  (workdir / 'data_meta.json').write_text(json.dumps(
      {'task': 'seq2seq', 'input_vocab_size': 44, 'target_vocab_size': 44, 'max_length': 41}))
  (workdir / 'env.json').write_text(json.dumps({
      'parent': os.getppid(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'cache': os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}))
  lr, seed = config.optim.learning_rate / 3e-3, config.train.seed
  exact = [1.0] * int(100 * (0.3 + 0.1 * (lr == 2) + 0.02 * (seed % 10))) + [0.0] * 50
  splits = ['validation', 'test']
  scores = {s: {'exact': exact, 'tokens': [0.5] * len(exact)} for s in splits}
  summary = {s: {'exact': sum(exact) / len(exact), 'tokens': 0.5, 'n': len(exact)}
             for s in scores}
  (workdir / 'ablation_eval.json').write_text(json.dumps({
      'key': {'step': 1, 'splits': splits},
      'result': {'step': 1, 'task': 'seq2seq', 'splits': scores, 'summary': summary}}))
  (workdir / 'metrics.jsonl').write_text(
      json.dumps({'step': 1, 'time': 1.0, 'train/steps_per_second': 10.0}) + '\\n')
  final = {'validation/tf_sequence_accuracy': summary['validation']['exact']}
  (workdir / 'DONE').write_text(json.dumps({'step': 1, 'final': final}))


app.run(main)
'''


def test_study_command_tunes_then_runs_the_chosen_rates_in_two_shares(tmp_path):
  fake = tmp_path / 'fake_train.py'
  fake.write_text(textwrap.dedent(FAKE_TRAIN))
  base, out = tmp_path / 'study', tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  result = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'ablation.py'), f'--workdir={base}',
       f'--out={out}', '--tasks=sort', '--variants=baseline,rope', f'--train_script={fake}',
       '--jobs=2'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  choice = json.loads((base / study.CHOICE_FILE).read_text())['choice']
  assert choice == {'reverse/baseline': 2.0, 'reverse/rope': 2.0}  # sort's rates: reverse's
  assert not list(base.glob('sort_*_seed100'))
  finals = [f'sort_{v}_lr2_seed{s}' for v in ('baseline', 'rope') for s in (0, 1, 2)]
  envs = {n: json.loads((base / n / 'env.json').read_text()) for n in finals}
  for variant in ('baseline', 'rope'):  # a cell's seeds launched by the same share
    assert len({envs[f'sort_{variant}_lr2_seed{s}']['parent'] for s in (0, 1, 2)}) == 1
  assert envs['sort_baseline_lr2_seed0']['parent'] != envs['sort_rope_lr2_seed0']['parent']
  for e in envs.values():
    assert '--xla_cpu_multi_thread_eigen=false' in e['xla_flags']
    assert e['cache'] == str((base / 'jax_cache').resolve())
  saved = json.loads((out / 'ablation.json').read_text())
  exact = saved['aggregate']['rope']['sort']['metrics']['exact, 1-20']
  assert exact['values'] == pytest.approx([(40 + 2 * s) / (90 + 2 * s) for s in (0, 1, 2)])
  assert len(exact['ci95']) == 2 and 'provenance' in saved
  assert {r['seed'] for r in saved['runs']} == {0, 1, 2, 100}
  assert (base / 'summary.csv').exists() and (out / 'ablation.png').exists()
