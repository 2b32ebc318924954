"""Plot tests: PNGs are written, inputs validated, and the drawn data is the data given.

Figures are inspected before saving (image arrays, line data, labels); metrics files are
written by `MetricWriter`, the producer of the JSONL format, not by the reader under test.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from attn_jax import ops
from attn_jax.experiment import plots
from attn_jax.train.metrics import MetricWriter, read_metrics

REPO = pathlib.Path(__file__).parents[2]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _weights(heads=3, q_len=4, kv_len=5, seed=0):
  return np.random.default_rng(seed).dirichlet(np.ones(kv_len), size=(heads, q_len))


def _visible_panels(fig):
  return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def _pyplot_figures():
  import matplotlib.pyplot as plt
  return plt.get_fignums()


# --- Attention maps ---------------------------------------------------------------------------


def test_attention_panels_show_each_head_with_token_labels():
  w = _weights(heads=3, q_len=4, kv_len=5)
  fig = plots.attention_figure(w, query_tokens=['a', 'b', 'c', 'd'], key_tokens=list('VWXYZ'),
                               title='layer 0')
  panels = _visible_panels(fig)
  assert [ax.get_title() for ax in panels] == ['head 0', 'head 1', 'head 2']
  for h, ax in enumerate(panels):
    np.testing.assert_array_equal(ax.images[0].get_array(), w[h].astype(np.float32))
    assert [t.get_text() for t in ax.get_xticklabels()] == list('VWXYZ')
    assert [t.get_text() for t in ax.get_yticklabels()] == ['a', 'b', 'c', 'd']
  # 2x2 grid: the head below head 1 is missing, so head 1 carries the column's x label.
  assert [ax.get_xlabel() for ax in panels] == ['', 'key token', 'key token']
  assert [ax.get_ylabel() for ax in panels] == ['query token', '', 'query token']
  colorbars = [ax for ax in fig.axes if ax.get_ylabel() == 'attention weight']
  assert len(colorbars) == 1
  w32_max = float(w.astype(np.float32).max())
  assert {ax.images[0].get_clim() for ax in panels} == {(0.0, w32_max)}  # Shared scale.
  assert fig.get_suptitle() == 'layer 0'
  fig.clear()


def test_attention_of_real_ops_weights_and_long_sequences_use_positions():
  q, k, v = np.random.default_rng(0).normal(size=(3, 1, 48, 2, 4)).astype(np.float32)
  # Jitted: one compile instead of one per op.
  attention = jax.jit(functools.partial(ops.dot_product_attention, is_causal=True,
                                        return_weights=True))
  _, weights = attention(q, k, v)  # weights [batch, heads, q, kv].
  tokens = [f't{i}' for i in range(48)]  # More than MAX_TOKEN_LABELS: positions instead.
  fig = plots.attention_figure(weights[0], query_tokens=tokens, key_tokens=tokens)
  panels = _visible_panels(fig)
  assert len(panels) == 2
  np.testing.assert_array_equal(panels[1].images[0].get_array(), np.asarray(weights[0, 1]))
  assert panels[0].get_xlabel() == 'key position' and panels[0].get_ylabel() == 'query position'
  assert not any(t.get_text().startswith('t') for t in panels[0].get_xticklabels())
  fig.clear()


def test_plot_attention_writes_png_without_pyplot_figures(tmp_path):
  before = _pyplot_figures()
  path = plots.plot_attention(_weights(), query_tokens=list('abcd'), key_tokens=list('abcde'),
                              title='t', path=tmp_path / 'sub' / 'attn.png')
  assert path == tmp_path / 'sub' / 'attn.png'
  assert path.read_bytes()[:8] == PNG_MAGIC
  height, width, _ = matplotlib.image.imread(path).shape
  assert height > 100 and width > 100
  assert _pyplot_figures() == before


@pytest.mark.parametrize('weights, kwargs, message', [
    (np.ones((4, 5)), {}, r'\[heads, q_len, kv_len\].*shape \(4, 5\)'),
    (np.ones((1, 2, 4, 5)), {}, r'shape \(1, 2, 4, 5\)'),
    (np.ones((2, 0, 5)), {}, r'no empty axis, got shape \(2, 0, 5\)'),
    (np.full((2, 4, 5), np.nan), {}, '40 non-finite values'),
    (np.ones((2, 4, 5)), {'query_tokens': list('abc')},
     r'len\(query_tokens\)=3 does not match weights \(2, 4, 5\).*expected 4'),
    (np.ones((2, 4, 5)), {'key_tokens': list('abcd')},
     r'len\(key_tokens\)=4 does not match.*expected 5'),
    (np.ones((2, 4, 5)), {'key_tokens': 'abcde'}, 'key_tokens must be a sequence'),
    (np.ones((2, 4, 5)), {'head_names': ['x']}, r'len\(head_names\)=1 != 2 heads'),
])
def test_attention_input_validation(tmp_path, weights, kwargs, message):
  with pytest.raises(ValueError, match=message):
    plots.plot_attention(weights, path=tmp_path / 'a.png', **kwargs)
  assert not (tmp_path / 'a.png').exists()


# --- Learning curves --------------------------------------------------------------------------


def _write_run(workdir, train_losses, evals):
  """train_losses: {step: loss}; evals: {step: {name: value}} (None -> NaN -> null)."""
  w = MetricWriter(workdir, tensorboard=False, progress=False, enabled=True)
  for step in sorted(set(train_losses) | set(evals)):
    if step in train_losses:
      w.write(step, {'loss': train_losses[step]})
    if step in evals:
      w.write(step, {k: math.nan if v is None else v for k, v in evals[step].items()},
              prefix='')
  w.close()
  return workdir


@pytest.fixture
def two_runs(tmp_path):
  a = _write_run(tmp_path / 'a', {1: 3.0, 2: 2.0, 3: 1.5, 4: 1.0},
                 {2: {'valid/accuracy': 0.25, 'valid/loss': 2.5},
                  4: {'valid/accuracy': 0.5, 'valid/loss': None}})
  b = _write_run(tmp_path / 'b', {2: 4.0, 4: 3.0}, {4: {'valid/loss': 3.5}})
  return {'run a': a, 'run b': b / 'metrics.jsonl'}  # A run directory or its JSONL file.


def test_curves_plot_exactly_the_jsonl_data(two_runs):
  fig = plots.curves_figure(two_runs, ['valid/accuracy', 'train/loss', 'valid/loss'])
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in panels] == ['valid/accuracy', 'train/loss', 'valid/loss']
  assert [ax.get_ylabel() for ax in panels] == ['valid/accuracy', 'train/loss', 'valid/loss']
  assert {ax.get_xlabel() for ax in panels} == {'step'}

  def lines(ax):
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}

  # Run b has no valid/accuracy: it is left out of that panel only.
  assert lines(panels[0]) == {'run a': ([2.0, 4.0], [0.25, 0.5])}
  assert lines(panels[1]) == {'run a': ([1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.5, 1.0]),
                              'run b': ([2.0, 4.0], [4.0, 3.0])}
  valid_loss = lines(panels[2])
  assert valid_loss['run b'] == ([4.0], [3.5])
  assert valid_loss['run a'][0] == [2.0, 4.0]
  assert valid_loss['run a'][1][0] == 2.5 and math.isnan(valid_loss['run a'][1][1])  # null.
  assert [t.get_text() for t in panels[1].get_legend().get_texts()] == ['run a', 'run b']
  fig.clear()


def test_curves_against_wall_time(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in [
      {'step': 10, 'time': 100.5, 'train/loss': 2.0},
      {'step': 20, 'time': 103.0, 'train/loss': 1.0}]))
  fig = plots.curves_figure({'r': path}, ['train/loss'], x='time', logy=True)
  ax = fig.axes[0]
  assert list(ax.lines[0].get_xdata()) == [0.0, 2.5]
  assert ax.get_xlabel() == 'wall time (s)' and ax.get_yscale() == 'log'
  fig.clear()


def test_plot_curves_writes_png_without_pyplot_figures(two_runs, tmp_path):
  before = _pyplot_figures()
  path = plots.plot_curves(two_runs, ['train/loss'], tmp_path / 'out' / 'curves.png')
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert _pyplot_figures() == before


@pytest.mark.parametrize('make_runs, keys, x, message', [
    (lambda r: {}, ['train/loss'], 'step', 'runs is empty'),
    (lambda r: r, [], 'step', 'non-empty list'),
    (lambda r: r, 'train/loss', 'step', 'non-empty list'),
    (lambda r: r, ['train/loss'], 'epoch', r"x='epoch' must be one of \('step', 'time'\)"),
    (lambda r: {**r, 'c': '/nonexistent/run'}, ['train/loss'], 'step',
     "metrics file '/nonexistent/run/metrics.jsonl' does not exist"),
    (lambda r: r, ['valid/acc'], 'step',
     r"metric 'valid/acc' is in none of the runs \['run a', 'run b'\]; they have "
     r"\['train/loss', 'valid/accuracy', 'valid/loss'\]"),
])
def test_curves_input_validation(two_runs, tmp_path, make_runs, keys, x, message):
  with pytest.raises(ValueError, match=message):
    plots.plot_curves(make_runs(two_runs), keys, tmp_path / 'c.png', x=x)
  assert not (tmp_path / 'c.png').exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"step": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: expected a JSON object'):
    read_metrics(path)
  path.write_text('{"step": 1}\n\n{oops\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:3: not a JSON line'):
    read_metrics(path)


# --- Command line -----------------------------------------------------------------------------


def test_cli_labels():
  run_labels = plots.run_labels
  assert run_labels(['x/a', 'y/b'], None) == {'a': 'x/a', 'b': 'y/b'}
  assert run_labels(['x/a', 'y/a'], None) == {'x/a': 'x/a', 'y/a': 'y/a'}  # Names clash.
  assert run_labels(['x/a', 'y/b'], ['A', 'B']) == {'A': 'x/a', 'B': 'y/b'}
  with pytest.raises(ValueError, match='--labels has 1 names for 2 --workdirs'):
    run_labels(['x/a', 'y/b'], ['A'])
  with pytest.raises(ValueError, match='labels must be distinct'):
    run_labels(['x/a', 'y/b'], ['A', 'A'])


def test_cli_writes_png(two_runs, tmp_path):
  out = tmp_path / 'curves.png'
  proc = subprocess.run(
      [sys.executable, str(REPO / 'experiments' / 'plot_metrics.py'),
       f'--workdirs={two_runs["run a"]},{two_runs["run b"]}',
       '--keys=valid/loss,train/loss', f'--out={out}'],
      env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG_MAGIC


def test_block_mask_picture_counts_the_visited_blocks(tmp_path):
  bm = ops.block_mask(ops.and_masks(ops.mask_mods.causal(), ops.mask_mods.sliding_window(7)),
                      batch=1, heads=1, q_len=40, block_size=8)
  fig = plots.block_mask_figure(bm, title='window')
  title = fig.axes[0].get_title()
  visited = int(bm.visited().sum())
  assert f'visited {visited} of 25 blocks' in title and visited < 25
  path = plots.plot_block_mask(bm, tmp_path / 'bm.png')
  assert matplotlib.image.imread(path).shape[:2][0] > 100


def test_image_attention_overlays_each_map_on_its_image(tmp_path):
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
  maps = np.zeros((2, 4, 4), np.float32)
  maps[0, 1, 2] = maps[1, 3, 0] = 1.0
  fig = plots.image_attention_figure(images, maps, captions=['label 3', 'label 7'])
  axes = [a for a in fig.axes if a.get_label() != '<colorbar>']
  assert [a.get_title() for a in axes] == [
      'label 3', 'attention to patches', 'label 7', 'attention to patches']
  overlay = axes[1].get_images()[1]
  np.testing.assert_array_equal(overlay.get_array(), maps[0])
  assert overlay.get_extent() == [-0.5, 7.5, 7.5, -0.5]  # one map cell per 2x2 patch
  shown = axes[0].get_images()[0].get_array()
  assert shown.min() == 0.0 and shown.max() == 1.0  # normalized pixels rescaled for display
  fig.clear()
  before = _pyplot_figures()
  rgb = plots.plot_image_attention(np.zeros((32, 32, 3), np.uint8), maps[0], tmp_path / 'a.png')
  assert rgb.read_bytes()[:8] == PNG_MAGIC and _pyplot_figures() == before
  with pytest.raises(ValueError, match=r'same n >= 1, got \(2, 8, 8, 1\) and \(1, 4, 4\)'):
    plots.image_attention_figure(images, maps[:1])
  with pytest.raises(ValueError, match='a 3x3 patch grid does not divide 8x8 images'):
    plots.image_attention_figure(images, np.ones((2, 3, 3)))
  with pytest.raises(ValueError, match=r'len\(captions\)=1 != 2'):
    plots.image_attention_figure(images, maps, captions=['x'])
