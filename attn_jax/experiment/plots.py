"""Plots for runs: attention maps and learning curves, written as PNG files.

    plot_attention(weights[0], query_tokens=src, key_tokens=src, title='layer 0', path='a.png')
    plot_curves({'rnn': 'runs/rnn', 'tf': 'runs/tf'}, ['valid/accuracy', 'train/loss'],
                'curves.png')

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot, so
no global figure state is created or leaked (safe in tests, threads and servers). The
`*_figure` functions return the figure for inspection; `plot_*` save it and drop it.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from attn_jax.models import names
from attn_jax.train.metrics import read_metrics

MAX_TOKEN_LABELS = 40  # More tick labels than this on an axis become unreadable.
X_KEYS = ('step', 'time')


def _grid(n: int) -> tuple[int, int]:
  """(rows, cols) of a near-square grid with n panels."""
  cols = math.ceil(math.sqrt(n))
  return math.ceil(n / cols), cols


def _new_figure(rows: int, cols: int, panel_w: float, panel_h: float) -> tuple[Figure, Any]:
  fig = Figure(figsize=(cols * panel_w, rows * panel_h), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, axes


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  fig.clear()  # Releases the artists now, not when the garbage collector gets to them.
  return path


# --- Attention maps ---------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> pathlib.Path:
  """Writes `fig` as a PNG at `path` (parents created); returns the path."""
  return _save(fig, path, dpi)


def _check_tokens(tokens: Sequence[Any] | None, length: int, what: str, shape) -> list[str] | None:
  if tokens is None:
    return None
  if isinstance(tokens, str):
    raise ValueError(f'{what} must be a sequence of tokens, got the string {tokens!r}')
  if len(tokens) != length:
    raise ValueError(f'len({what})={len(tokens)} does not match weights {shape} '
                     f'[heads, q_len, kv_len] (expected {length})')
  return [str(t) for t in tokens]


def attention_figure(weights: Any, *, query_tokens: Sequence[Any] | None = None,
                     key_tokens: Sequence[Any] | None = None, title: str | None = None,
                     head_names: Sequence[str] | None = None) -> Figure:
  """A grid of heatmaps, one panel per head, with a shared colour scale and colorbar.

  Args:
    weights: float `[heads, q_len, kv_len]` (numpy or jax), e.g. one batch row of
      `ops.dot_product_attention(..., return_weights=True)[1]`; rows are queries.
    query_tokens, key_tokens: labels of the `q_len` rows / `kv_len` columns, shown as tick
      labels when there are at most MAX_TOKEN_LABELS of them (positions otherwise).
    title: figure title.
    head_names: panel titles (default 'head i').

  Raises:
    ValueError: if weights is not 3-D, is empty or non-finite, or a token/name list has the
      wrong length.
  """
  w = np.asarray(weights, dtype=np.float32)
  if w.ndim != 3 or 0 in w.shape:
    raise ValueError(f'weights must be [heads, q_len, kv_len] with no empty axis, got shape '
                     f'{w.shape} (select one batch row of [batch, heads, q, kv] weights; add '
                     'a heads axis to a single [q, kv] map)')
  if not np.isfinite(w).all():
    raise ValueError(f'weights {w.shape} hold {int((~np.isfinite(w)).sum())} non-finite values')
  heads, q_len, kv_len = w.shape
  q_labels = _check_tokens(query_tokens, q_len, 'query_tokens', w.shape)
  k_labels = _check_tokens(key_tokens, kv_len, 'key_tokens', w.shape)
  if head_names is not None and len(head_names) != heads:
    raise ValueError(f'len(head_names)={len(head_names)} != {heads} heads of weights {w.shape}')
  names = list(head_names) if head_names is not None else [f'head {h}' for h in range(heads)]
  show_q = q_labels is not None and q_len <= MAX_TOKEN_LABELS
  show_k = k_labels is not None and kv_len <= MAX_TOKEN_LABELS
  # Panels grow with the number of labelled rows/columns so the labels do not overlap.
  panel_w = max(3.0, 0.16 * kv_len + 1.2) if show_k else 3.2
  panel_h = max(2.6, 0.16 * q_len + 1.0) if show_q else 2.8
  rows, cols = _grid(heads)
  fig, axes = _new_figure(rows, cols, panel_w, panel_h)
  vmax = float(w.max()) if w.max() > 0 else 1.0
  image = None
  for h, ax in enumerate(axes.flat):
    if h >= heads:
      ax.set_visible(False)
      continue
    image = ax.imshow(w[h], cmap='viridis', vmin=0.0, vmax=vmax, aspect='auto',
                      interpolation='nearest')
    ax.set_title(names[h], fontsize=9)
    if show_k:
      ax.set_xticks(range(kv_len), k_labels, rotation=90, fontsize=7)
    if show_q:
      ax.set_yticks(range(q_len), q_labels, fontsize=7)
    if h + cols >= heads:  # The lowest visible panel of its column.
      ax.set_xlabel('key token' if show_k else 'key position')
    if h % cols == 0:
      ax.set_ylabel('query token' if show_q else 'query position')
  fig.colorbar(image, ax=[a for a in axes.flat if a.get_visible()], label='attention weight',
               shrink=0.9)
  if title:
    fig.suptitle(title)
  return fig


def plot_attention(weights: Any, *, query_tokens: Sequence[Any] | None = None,
                   key_tokens: Sequence[Any] | None = None, title: str | None = None,
                   path: str | os.PathLike, head_names: Sequence[str] | None = None,
                   dpi: int = 100) -> pathlib.Path:
  """Writes `attention_figure(...)` as a PNG at `path` (parents created); returns the path."""
  fig = attention_figure(weights, query_tokens=query_tokens, key_tokens=key_tokens,
                         title=title, head_names=head_names)
  return _save(fig, path, dpi)


# --- Learning curves --------------------------------------------------------------------------


def curve(records: Sequence[Mapping[str, Any]], key: str, x: str = 'step'
          ) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) float64 arrays of `key` over the records that have it; null values are NaN.

  x='step' is the training step; x='time' is seconds since the first record of the run.
  """
  if x not in X_KEYS:
    raise ValueError(f'x={x!r} must be one of {X_KEYS}')
  t0 = next((r['time'] for r in records if 'time' in r), 0.0)
  xs, ys = [], []
  for r in records:
    if key in r and x in r:
      xs.append(r[x] - t0 if x == 'time' else r[x])
      ys.append(math.nan if r[key] is None else r[key])
  return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def curves_figure(runs: Mapping[str, str | os.PathLike], keys: Sequence[str], *,
                  x: str = 'step', logy: bool = False) -> Figure:
  """Learning curves: one panel per metric key, one line per run (labelled by its name).

  Args:
    runs: `{label: metrics.jsonl path or run directory}`.
    keys: metric names as in the JSONL, e.g. ['valid/accuracy', 'train/loss'].
    x: 'step' or 'time' (seconds since the run's first record).
    logy: log-scale y axes (for losses spanning orders of magnitude).

  Raises:
    ValueError: for no runs/keys, a missing or malformed file, a bad x, or a key that no
      run has (listing the keys they do have). A run lacking a key some other run has is
      left out of that panel, with a log line.
  """
  if not runs:
    raise ValueError('runs is empty: give {label: metrics.jsonl path}')
  if isinstance(keys, str) or not keys:
    raise ValueError(f'keys must be a non-empty list of metric names, got {keys!r}')
  if x not in X_KEYS:
    raise ValueError(f'x={x!r} must be one of {X_KEYS}')
  records = {label: read_metrics(path, missing_ok=False) for label, path in runs.items()}
  available = sorted({k for recs in records.values() for r in recs for k in r} - set(X_KEYS))
  for key in keys:
    if key not in available:
      raise ValueError(f'metric {key!r} is in none of the runs {list(runs)}; they have '
                       f'{available}')
  rows, cols = _grid(len(keys))
  fig, axes = _new_figure(rows, cols, 4.5, 3.2)
  for i, ax in enumerate(axes.flat):
    if i >= len(keys):
      ax.set_visible(False)
      continue
    key = keys[i]
    for label, recs in records.items():
      xs, ys = curve(recs, key, x)
      if not len(xs):
        logging.info('run %r has no %r; left out of that panel', label, key)
        continue
      ax.plot(xs, ys, label=label, marker='.' if len(xs) <= 30 else None)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel('step' if x == 'step' else 'wall time (s)')
    if x == 'step':
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(key)
    if logy:
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return fig


