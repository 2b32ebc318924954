"""Tasks: one module per kind of task, registered here by the data task it trains on.

    task = make_task(config, meta)           # meta: DataBundle.meta (vocab sizes, classes...)
    train_loop(config, workdir, init_params=task.init_params, loss_fn=task.loss_fn,
               count_tokens=task.count_tokens, eval_hooks=make_evaluators(config, task, ...))

`config.model.kind` picks the model (`attn_jax.models.kinds`); the data's task (`meta['task']`)
picks the task object, which must list that kind in its `model_kinds` (without one, the task
that lists the kind). Every other field of `config.model` is a field of the kind's config
dataclass, except the sizes the data decides (`Task.data_fields`). What a task
declares is described in `tasks/base.py`; `docs/add_a_task.md` adds one.

`TASKS` is a plain dict: a new kind of task is a module with a `Task` subclass and one entry
here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from attn_jax.experiment.config import DATA_FIELDS, MODEL_KINDS, check_model_kind
from attn_jax.experiment.tasks.base import Task
from attn_jax.experiment.tasks.classification import ClassificationTask
from attn_jax.experiment.tasks.image_classification import ImageClassificationTask
from attn_jax.experiment.tasks.language_model import LanguageModelTask
from attn_jax.experiment.tasks.seq2seq import Seq2SeqTask
from attn_jax.experiment.tasks.token_loss import softmax_loss_from_hidden
from attn_jax.models import configs as model_configs
from attn_jax.models import modifiers
from attn_jax.models.attention import rope_scaling

__all__ = ['TASKS', 'Task', 'build_model_config', 'make_task', 'softmax_loss_from_hidden',
           'task_class']

# The data task name (`meta['task']`, `attn_jax.data.task_of`) -> its task class.
TASKS: dict[str, type[Task]] = {
    'seq2seq': Seq2SeqTask,
    'classification': ClassificationTask,
    'lm': LanguageModelTask,
    'image_classification': ImageClassificationTask,
}


def task_class(kind: Any, data_task: str | None = None) -> type[Task]:
  """The task class for model kind `kind` on data of task `data_task` (the data's
  `meta['task']`, `attn_jax.data.task_of`): `TASKS[data_task]`, which must list `kind`; without
  `data_task`, the one task that lists `kind`.

  Raises:
    ValueError: naming `config.model.kind` when it is unknown or does not serve the data.
  """
  check_model_kind(kind)
  serving = [task for task in TASKS.values() if kind in task.model_kinds]
  if data_task is None:
    if len(serving) != 1:
      raise ValueError(f'config.model.kind={kind!r} is served by {len(serving)} tasks '
                       f'{[t.name for t in serving]}: say which (the data meta\'s task)')
    return serving[0]
  task = TASKS.get(data_task)
  if task is None:
    raise ValueError(f'the data is of task {data_task!r}, which has no task object; TASKS: '
                     f'{sorted(TASKS)}')
  if kind not in task.model_kinds:
    served = '/'.join(repr(t.name) for t in serving) or 'no'
    raise ValueError(f'config.model.kind={kind!r} serves {served} data but the dataset is '
                     f'{data_task!r}; use one of {list(task.model_kinds)}')
  return task


def build_model_config(model_config: Mapping[str, Any], meta: Mapping[str, Any]) -> Any:
  """The model's config dataclass from `config.model` and the data's vocab sizes/classes.

  `config.model` holds every field of the dataclass (see `config.model_section`), so the
  dataclass is built from those fields alone: no size variant fills anything in.

  Raises:
    ValueError: unknown kind, unknown or missing field, a kind that does not serve the data's
      task, or any invalid field value (checked by the dataclass).
  """
  fields = dict(model_config)
  kind = fields.pop('kind', None)
  task_cls = task_class(kind, meta.get('task'))
  cls = MODEL_KINDS[kind].config_class
  bad = sorted(set(fields) & set(DATA_FIELDS))
  if bad:
    raise ValueError(f'config.model.{bad[0]} comes from the data (tokenizer/labels); remove it')
  _check_fields(fields, cls, kind, 'config.model')
  known = {f.name for f in dataclasses.fields(cls)}
  data = task_cls.data_fields(meta)
  if 'max_len' in known:
    # Learned position tables (and decode caches) must cover the data's longest sequence.
    longest = max(int(meta.get('max_length', 0)), int(meta.get('max_target_length', 0))) + 2
    fields['max_len'] = max(int(fields.get('max_len', 0)), longest)
  model_config = cls(**fields, **data)
  attention = getattr(model_config, 'attention', None)
  if isinstance(attention, model_configs.AttentionConfig):  # names resolve before compiles
    modifiers.check_names(attention)
    rope_scaling(attention)  # and the RoPE scaling's options fit
  return model_config


def _check_fields(fields: Mapping[str, Any], cls: type, kind: str, where: str) -> None:
  """`fields` has exactly the fields of `cls` (nested config sections recursively), bar the
  data-derived ones: a typo or a hand-built section fails here, naming the field."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{where} has unknown field(s) {unknown} for kind={kind!r}; known: '
                     f'{sorted(known - set(DATA_FIELDS))}')
  missing = sorted(known - set(DATA_FIELDS) - set(fields))
  if missing:
    raise ValueError(f'{where} lacks field(s) {missing}; build the section with '
                     'attn_jax.experiment.config.model_section')
  for f in dataclasses.fields(cls):
    nested = model_configs.nested_config_class(f)
    if nested is not None:
      if not isinstance(fields[f.name], Mapping):
        raise ValueError(f'{where}.{f.name} must be a section of fields, got '
                         f'{fields[f.name]!r}')
      _check_fields(fields[f.name], nested, kind, f'{where}.{f.name}')


def make_task(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> Task:
  """Builds the model named by `config.model` for the data described by `meta`, and the task
  object around it (needs `config.model` and `config.loss`)."""
  model_config = build_model_config(config.model.to_dict(), meta)
  return task_class(config.model.kind, meta.get('task'))(config, model_config)
