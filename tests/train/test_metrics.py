from __future__ import annotations

import json
import math

import pytest

from attn_jax.train.metrics import METRICS_FILE, TB_DIR, MetricWriter, read_metrics


def test_writer_jsonl_tensorboard_and_nonfinite(tmp_path):
  w = MetricWriter(tmp_path, total_steps=10, progress=True, enabled=True)
  w.write(1, {'loss': 2.5, 'accuracy': 0.25})
  w.write(2, {'valid/loss': math.nan}, prefix='')
  w.advance(2)
  w.close()
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2]
  assert records[0]['train/loss'] == 2.5 and records[0]['train/accuracy'] == 0.25
  assert records[1]['valid/loss'] is None  # NaN is not JSON: written as null.
  assert any(p.name.startswith('events.out.tfevents') for p in (tmp_path / TB_DIR).iterdir())


def test_resume_truncates_records_after_start_step(tmp_path):
  w = MetricWriter(tmp_path, tensorboard=False, progress=False, enabled=True)
  for step in (1, 2, 3, 4):
    w.write(step, {'loss': float(step)})
  w.close()
  w = MetricWriter(tmp_path, start_step=2, tensorboard=False, progress=False, enabled=True)
  w.write(3, {'loss': 30.0})
  w.close()
  assert [(r['step'], r['train/loss']) for r in read_metrics(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricWriter(tmp_path, enabled=False)
  w.write(1, {'loss': 1.0})
  w.close()
  assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / TB_DIR).exists()
  assert read_metrics(tmp_path) == []


def test_malformed_line_names_file_and_line(tmp_path):
  (tmp_path / METRICS_FILE).write_text(json.dumps({'step': 1}) + '\n{oops\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: not a JSON line'):
    read_metrics(tmp_path)


def test_run_summary_best_follows_metric_direction():
  # The DONE file's "best": min for losses, max for accuracies, none for a count (no
  # direction), and a missing (None) value is skipped.
  from attn_jax.train.metrics import best_values
  records = [
      {'step': 100, 'valid/loss': 2.0, 'valid/sequence_accuracy': 0.5, 'valid/num_tokens': 9},
      {'step': 200, 'valid/loss': 1.0, 'valid/sequence_accuracy': None, 'valid/num_tokens': 9},
      {'step': 300, 'valid/loss': 1.5, 'valid/sequence_accuracy': 0.9},
      {'step': 300, 'train/loss': 0.1},
  ]
  best = best_values(records, ['valid/loss', 'valid/sequence_accuracy', 'valid/num_tokens'])
  assert best == {'valid/loss': {'value': 1.0, 'step': 200},
                  'valid/sequence_accuracy': {'value': 0.9, 'step': 300}}