def plot_curves(runs: Mapping[str, str | os.PathLike], keys: Sequence[str],
                path: str | os.PathLike, x: str = 'step', *, logy: bool = False,
                dpi: int = 100) -> pathlib.Path:
  """Writes `curves_figure(...)` as a PNG at `path` (parents created); returns the path."""
  return _save(curves_figure(runs, keys, x=x, logy=logy), path, dpi)


# --- Attention grids: one row per map, one column per head -------------------------------------

AXIS_NAMES = {  # kind -> (query axis, key axis) labels
    names.ENCODER_SELF: ('source token (query)', 'source token (key)'),
    names.DECODER_SELF: ('target token predicted (query)', 'decoder input (key)'),
    names.CROSS: ('target token predicted (query)', 'source token (key)'),
    names.RNN_ATTENTION: ('target token predicted', 'source token (annotation)'),
}


def run_labels(workdirs: list[str], labels: list[str] | None) -> dict[str, str]:
  """`{label: workdir}`: the given labels, else the workdir names (full paths if they clash)."""
  if labels is not None:
    if len(labels) != len(workdirs):
      raise ValueError(f'--labels has {len(labels)} names for {len(workdirs)} --workdirs')
    names = labels
  else:
    names = [pathlib.Path(w).name or w for w in workdirs]
    if len(set(names)) < len(names):
      names = list(workdirs)
  if len(set(names)) < len(names):
    raise ValueError(f'labels must be distinct, got {names}')
  return dict(zip(names, workdirs, strict=True))


