"""The task registry and what the tasks declare: model kinds, metric directions, evaluators,
token counts; and that no code outside the registry compares task or model-kind names."""

from __future__ import annotations

import ast
import pathlib

import ml_collections
import numpy as np
import pytest

from attn_jax.experiment import tasks
from attn_jax.experiment.config import model_section
from attn_jax.experiment.evaluators.attention_maps import AttentionMapEvaluator
from attn_jax.models.kinds import MODEL_KINDS
from attn_jax.train import throughput
from attn_jax.train.metrics import best_mode, metric_direction

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_data_task_picks_the_task_object_which_must_serve_the_model_kind():
  served = [k for task in tasks.TASKS.values() for k in task.model_kinds]
  assert sorted(served) == sorted(MODEL_KINDS)  # Every kind serves one of today's tasks.
  for name, task in tasks.TASKS.items():
    assert task.name == name
    for kind in task.model_kinds:
      assert tasks.task_class(kind, name) is task and tasks.task_class(kind) is task
  with pytest.raises(ValueError, match=r"config.model.kind='vit' is not one of"):
    tasks.task_class('vit')
  with pytest.raises(ValueError, match=r"kind='decoder_lm' serves 'lm' data but the dataset "
                                       r"is 'seq2seq'; use one of \['encoder_decoder'"):
    tasks.task_class('decoder_lm', 'seq2seq')
  with pytest.raises(ValueError, match="task 'images', which has no task object"):
    tasks.task_class('decoder_lm', 'images')


@pytest.mark.parametrize('key, want', [
    ('validation/loss', 'min'), ('averaged/test/perplexity', 'min'),
    ('validation/tf_sequence_accuracy', 'max'), ('test/sequence_accuracy_len_5_8', 'max'),
    ('validation/bleu', 'max'), ('validation/sample_length', None), ('valid/num_tokens', None),
])
def test_metric_directions_are_declared_not_guessed(key, want):
  directions = {**tasks.TASKS['seq2seq'].metric_directions(),
                **tasks.TASKS['lm'].metric_directions()}
  assert metric_direction(key, directions) == want


def test_best_mode_defaults_to_the_declared_direction():
  directions = tasks.TASKS['classification'].metric_directions()
  train = ml_collections.ConfigDict({'best_metric': 'validation/accuracy', 'best_mode': ''})
  assert best_mode(train, directions) == 'max'
  train.best_mode = 'min'  # Given: kept (a warning says it ranks against the declaration).
  assert best_mode(train, directions) == 'min'
  train.best_metric, train.best_mode = 'validation/sample_length', ''
  with pytest.raises(ValueError, match=r"config.train.best_mode='' .* has none"):
    best_mode(train, tasks.TASKS['lm'].metric_directions())


def _task(kind, meta, **model):
  config = ml_collections.ConfigDict({'model': model_section(kind, 'tiny', **model),
                                      'loss': {'label_smoothing': 0.0}})
  return tasks.make_task(config, meta)


def test_tasks_count_real_tokens_and_rows_as_before():
  batch = {'inputs': np.array([[5, 6, 2, 0], [0, 0, 0, 0]], np.int32),
           'targets': np.array([[7, 2, 0, 0], [0, 0, 0, 0]], np.int32),
           'label': np.array([1, 0], np.int32)}
  seq2seq = _task('rnn_seq2seq', {'task': 'seq2seq', 'vocab_size': 12})
  classifier = _task('encoder_classifier', {'task': 'classification', 'vocab_size': 12,
                                            'num_classes': 3}, pooling='cls')
  # The count throughput.count_tokens guessed from the keys before tasks declared theirs.
  assert seq2seq.count_tokens(batch) == throughput.count_tokens(batch) == 5
  assert classifier.count_tokens(batch) == 3
  np.testing.assert_array_equal(classifier.real_rows(batch), [True, False])
  assert classifier.model_config.num_classes == 3 and classifier.name == 'classification'
  assert tasks.TASKS['classification'].evaluators == (AttentionMapEvaluator,)
  labels = classifier.attention_axes('encoder_self', {'inputs': batch['inputs'][0]},
                                     {'inputs': _Chars()})
  assert labels == (['<cls>', 'c5', 'c6', '</s>'],) * 2  # EOS by its special name


class _Chars:
  def decode(self, ids):
    return ''.join(f'c{i}' for i in ids)


def _compared_names(tree: ast.AST) -> set[str]:
  """String constants compared with == / != / in, anywhere in `tree`."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      for part in [node.left, *node.comparators]:
        for sub in ast.walk(part):
          if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found.add(sub.value)
  return found


def test_no_task_or_model_kind_checks_outside_the_registry():
  names = set(tasks.TASKS) | set(MODEL_KINDS)
  offenders = {}
  for layer in ('experiment', 'train'):
    for path in sorted((ROOT / 'attn_jax' / layer).rglob('*.py')):
      if 'tasks' in path.relative_to(ROOT / 'attn_jax').parts:
        continue
      bad = _compared_names(ast.parse(path.read_text())) & names
      if bad:
        offenders[str(path.relative_to(ROOT))] = sorted(bad)
  assert not offenders, offenders
