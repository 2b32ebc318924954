"""Named TFDS datasets (downloaded by TFDS for users with network access) and their fields.

Each entry says which task the dataset serves and how its features map onto the canonical
example fields the pipeline tokenizes:

    seq2seq          {'source': str, 'target': str}
    classification   {'text': str, 'label': int}
    lm               {'text': str}

Translation pairs follow the TFDS config, `wmt14_translate/de-en` reads German -> English;
`reverse_translation=True` swaps the direction. Any `wmtNN_translate/xx-yy` is accepted. The WMT
builders import TensorFlow (pip install 'attn_jax[tf]'); the others do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

from attn_jax.data.formats import format_of

NAMED_DATASETS = ('wmt14_translate/de-en', 'wmt17_translate/de-en', 'imdb_reviews',
                  'ag_news_subset', 'lm1b', 'tiny_shakespeare')
_WMT = re.compile(r'^(wmt\d\d_translate)/([a-z]{2})-([a-z]{2})$')


@dataclasses.dataclass(frozen=True)
class NamedSpec:
  """How to read one named TFDS dataset.

  Attributes:
    task: 'seq2seq' | 'classification' | 'lm'.
    fields: TFDS feature names: (source, target) | text features joined by ' ' | (text,).
    label: the TFDS label feature (classification).
    num_classes: number of classes (classification).
    train_split / eval_splits: TFDS split names.
  """

  task: str
  fields: tuple[str, ...]
  label: str = ''
  num_classes: int = 0
  train_split: str = 'train'
  eval_splits: tuple[str, ...] = ('test',)


_SPECS = {
    'imdb_reviews': NamedSpec('classification', ('text',), 'label', 2),
    'ag_news_subset': NamedSpec('classification', ('title', 'description'), 'label', 4),
    'lm1b': NamedSpec('lm', ('text',)),
    'tiny_shakespeare': NamedSpec('lm', ('text',), eval_splits=('validation', 'test')),
}


def is_named(name: str) -> bool:
  return name in _SPECS or bool(_WMT.match(name))


def spec_for(name: str, *, reverse_translation: bool = False) -> NamedSpec:
  """The NamedSpec of `name`; ValueError listing the known names otherwise."""
  m = _WMT.match(name)
  if m:
    src, tgt = m.group(2), m.group(3)
    if reverse_translation:
      src, tgt = tgt, src
    return NamedSpec('seq2seq', (src, tgt), eval_splits=('validation', 'test'))
  if name not in _SPECS:
    raise ValueError(f'Unknown named TFDS dataset {name!r}; allowed: {NAMED_DATASETS} '
                     '(or any wmtNN_translate/xx-yy).')
  return _SPECS[name]


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Canonicalize:
  """Maps a raw TFDS record onto the canonical fields of `spec.task` (picklable)."""

  def __init__(self, spec: NamedSpec):
    self.spec = spec

  def __call__(self, record: dict) -> dict:
    s, fmt = self.spec, format_of(self.spec.task)
    if fmt.paired:
      return {'source': _text(record[s.fields[0]]), 'target': _text(record[s.fields[1]])}
    out = {'text': ' '.join(_text(record[f]) for f in s.fields)}
    if fmt.labeled:
      out['label'] = int(record[s.label])
    return out


def load_builder(name: str, data_dir: str | None):
  """`tfds.builder(name)`, downloading and preparing it if needed, with clear errors."""
  import tensorflow_datasets as tfds

  from attn_jax.data import builders

  if _WMT.match(name) and importlib.util.find_spec('tensorflow') is None:
    raise ValueError(f'{name} needs TensorFlow for its TFDS builder: '
                     "pip install 'attn_jax[tf]' (tensorflow>=2.16).")
  try:
    tfds.builder(name, data_dir=data_dir, file_format='array_record')
  except Exception as e:  # TFDS raises several types (DatasetNotFoundError, ...)
    raise ValueError(f'TFDS could not load {name!r} (data_dir={data_dir!r}): {e}') from e
  return builders.prepare_once(
      lambda: tfds.builder(name, data_dir=data_dir, file_format='array_record'), name)