def attention_grid_figure(rows: Sequence[Mapping[str, Any]], *, title: str | None = None,
                          max_cols: int | None = None) -> Figure:
  """Heatmaps of several attention maps of one model: a row per map, a column per head, on
  one colour scale (0..1, the weights are probabilities) with one colorbar.

  Args:
    rows: dicts with 'weights' float `[heads, q_len, kv_len]`, 'query_tokens', 'key_tokens'
      (labels of the rows / columns), 'name' (the row's title), and optional 'kind' (one of
      AXIS_NAMES, for the axis labels), e.g. from `evaluation.attention_panels`.
    title: figure title.
    max_cols: at most this many heads side by side; a map with more heads wraps onto further
      rows (None = all heads of a map on one row).

  Raises:
    ValueError: for no rows, or a row whose weights are not `[heads, q, kv]` or do not match
      its token lists.
  """
  if not rows:
    raise ValueError('rows is empty: give at least one attention map')
  if max_cols is not None and max_cols < 1:
    raise ValueError(f'max_cols={max_cols} must be >= 1')
  maps = []
  for i, row in enumerate(rows):
    w = np.asarray(row['weights'], np.float32)
    if w.ndim != 3 or 0 in w.shape or not np.isfinite(w).all():
      raise ValueError(f'rows[{i}] ({row.get("name")}): weights must be finite '
                       f'[heads, q_len, kv_len], got shape {w.shape}')
    q = _check_tokens(row['query_tokens'], w.shape[1], f'rows[{i}].query_tokens', w.shape)
    k = _check_tokens(row['key_tokens'], w.shape[2], f'rows[{i}].key_tokens', w.shape)
    maps.append((w, q, k))
  cols = max(w.shape[0] for w, _, _ in maps)
  cols = min(cols, max_cols) if max_cols else cols
  # Grid rows: (map index, its first head); a map with more than `cols` heads wraps.
  lines = [(i, h0) for i, (w, _, _) in enumerate(maps) for h0 in range(0, w.shape[0], cols)]
  kv_max = max(w.shape[2] for w, _, _ in maps)
  panel_w = max(2.6, 0.16 * min(kv_max, MAX_TOKEN_LABELS) + 1.2)
  heights = [max(2.2, 0.16 * min(maps[i][0].shape[1], MAX_TOKEN_LABELS) + 1.1)
             for i, _ in lines]
  fig = Figure(figsize=(cols * panel_w + 1.0, sum(heights)), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(lines), cols, squeeze=False, gridspec_kw={'height_ratios': heights})
  image = None
  for r, (i, h0) in enumerate(lines):
    (w, q, k), row = maps[i], rows[i]
    q_name, k_name = AXIS_NAMES.get(row.get('kind'), ('query position', 'key position'))
    for c in range(cols):
      ax, h = axes[r, c], h0 + c
      if h >= w.shape[0]:
        ax.set_visible(False)
        continue
      image = ax.imshow(w[h], cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto',
                        interpolation='nearest')
      name = row.get('name', '')
      ax.set_title(f'{name}, head {h}' if w.shape[0] > 1 else name, fontsize=9)
      if w.shape[2] <= MAX_TOKEN_LABELS:
        ax.set_xticks(range(w.shape[2]), k, rotation=90, fontsize=7)
      if w.shape[1] <= MAX_TOKEN_LABELS:
        ax.set_yticks(range(w.shape[1]), q, fontsize=7)
      ax.set_xlabel(k_name, fontsize=8)
      if c == 0:
        ax.set_ylabel(q_name, fontsize=8)
  fig.colorbar(image, ax=[a for a in axes.flat if a.get_visible()], label='attention weight',
               shrink=0.6)
  if title:
    # Wrapped to the figure's width (~11 characters per inch at 9 pt) so it is never cut.
    width = int(fig.get_figwidth() * 11)
    fig.suptitle(textwrap.fill(title, max(width, 30)), fontsize=9)
  return fig


