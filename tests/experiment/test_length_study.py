"""The length study: per-length scores against hand-computed values, its table/plot writer on
synthetic results, attention grids, and a smoke run of experiments/length_study.py (all three
models, a few steps) followed by experiments/attention_maps.py on its workdirs."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from attn_jax.experiment import evaluation, length_study, plots

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_accuracy_by_length_hand_computed():
  # ids: 2 = EOS; symbols are >= 4. Lengths are source symbols before EOS.
  sources = [[4, 5, 2], [4, 6, 2], [4, 5, 6, 2], [7, 2]]
  targets = [[5, 4, 2], [6, 4, 2], [6, 5, 4, 2], [7, 2]]
  predictions = [[5, 4, 2],  # exact
                 [6, 5, 2],  # 2 of 3 tokens
                 [6, 5, 2],  # too short: 6, 5 right, EOS where 4 is due: 2 of 4
                 [7, 7, 7, 2]]  # too long: 7 right, 7 where EOS is due: 1 of 2
  rows = evaluation.accuracy_by_length(sources, predictions, targets)
  assert [r['length'] for r in rows] == [1, 2, 3]
  assert [r['count'] for r in rows] == [1, 2, 1]
  np.testing.assert_allclose([r['sequence_accuracy'] for r in rows], [0.0, 0.5, 0.0])
  np.testing.assert_allclose([r['token_accuracy'] for r in rows], [0.5, (1 + 2 / 3) / 2, 0.5])
  in_range = evaluation.summarize_length_range(rows, 1, 2)
  assert in_range['count'] == 3
  assert in_range['sequence_accuracy'] == pytest.approx(1 / 3)  # example-weighted
  assert in_range['token_accuracy'] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
  assert evaluation.summarize_length_range(rows, 4, 9) == {
      'count': 0, 'sequence_accuracy': 0.0, 'token_accuracy': 0.0}
  with pytest.raises(ValueError, match='expected one of each'):
    evaluation.accuracy_by_length(sources, predictions[:2], targets)


def _synthetic(models=('a', 'b'), lengths=range(1, 5), train=(1, 2)):
  results = {}
  for k, m in enumerate(models):
    rows = [{'length': n, 'count': 10 + n, 'sequence_accuracy': 1.0 / (n + k),
             'token_accuracy': 1.0 / (n + k) ** 0.5} for n in lengths]
    results[m] = {'arg': f'model={m}', 'step': 7, 'train_length': list(train),
                  'test_length': [1, max(lengths)], 'rows': rows,
                  'in_range': evaluation.summarize_length_range(rows, *train),
                  'out_of_range': evaluation.summarize_length_range(rows, train[1] + 1, 99),
                  'train_wall_s': 12.3, 'steps_per_second': 4.56, 'eval_wall_s': 1.0}
  return results


def test_write_outputs_on_synthetic_results(tmp_path):
  results = _synthetic()
  paths = length_study.write_outputs(results, tmp_path, labels={'a': 'Model A'},
                                     commands=['python x.py'], title='t')
  summary = json.loads(paths['json'].read_text())
  assert summary['train_length'] == [1, 2] and summary['commands'] == ['python x.py']
  assert summary['labels'] == {'a': 'Model A', 'b': 'b'}
  assert summary['models']['b']['rows'][2]['sequence_accuracy'] == pytest.approx(1 / 4)
  md = paths['md'].read_text().splitlines()
  # Summary row: in-range exact of 'a' = (1*11 + 0.5*12) / 23.
  assert md[2].startswith('| Model A | 0.739 |') and md[2].endswith('| 7 | 4.6 | 12 |')
  assert '| 3* | 13 | 0.333 | 0.577 | 0.250 | 0.500 |' in md
  assert '| 2 | 12 |' in '\n'.join(md)  # in range: no star
  rows = list(csv.DictReader(io.StringIO(paths['csv'].read_text())))
  assert len(rows) == 8 and rows[5] == {'model': 'b', 'length': '2', 'count': '12',
                                        'sequence_accuracy': repr(1 / 3),
                                        'token_accuracy': repr(1 / 3 ** 0.5)}
  assert paths['png'].stat().st_size > 5000
  bad = _synthetic()
  bad['b']['rows'][0]['count'] = 99
  with pytest.raises(ValueError, match='different test sets'):
    length_study.write_outputs(bad, tmp_path / 'bad')


def test_length_accuracy_figure_lines_axes_and_legend():
  results = {label: r['rows'] for label, r in _synthetic().items()}
  fig = plots.length_accuracy_figure(results, train_max=2, title='t')
  axes = fig.axes
  assert [ax.get_ylabel() for ax in axes] == list(plots.LENGTH_METRICS.values())
  assert all(ax.get_xlabel() == 'source length (symbols)' for ax in axes)
  for ax, key in zip(axes, plots.LENGTH_METRICS, strict=True):
    lines = ax.get_lines()
    assert [tuple(line.get_xdata()) for line in lines] == [(1, 2, 3, 4)] * 2
    np.testing.assert_allclose(lines[1].get_ydata(), [r[key] for r in results['b']])
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == ['training lengths 1-2', 'a', 'b']
  with pytest.raises(ValueError, match="model 'a' has no per-length rows"):
    plots.length_accuracy_figure({'a': []}, 2)


def test_attention_grid_rows_heads_and_checks():
  w2 = np.full((2, 3, 4), 0.25, np.float32)
  rows = [{'weights': w2, 'query_tokens': list('abc'), 'key_tokens': list('wxyz'),
           'name': 'cross layer 0', 'kind': 'cross'},
          {'weights': w2[:1, :, :2], 'query_tokens': list('abc'), 'key_tokens': list('wx'),
           'name': 'rnn', 'kind': 'rnn_attention'}]
  fig = plots.attention_grid_figure(rows, title='a long title ' * 20)
  panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_images()]
  assert [ax.get_title() for ax in panels] == ['cross layer 0, head 0', 'cross layer 0, head 1',
                                               'rnn']
  assert panels[0].get_xlabel() == plots.AXIS_NAMES['cross'][1]
  assert [t.get_text() for t in panels[2].get_xticklabels()] == ['w', 'x']
  assert '\n' in fig._suptitle.get_text()  # wrapped, not cut off
  wrapped = plots.attention_grid_figure(rows[:1], max_cols=1)  # 2 heads -> 2 grid rows
  visible = [ax for ax in wrapped.axes if ax.get_visible() and ax.get_images()]
  assert len(visible) == 2 and visible[1].get_position().y0 < visible[0].get_position().y0
  with pytest.raises(ValueError, match=r'len\(rows\[0\].key_tokens\)=3'):
    plots.attention_grid_figure([{**rows[0], 'key_tokens': list('wxy')}])


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / 'experiments' / name), *args], env=env,
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_length_study_smoke_then_attention_maps(tmp_path):
  base, out = tmp_path / 'study', tmp_path / 'out'
  data = f'--set=data_dir={tmp_path / "tfds"}'
  run = _script('length_study.py', '--arg=smoke', data, f'--workdir={base}', f'--out={out}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.count('python experiments/train.py --config=configs/length_study.py:') == 3
  summary = json.loads((out / 'length_study.json').read_text())
  assert list(summary['models']) == ['rnn_noattn', 'rnn', 'transformer']
  assert summary['train_length'] == [1, 3] and summary['test_length'] == [1, 6]
  for m, r in summary['models'].items():
    assert r['step'] == 2 and r['seeds'] == {'train.seed': 0, 'data.data_seed': 0}
    lengths = [row['length'] for row in r['rows']]
    assert set(lengths) <= set(range(1, 7)) and max(lengths) > 3, m
    assert sum(row['count'] for row in r['rows']) == 24  # the whole test split, 4 x 6
    assert r['in_range']['count'] + r['out_of_range']['count'] == 24
    for row in r['rows']:  # an exact match has every token right
      assert 0.0 <= row['sequence_accuracy'] <= row['token_accuracy'] <= 1.0
    assert r['train_wall_s'] > 0 and r['steps_per_second'] > 0
  md = (out / 'length_study.md').read_text()
  assert md.count('| RNN encoder-decoder') == 2 and '| Transformer |' in md
  assert (out / 'length_study.png').stat().st_size > 5000
  assert len((out / 'length_study.csv').read_text().splitlines()) > 3 * 3

  # Again, one model: nothing is retrained or re-scored.
  written = [base / 'rnn' / f for f in (length_study.EVAL_FILE, 'metrics.jsonl', 'DONE')]
  before = [p.stat().st_mtime_ns for p in written]
  again = _script('length_study.py', '--arg=smoke', data, f'--workdir={base}', '--models=rnn')
  assert again.returncode == 0, again.stderr[-3000:]
  assert [p.stat().st_mtime_ns for p in written] == before
  assert 'reusing the per-length scores' in again.stderr
  assert (base / 'length_study.png').exists()  # --out defaults to --workdir

  maps = _script('attention_maps.py', f'--workdirs={base / "transformer"},{base / "rnn"}',
                 f'--out={out}', '--lengths=3,5')
  assert maps.returncode == 0, maps.stderr[-3000:]
  for name in ('attention_maps_transformer.png', 'attention_cross_transformer.png',
               'attention_alignment_rnn.png'):
    assert (out / name).stat().st_size > 5000, name
