"""Metric output: tqdm progress, `workdir/metrics.jsonl`, TensorBoard events; process 0 only.

Every line of `metrics.jsonl` is one JSON object `{"step": int, "time": float,
"<prefix>/<name>": float | null, ...}` (null for NaN/Inf, which JSON cannot hold). On resume
the file is cut back to the restored step, so it reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax

METRICS_FILE = 'metrics.jsonl'
TB_DIR = 'tensorboard'


Direction = str | None  # 'min' (lower is better), 'max', or None (no best: a count, a length)
DIRECTIONS = ('min', 'max')


def metric_direction(key: str, directions: Mapping[str, Direction]) -> Direction:
  """The declared direction of metrics.jsonl key `key`, or None.

  `directions` is keyed by a metric's name within its split, or an fnmatch pattern of names
  (what tasks and evaluators declare): 'valid/loss', 'averaged/valid/loss' and 'train/loss'
  all read `directions['loss']`; a full key given as such also matches.
  """
  if key in directions:
    return directions[key]
  name = key.rsplit('/', 1)[-1]
  if name in directions:
    return directions[name]
  return next((d for pattern, d in directions.items() if fnmatch.fnmatchcase(name, pattern)),
              None)


def best_mode(train_config: Any, directions: Mapping[str, Direction]) -> str:
  """'min' or 'max' for `config.train.best_metric`: `config.train.best_mode` when set, else the
  metric's declared direction ('min' when there is no best metric: nothing is ranked).

  Raises:
    ValueError: naming `config.train.best_mode` when it is unset and the best metric has no
      declared direction.
  """
  given, metric = train_config.get('best_mode', ''), train_config.get('best_metric', '')
  declared = metric_direction(metric, directions) if metric else None
  if given:
    if declared and declared != given:
      logging.warning("config.train.best_mode=%r ranks %s the other way from its declared "
                      "direction %r", given, metric, declared)
    return given
  if not metric:
    return 'min'
  if declared is None:
    raise ValueError(f"config.train.best_mode='' takes the declared direction of "
                     f"config.train.best_metric={metric!r}, which has none (declared: "
                     f"{sorted(directions)}); set config.train.best_mode to 'min' or 'max'")
  return declared


# Runs written before metric directions were declared (no metric_directions.json in the
# workdir) have their best values ranked by this rule of the metric's name, which was the only
# rule then: a last name component with one of these words is better when lower (checked
# first), or when higher; anything else has no best.
LOWER_IS_BETTER = ('loss', 'perplexity', 'ppl', 'error', 'err', 'wer', 'cer', 'nll', 'bpc',
                   'bpb', 'entropy', 'nonfinite')
HIGHER_IS_BETTER = ('accuracy', 'acc', 'bleu', 'chrf', 'f1', 'precision', 'recall', 'auc',
                    'rouge', 'match', 'score')


def metric_mode(name: str) -> str | None:
  """'min', 'max' or None: the direction the name of eval metric `name` suggests, for runs
  saved before directions were declared (see `metric_direction` for the others).

  The last '/'-component is split into words at non-letters; a word from LOWER_IS_BETTER
  (loss, perplexity, error, ...) means min, checked first, else a word from HIGHER_IS_BETTER
  (accuracy, acc, bleu, f1, ...) means max. E.g. 'valid/loss' -> min, 'valid/seq_accuracy'
  -> max, 'test/bleu' -> max, 'valid/num_tokens' -> None.
  """
  words = set(re.split(r'[^a-z]+', name.rsplit('/', 1)[-1].lower()))
  if words & set(LOWER_IS_BETTER):
    return 'min'
  if words & set(HIGHER_IS_BETTER):
    return 'max'
  return None


def best_values(records: Sequence[Mapping[str, Any]], keys: Iterable[str],
                directions: Mapping[str, Direction] | None = None
                ) -> dict[str, dict[str, Any]]:
  """`{key: {'value': best, 'step': its step}}` over metric `records`, in each key's declared
  direction (`metric_direction` of `directions`; a run saved before directions were declared
  passes None: `metric_mode` of the name). Null (non-finite) values are skipped and metrics
  with no direction (counts, lengths) have no best."""
  best: dict[str, dict[str, Any]] = {}
  for key in keys:
    mode = metric_mode(key) if directions is None else metric_direction(key, directions)
    if mode is None:
      continue
    for rec in records:
      v = rec.get(key)
      if v is None:
        continue
      if key not in best or (v < best[key]['value'] if mode == 'min' else v > best[key]['value']):
        best[key] = {'value': v, 'step': rec.get('step')}
  return best


def read_metrics(path: str | os.PathLike, *, missing_ok: bool = True) -> list[dict[str, Any]]:
  """All records of a metrics JSONL file in order; `path` is the file or a workdir holding
  METRICS_FILE. A missing file gives [] (or, with `missing_ok=False`, a ValueError).

  Raises:
    ValueError: naming the file and line number of a line that is not a JSON object.
  """
  path = pathlib.Path(path)
  if path.is_dir() or path.suffix != '.jsonl':
    path = path / METRICS_FILE
  if not path.is_file():
    if missing_ok:
      return []
    raise ValueError(f'metrics file {str(path)!r} does not exist')
  out = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{i}: not a JSON line ({e})') from None
    if not isinstance(record, dict):
      raise ValueError(f'{path}:{i}: expected a JSON object, got {type(record).__name__}')
    out.append(record)
  return out


def _clean(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


class ProgressBar:
  """The console's tqdm bar: steps done of `total_steps`, or, with a compute budget, minutes
  spent of the budget (which usually ends a budgeted run long before `num_steps`, so a step
  bar would show a far-off end), with the step count beside it."""

  def __init__(self, *, total_steps: int | None, start_step: int = 0,
               budget_minutes: float = 0.0, spent_minutes: float = 0.0):
    from tqdm import tqdm

    self.budget = float(budget_minutes)
    if self.budget > 0:
      self._bar = tqdm(total=self.budget, initial=min(spent_minutes, self.budget), unit='min',
                       dynamic_ncols=True, mininterval=1.0,
                       bar_format='{l_bar}{bar}| {n:.1f}/{total:.1f} min budget '
                                  '[{elapsed}<{remaining}{postfix}]')
    else:
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       mininterval=1.0)
    self._shown: dict[str, str] = {}
    self._step = start_step

  def advance(self, step: int, minutes: float | None = None) -> None:
    """Moves the bar to `step`, or with a budget to `minutes` spent."""
    if self.budget > 0:
      if minutes is not None:
        value = min(minutes, self.budget)
        if value > self._bar.n:
          self._bar.update(value - self._bar.n)
      if step != self._step:
        self._step = step
        self._bar.set_postfix({'step': step, **self._shown}, refresh=False)
    elif step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def show(self, scalars: Mapping[str, Any]) -> None:
    """Shows the latest train loss, accuracy, tokens/s and utilisation beside the bar."""
    shown = {k: f'{v:.4g}' for k, v in scalars.items() if k in ('loss', 'accuracy')}
    if 'tokens_per_second' in scalars:
      shown['tok/s'] = f"{scalars['tokens_per_second']:.4g}"
    if 'flops_utilisation' in scalars:
      shown['util'] = f"{scalars['flops_utilisation']:.0%}"
    self._shown = shown
    extra = {'step': self._step} if self.budget > 0 else {}
    self._bar.set_postfix({**extra, **shown}, refresh=False)

  @contextlib.contextmanager
  def cleared(self) -> Iterator[None]:
    """Takes the bar off the console for a log line, which then gets a line of its own."""
    self._bar.clear()
    try:
      yield
    finally:
      self._bar.refresh()

  def close(self) -> None:
    self._bar.close()


class MetricWriter:
  """Writes scalars to console/JSONL/TensorBoard on process 0; a no-op elsewhere.

  The console gets one log line per `write` (a log interval, an eval) and a `ProgressBar`.

  Args:
    workdir: run directory.
    total_steps: for the progress bar.
    start_step: the step training resumes from; JSONL records after it are removed (they
      belong to the part of a killed run that is being recomputed).
    tensorboard, progress: enable those outputs.
    budget_minutes, spent_minutes: a compute budget (> 0) and the part of it already spent:
      the progress bar then counts minutes.
    enabled: default `jax.process_index() == 0`.
  """

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int | None = None,
               start_step: int = 0, tensorboard: bool = True, progress: bool = True,
               budget_minutes: float = 0.0, spent_minutes: float = 0.0,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self._tb = self._bar = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_after(start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=str(self.path.parent / TB_DIR))
    # A bar only where someone watches: in a log file (a sweep's) it is thousands of redraws.
    if progress and sys.stderr.isatty():
      self._bar = ProgressBar(total_steps=total_steps, start_step=start_step,
                              budget_minutes=budget_minutes, spent_minutes=spent_minutes)

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get('step', 0) <= step]
    if len(keep) != len(lines):
      logging.info('metrics.jsonl: dropped %d records after resume step %d',
                   len(lines) - len(keep), step)
      tmp = self.path.with_suffix('.tmp')
      tmp.write_text(''.join(ln + '\n' for ln in keep))
      tmp.replace(self.path)

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = 'train',
            label: str = '') -> None:
    """Appends one record `{prefix}/{name}` for each scalar at `step`, and logs one line
    (`label` after the step, e.g. 'eval (3.2s)')."""
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    bad = []
    for name, value in scalars.items():
      key = f'{prefix}/{name}' if prefix else name
      record[key] = _clean(value)
      if record[key] is None:
        bad.append(key)
      elif self._tb is not None:
        self._tb.add_scalar(key, record[key], int(step))
    if bad:
      logging.warning('step %d: non-finite metrics %s written as null', step, bad)
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self._bar is not None and prefix == 'train':
      self._bar.show(scalars)
    with self._bar.cleared() if self._bar is not None else contextlib.nullcontext():
      logging.info('step %d %s%s', step, f'{label}: ' if label else '', ', '.join(
          f"{f'{prefix}/' if prefix else ''}{k}={float(v):.5g}" for k, v in scalars.items()))

  def advance(self, step: int, minutes: float | None = None) -> None:
    """Moves the progress bar to `step` (with a budget: to `minutes` spent)."""
    if self._bar is not None:
      self._bar.advance(step, minutes)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None