def plot_attention_grid(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                        title: str | None = None, max_cols: int | None = None, dpi: int = 80
                        ) -> pathlib.Path:
  """Writes `attention_grid_figure(rows, ...)` as a PNG at `path`; returns the path."""
  return _save(attention_grid_figure(rows, title=title, max_cols=max_cols), path, dpi)


# --- Accuracy against sequence length ----------------------------------------------------------

LENGTH_METRICS = {'sequence_accuracy': 'exact-sequence accuracy',
                  'token_accuracy': 'token accuracy'}


def length_accuracy_figure(results: Mapping[str, Sequence[Mapping[str, Any]]], train_max: int,
                           *, title: str | None = None) -> Figure:
  """Accuracy against source length, one line per model, the training lengths shaded:
  one panel per metric of LENGTH_METRICS (the shape of Bahdanau et al. 2014, Figure 2).

  Args:
    results: `{model label: rows}`, rows as `evaluation.accuracy_by_length` returns them
      (`length`, `count`, `sequence_accuracy`, `token_accuracy`).
    train_max: the longest training length L (lengths 1..L are shaded).

  Raises:
    ValueError: for no results, a model with no rows, or rows missing a metric.
  """
  if not results:
    raise ValueError('results is empty: give {model label: per-length rows}')
  for label, rows in results.items():
    if not rows:
      raise ValueError(f'model {label!r} has no per-length rows')
    missing = sorted({'length', *LENGTH_METRICS} - set(rows[0]))
    if missing:
      raise ValueError(f'model {label!r} rows lack {missing}')
  longest = max(r['length'] for rows in results.values() for r in rows)
  fig, axes = _new_figure(1, len(LENGTH_METRICS), 5.2, 3.8)
  markers = 'os^Dvx*'
  for ax, (key, name) in zip(axes.flat, LENGTH_METRICS.items(), strict=True):
    ax.axvspan(0.5, train_max + 0.5, color='0.85', alpha=0.6,
               label=f'training lengths 1-{train_max}')
    for i, (label, rows) in enumerate(results.items()):
      xs = [r['length'] for r in rows]
      ax.plot(xs, [r[key] for r in rows], marker=markers[i % len(markers)], markersize=3.5,
              label=label)
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_ylim(-0.03, 1.03)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel('source length (symbols)')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  # One legend under both panels: inside, it would hide the curves where they fall to 0.
  handles, names = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, names, loc='outside lower center', ncol=min(len(names), 4), fontsize=8)
  if title:
    fig.suptitle(title)
  return fig


