"""Metric output: tqdm progress, `workdir/metrics.jsonl`, TensorBoard events; process 0 only.

Every line of `metrics.jsonl` is one JSON object `{"step": int, "time": float,
"<prefix>/<name>": float | null, ...}` (null for NaN/Inf, which JSON cannot hold). On resume
the file is cut back to the restored step, so it reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax

METRICS_FILE = 'metrics.jsonl'
TB_DIR = 'tensorboard'


# Best-value rule: a metric whose last name component contains one of these words is better
# when lower (checked first), or when higher; anything else has no "best" (left blank).
LOWER_IS_BETTER = ('loss', 'perplexity', 'ppl', 'error', 'err', 'wer', 'cer', 'nll', 'bpc',
                   'bpb', 'entropy', 'nonfinite')
HIGHER_IS_BETTER = ('accuracy', 'acc', 'bleu', 'chrf', 'f1', 'precision', 'recall', 'auc',
                    'rouge', 'match', 'score')


def metric_mode(name: str) -> str | None:
  """'min', 'max' or None (unknown): which direction is best for eval metric `name`.

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


def best_values(records: Sequence[Mapping[str, Any]], keys: Iterable[str]
                ) -> dict[str, dict[str, Any]]:
  """`{key: {'value': best, 'step': its step}}` over metric `records`, in the direction
  `metric_mode` gives; null (non-finite) values are skipped and metrics with no known
  direction (counts) have no best."""
  best: dict[str, dict[str, Any]] = {}
  for key in keys:
    mode = metric_mode(key)
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


class MetricWriter:
  """Writes scalars to console/JSONL/TensorBoard on process 0; a no-op elsewhere.

  Args:
    workdir: run directory.
    total_steps: for the progress bar.
    start_step: the step training resumes from; JSONL records after it are removed (they
      belong to the part of a killed run that is being recomputed).
    tensorboard, progress: enable those outputs.
    enabled: default `jax.process_index() == 0`.
  """

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int | None = None,
               start_step: int = 0, tensorboard: bool = True, progress: bool = True,
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
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       mininterval=1.0)

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

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = 'train') -> None:
    """Appends one record `{prefix}/{name}` for each scalar at `step`."""
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
      shown = {k: f'{v:.4g}' for k, v in scalars.items() if k in ('loss', 'accuracy')}
      if 'tokens_per_second' in scalars:
        shown['tok/s'] = f"{scalars['tokens_per_second']:.4g}"
      if 'flops_utilisation' in scalars:
        shown['util'] = f"{scalars['flops_utilisation']:.0%}"
      self._bar.set_postfix(shown, refresh=False)
    logging.info('step %d %s', step, ', '.join(
        f"{f'{prefix}/' if prefix else ''}{k}={float(v):.5g}" for k, v in scalars.items()))

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step`."""
    if self._bar is not None and step > self._bar.n:
      self._bar.update(step - self._bar.n)

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
