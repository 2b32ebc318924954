"""What the examples of each data task hold: one table that the data layer reads instead of
comparing task names.

    fmt = format_of(task_of(cfg))
    if fmt.paired: ...   # a source and a target token stream (seq2seq)

A task's format says which canonical text fields its examples carry, whether they carry an int
label, whether there are two token streams (inputs and targets), whether the one stream is
predicted from itself (language modelling: rows may be cut from concatenated text), and
whether the examples are images rather than tokens. The experiment layer's task objects
(`attn_jax.experiment.tasks`) are keyed by the same names.

JAX-free: config code reads it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataFormat:
  """The examples of one data task.

  Attributes:
    name: the task name (`meta['task']`, `config.task_of`).
    fields: canonical text fields of an example, in order (tokenized into streams).
    labeled: an int `label` per example (so rows cannot be packed together).
    paired: two token streams, `inputs` from `fields[0]` and `targets` from `fields[1]`.
    lm: one stream predicted from itself (`batching='concat'` may cut rows from it).
    images: examples are images (`attn_jax.data.images`), not text.
  """
  name: str
  fields: tuple[str, ...] = ('text',)
  labeled: bool = False
  paired: bool = False
  lm: bool = False
  images: bool = False

  def features(self) -> dict[str, str]:
    """Canonical field -> record key of the local and generated builders (the same names)."""
    return {f: f for f in self.fields + (('label',) if self.labeled else ())}


FORMATS: dict[str, DataFormat] = {
    'seq2seq': DataFormat('seq2seq', ('source', 'target'), paired=True),
    'classification': DataFormat('classification', labeled=True),
    'lm': DataFormat('lm', lm=True),
    'image_classification': DataFormat('image_classification', (), labeled=True, images=True),
}
TEXT_TASKS = tuple(name for name, fmt in FORMATS.items() if not fmt.images)


def format_of(task: str) -> DataFormat:
  if task not in FORMATS:
    raise ValueError(f'data task {task!r} is not one of {tuple(FORMATS)}')
  return FORMATS[task]