def plot_length_accuracy(results: Mapping[str, Sequence[Mapping[str, Any]]], train_max: int,
                         path: str | os.PathLike, *, title: str | None = None, dpi: int = 100
                         ) -> pathlib.Path:
  """Writes `length_accuracy_figure(...)` as a PNG at `path`; returns the path."""
  return _save(length_accuracy_figure(results, train_max, title=title), path, dpi)


# --- Block masks --------------------------------------------------------------------------------


def block_mask_figure(block_mask: Any, *, group: int = 0, title: str | None = None,
                      max_pixels: int = 512) -> Figure:
  """The attention pattern of an `ops.BlockMask` for one row group: every visible (query, key)
  pair dark, on blocks shaded by what the attention loop does with them (fully visible: no mask
  evaluated, partly visible: mask evaluated, hidden: never visited), with the visit counts.

  Args:
    block_mask: from `attn_jax.ops.block_mask(...)`.
    group: the row group to draw (a batch row for per-row masks such as documents).
    max_pixels: longer sequences are drawn at one pixel per `ceil(len / max_pixels)` positions
      (a pixel is dark if any pair in it is visible).
  """
  dense = np.asarray(block_mask.dense()).reshape(-1, block_mask.q_len, block_mask.kv_len)[group]
  full = np.zeros((block_mask.num_q_blocks, block_mask.num_kv_blocks), bool)
  partial = np.zeros_like(full)
  for counts, indices, out in ((block_mask.full_num, block_mask.full_idx, full),
                               (block_mask.partial_num, block_mask.partial_idx, partial)):
    counts, indices = np.asarray(counts)[group], np.asarray(indices)[group]
    for i, n in enumerate(counts):
      out[i, indices[i, :n]] = True
  bq, bk = block_mask.block_q, block_mask.block_kv
  shade = np.zeros(dense.shape, np.float32)  # 0 hidden, 1 partial, 2 full
  shade += np.kron(partial, np.ones((bq, bk)))[:dense.shape[0], :dense.shape[1]]
  shade += 2 * np.kron(full, np.ones((bq, bk)))[:dense.shape[0], :dense.shape[1]]
  step = max(1, -(-max(dense.shape) // max_pixels))
  if step > 1:
    rows, cols = -(-dense.shape[0] // step) * step, -(-dense.shape[1] // step) * step
    pad = lambda x: np.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))  # noqa: E731
    pool = lambda x, f: f(pad(x).reshape(rows // step, step, cols // step, step), (1, 3))  # noqa: E731
    dense, shade = pool(dense, np.any), pool(shade, np.max)
  image = np.ones(dense.shape + (3,), np.float32)  # white: hidden
  image[shade == 1] = (1.0, 0.87, 0.6)  # partial: orange
  image[shade == 2] = (0.72, 0.9, 0.72)  # full: green
  image[dense] = image[dense] * 0.35
  fig, axes = _new_figure(1, 1, 4.6, 4.6)
  ax = axes[0, 0]
  ax.imshow(image, interpolation='nearest', aspect='equal',
            extent=(0, block_mask.kv_len, block_mask.q_len, 0))
  for x in range(0, block_mask.kv_len + 1, bk):
    ax.axvline(x, color='0.6', lw=0.4)
  for y in range(0, block_mask.q_len + 1, bq):
    ax.axhline(y, color='0.6', lw=0.4)
  ax.set_xlabel('key position')
  ax.set_ylabel('query position')
  visits = int(full.sum() + partial.sum())
  ax.set_title(f'{title + chr(10) if title else ""}visited {visits} of {full.size} blocks '
               f'({int(full.sum())} full, green; {int(partial.sum())} partial, orange)',
               fontsize=8)
  return fig


def plot_block_mask(block_mask: Any, path: str | os.PathLike, *, group: int = 0,
                    title: str | None = None, dpi: int = 100) -> pathlib.Path:
  """Writes `block_mask_figure(...)` as a PNG at `path`; returns the path."""
  return _save(block_mask_figure(block_mask, group=group, title=title), path, dpi)


# --- Attention over image patches ---------------------------------------------------------------


def _display_image(image: np.ndarray) -> np.ndarray:
  """`[H, W, C]` (normalized or not) -> `[H, W]` or `[H, W, 3]` in [0, 1] for imshow."""
  x = image[..., 0] if image.shape[-1] == 1 else image
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def image_attention_figure(images: Any, maps: Any, *, captions: Sequence[str] | None = None,
                           title: str | None = None, alpha: float = 0.55) -> Figure:
  """Each image beside itself under its patch-attention map: a row of two panels per image.

  Args:
    images: float or uint8 `[n, H, W, C]` (C = 1 or 3; `[H, W, C]` for one image), shown
      rescaled to their own min..max, so normalized batches display as they are.
    maps: float `[n, grid_h, grid_w]` (or `[grid_h, grid_w]`), e.g. `ops.patch_attention`;
      each is stretched over its image, one cell per patch, all on one colour scale from 0 to
      the largest value of any map.
    captions: one line per image (e.g. 'label 3, predicted 3').
    title: figure title.
    alpha: opacity of the map over the image.

  Raises:
    ValueError: if the shapes do not pair up, a grid does not divide its image, or a map is
      not finite.
  """
  x, m = np.asarray(images), np.asarray(maps, np.float32)
  x, m = (x[None] if x.ndim == 3 else x), (m[None] if m.ndim == 2 else m)
  if x.ndim != 4 or x.shape[-1] not in (1, 3) or m.ndim != 3 or len(x) != len(m) or not len(x):
    raise ValueError(f'images must be [n, H, W, 1 or 3] and maps [n, grid_h, grid_w] with the '
                     f'same n >= 1, got {x.shape} and {m.shape}')
  (h, w), (gh, gw) = x.shape[1:3], m.shape[1:]
  if h % gh or w % gw:
    raise ValueError(f'a {gh}x{gw} patch grid does not divide {h}x{w} images')
  if not np.isfinite(m).all():
    raise ValueError(f'maps {m.shape} hold {int((~np.isfinite(m)).sum())} non-finite values')
  if captions is not None and len(captions) != len(x):
    raise ValueError(f'len(captions)={len(captions)} != {len(x)} images')
  fig, axes = _new_figure(len(x), 2, 2.6, 2.6)
  shown, vmax = None, float(m.max()) or 1.0
  for i, (image, grid) in enumerate(zip(x.astype(np.float32), m, strict=True)):
    picture = _display_image(image)
    cmap = 'gray' if picture.ndim == 2 else None
    left, right = axes[i]
    left.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
    right.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation='nearest')
    # extent: each map cell covers its patch's pixels exactly.
    shown = right.imshow(grid, cmap='inferno', alpha=alpha, vmin=0.0, vmax=vmax,
                         interpolation='nearest', extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    left.set_title(captions[i] if captions is not None else f'image {i}', fontsize=9)
    right.set_title('attention to patches', fontsize=9)
    for ax in (left, right):
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(shown, ax=axes[:, 1].tolist(), label='share of attention', shrink=0.8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def plot_image_attention(images: Any, maps: Any, path: str | os.PathLike, *,
                         captions: Sequence[str] | None = None, title: str | None = None,
                         dpi: int = 80) -> pathlib.Path:
  """Writes `image_attention_figure(images, maps, ...)` as a PNG at `path`; returns it."""
  return _save(image_attention_figure(images, maps, captions=captions, title=title), path, dpi)
