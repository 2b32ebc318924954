"""The files of a run's workdir, and the rules that read them: one home for each name.

    workdir/
      config.json          the full config (JSON)                          CONFIG_FILE
      data_meta.json       vocab sizes, classes, splits... of the data     DATA_META_FILE
      tokenizers.json      role -> tokenizer file in the workdir           TOKENIZERS_FILE
      <role>_<tokenizer>   the tokenizers themselves
      metrics.jsonl        one JSON record per log/eval step               train.metrics
      tensorboard/         TensorBoard events                              train.metrics
      checkpoints/         orbax checkpoints                               train.loop
      samples/, attention/ LM samples and attention heatmaps (evaluators)
      metric_directions.json  eval metric name (or pattern) ->         METRIC_DIRECTIONS_FILE
                           'min' | 'max' | null, as the task and its evaluators declare
      DONE                 JSON: final and best eval metrics, written      DONE_FILE
                           when training completes (not when preempted)
      config_changes.jsonl one JSON record per re-run that changed the     CONFIG_CHANGES_FILE
                           config: {time, step, changes: {field: [old, new]}}
      replaced_<n>/        an earlier run, moved aside whole by            train.loop
                           config.train.on_mismatch='restart' (a workdir of its own)
      FAILED, sweep.log    the sweep runner's record of a crashed run      FAILED_FILE, SWEEP_LOG

`run.train_and_evaluate` writes them, `inference.load_run` and the sweep runner read them.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from attn_jax.train.loop import CHECKPOINTS_DIR, REPLACED_PREFIX
from attn_jax.train.metrics import METRICS_FILE, TB_DIR

CONFIG_FILE = 'config.json'
DATA_META_FILE = 'data_meta.json'
TOKENIZERS_FILE = 'tokenizers.json'
DONE_FILE = 'DONE'
METRIC_DIRECTIONS_FILE = 'metric_directions.json'
CONFIG_CHANGES_FILE = 'config_changes.jsonl'
FAILED_FILE = 'FAILED'
SWEEP_LOG = 'sweep.log'
__all__ = ['CHECKPOINTS_DIR', 'CONFIG_CHANGES_FILE', 'CONFIG_FILE', 'DATA_META_FILE',
           'DONE_FILE', 'FAILED_FILE', 'METRICS_FILE', 'METRIC_DIRECTIONS_FILE', 'REPLACED_PREFIX',
           'SWEEP_LOG', 'TB_DIR', 'TOKENIZERS_FILE', 'is_finished', 'read_done', 'read_json',
           'read_metric_directions', 'write_metric_directions']


def read_json(path: str | os.PathLike) -> Any:
  """A run file's JSON content.

  Raises:
    ValueError: naming the file if it is missing or not valid JSON.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f'{path} does not exist: is {path.parent} a workdir written by '
                     'experiments/train.py?')
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None


def read_done(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The DONE record of `workdir`, or None if training has not completed there."""
  path = pathlib.Path(workdir) / DONE_FILE
  return read_json(path) if path.exists() else None


def is_finished(workdir: str | os.PathLike, num_steps: int | None = None) -> bool:
  """Whether training completed in `workdir`: a DONE record exists and, when `num_steps` is
  given, it reached that step or ran out of data (a config asking for more steps than the
  record holds is unfinished: re-running it resumes)."""
  if num_steps is None:
    return (pathlib.Path(workdir) / DONE_FILE).exists()
  done = read_done(workdir)
  if done is None:
    return False
  return done.get('step', -1) >= num_steps or bool(done.get('data_exhausted'))


def write_metric_directions(workdir: str | os.PathLike, directions: Mapping[str, Any]) -> None:
  """Writes `METRIC_DIRECTIONS_FILE`: metric name within a split (or fnmatch pattern) ->
  'min' | 'max' | None, as `train.metrics.metric_direction` reads it."""
  path = pathlib.Path(workdir) / METRIC_DIRECTIONS_FILE
  path.write_text(json.dumps(dict(directions), indent=1, sort_keys=True), encoding='utf-8')


def read_metric_directions(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The declared metric directions of the run in `workdir`, or None for a run written before
  they were declared (then `train.metrics.metric_mode` ranks its metrics by name)."""
  path = pathlib.Path(workdir) / METRIC_DIRECTIONS_FILE
  return read_json(path) if path.exists() else None
