"""Grain stages that turn tokenized examples into static-shape batches.

Examples are dicts of 1-D int32 arrays ('inputs', 'targets') and scalars ('label'). Three ways to
batch them, all giving a small fixed set of shapes so `jit` compiles a few times at most:

    pad      batches in arrival order; each sequence feature is padded to the smallest of
             `length_boundaries(max_length, n)` that holds the batch's longest example
    bucket   the same padding, but examples are first sorted by length within a window of
             `window` batches, and the window's batches come out in a seeded random order
             (like fairseq / torchtext bucket iterators): little padding, no length bias in order
    pack     several examples share a row (grain first-fit packing, as in the T5 and flax wmt
             pipelines), with '<feature>_segmentation' (1, 2, ...; 0 = pad) and
             '<feature>_position' (restarting at 0 in every segment)
    concat   language modelling: documents concatenated and cut into rows of exactly max_length
             (grain concat-then-split), long documents continuing on the next row

Token budget (`data.max_tokens`, as fairseq's --max-tokens): instead of a fixed row count,
training batches hold at most `max_tokens` (per process) padded tokens. In 'pad'/'bucket' mode
`TokenBuckets` gives every length bucket its own static row count (max_tokens // width) and
`TokenBucketBatchIterDataset` fills batches greedily from length-sorted windows; in 'pack' and
'concat' mode rows are max_length wide, so the budget only sets the row count (`token_rows`).

Every stage is a grain IterDataset whose iterator has get_state()/set_state(), so a restored
iterator yields exactly the batches the original would have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

SEQUENCE_FEATURES = ('inputs', 'targets')
BATCHING_MODES = ('pad', 'bucket', 'pack', 'concat')
LENGTH_POLICIES = ('truncate', 'filter')


def _ladder(max_length: int, num_buckets: int) -> tuple[int, ...]:
  # Ascending, duplicates kept, so index i is max_length / 2**(num_buckets-1-i) for every
  # feature: features of different max lengths share bucket indices.
  return tuple(min(max_length, max(8, 8 * math.ceil(max_length / 2 ** i / 8)))
               for i in reversed(range(num_buckets)))


def length_boundaries(max_length: int, num_buckets: int) -> tuple[int, ...]:
  """Padded lengths: max_length, max_length/2, ... (num_buckets of them, rounded up to 8)."""
  return tuple(sorted(set(_ladder(max_length, num_buckets))))


def token_rows(max_tokens: int, width: int, row_multiple: int = 1) -> int:
  """Rows of `width` tokens that fit in `max_tokens`, rounded down to a multiple of row_multiple.

  Raises:
    ValueError: if not even `row_multiple` rows fit.
  """
  if row_multiple < 1:
    raise ValueError(f'row_multiple={row_multiple} must be >= 1.')
  rows = max_tokens // width // row_multiple * row_multiple
  if rows < 1:
    raise ValueError(f'data.max_tokens: {max_tokens} tokens per process hold no multiple of '
                     f'row_multiple={row_multiple} rows of width {width}; need at least '
                     f'{width * row_multiple}.')
  return rows


class LengthPolicy:
  """Truncates (keeping the final EOS) or filters examples over the length limits, counting them.

  Used with `IterDataset.filter` (returns False to drop) after tokenization. Counts are per
  process and logged at 1, 2, 4, 8, ... occurrences so a long run does not flood the log.
  """

  def __init__(self, max_lengths: dict[str, int], policy: str, eos_id: int = 2):
    if policy not in LENGTH_POLICIES:
      raise ValueError(f'length_policy={policy!r}; allowed: {LENGTH_POLICIES}.')
    self.max_lengths = dict(max_lengths)
    self.policy = policy
    self.eos_id = eos_id
    self.counts = {'truncated': 0, 'filtered': 0, 'seen': 0}

  def _count(self, what: str, feature: str, length: int) -> None:
    self.counts[what] += 1
    n = self.counts[what]
    if n & (n - 1) == 0:
      logging.warning('%s %d example(s) so far (latest: %s of length %d > %d; %d seen).',
                      what.capitalize(), n, feature, length, self.max_lengths[feature],
                      self.counts['seen'])

  def __call__(self, example: dict[str, Any]) -> bool:
    self.counts['seen'] += 1
    over = [(f, len(example[f])) for f, m in self.max_lengths.items()
            if f in example and len(example[f]) > m]
    if not over:
      return True
    if self.policy == 'filter':
      self._count('filtered', *over[0])
      return False
    for f, _ in over:
      m = self.max_lengths[f]
      # The sequence still ends with EOS, as the batch contract requires.
      example[f] = np.concatenate([example[f][:m - 1], np.array([self.eos_id], np.int32)])
    self._count('truncated', *over[0])
    return True


class PadBatch:
  """Stacks examples, padding each sequence feature to a length from its boundaries.

  Args:
    boundaries: feature -> sorted allowed padded lengths (the last is the max length).
    batch_size: rows per batch; a short final (eval) batch gets all-pad rows appended, so the
      shape stays static. Such rows have inputs (and targets) all 0, label 0: weight them out
      with `(inputs != 0).any(-1)` (a real example always holds at least EOS).
  """

  def __init__(self, boundaries: dict[str, Sequence[int]], batch_size: int):
    self.boundaries = {k: tuple(v) for k, v in boundaries.items()}
    self.batch_size = batch_size

  def padded_length(self, feature: str, length: int) -> int:
    for b in self.boundaries[feature]:
      if length <= b:
        return b
    raise ValueError(f'{feature} of length {length} exceeds the largest boundary '
                     f'{self.boundaries[feature][-1]}; apply LengthPolicy first.')

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in examples[0]:
      if key in self.boundaries:
        width = self.padded_length(key, max(len(e[key]) for e in examples))
        arr = np.zeros((self.batch_size, width), np.int32)
        for i, e in enumerate(examples):
          arr[i, :len(e[key])] = e[key]
      else:
        arr = np.zeros((self.batch_size,), np.int32)
        arr[:len(examples)] = [e[key] for e in examples]
      out[key] = arr
    return out


class _FixedRows:
  """Groups length-sorted examples into batches of `batch_size` (the last may be short)."""

  def __init__(self, batch_size: int, drop_remainder: bool):
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder

  def __call__(self, examples: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    key = [max(len(e[f]) for f in SEQUENCE_FEATURES if f in e) for e in examples]
    order = np.argsort(np.asarray(key, np.int64), kind='stable')
    batches = [[examples[j] for j in order[i:i + self.batch_size]]
               for i in range(0, len(order), self.batch_size)]
    if batches and self.drop_remainder and len(batches[-1]) < self.batch_size:
      batches.pop()
    return batches


class _SortedWindowIterator(grain_dataset.DatasetIterator):
  """Reads `window_size` examples, groups them by length (`group`), emits shuffled batches.

  State: the parent's state at the start of the current window and how many of its batches
  were emitted; restoring re-reads the window (deterministically) and skips those.
  """

  def __init__(self, parent, *, window_size, group, batch_fn, seed, shuffle):
    super().__init__(parent)
    self._window_size = window_size
    self._group = group
    self._seed = seed
    self._batch_fn = batch_fn
    self._shuffle = shuffle
    self._window_start = self._parent.get_state()
    self._window_index = 0
    self._batches: list[list[dict]] = []
    self._emitted = 0

  def _fill(self) -> None:
    self._window_start = self._parent.get_state()
    examples = []
    for _ in range(self._window_size):
      try:
        examples.append(next(self._parent))
      except StopIteration:
        break
    batches = self._group(examples) if examples else []
    if self._shuffle:
      perm = np.random.default_rng([self._seed, self._window_index]).permutation(len(batches))
      batches = [batches[i] for i in perm]
    self._batches = batches
    self._emitted = 0

  def __next__(self):
    if self._emitted >= len(self._batches):
      if self._batches:
        self._window_index += 1
      self._fill()
      if not self._batches:
        raise StopIteration
    batch = self._batches[self._emitted]
    self._emitted += 1
    return self._batch_fn(batch)

  def get_state(self) -> dict[str, Any]:
    return {'window_start': self._window_start, 'window_index': self._window_index,
            'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['window_start'])
    self._window_index = state['window_index']
    emitted = state['emitted']
    self._fill()
    self._emitted = emitted


class SortedWindowBatchIterDataset(grain.IterDataset):
  """Length-bucketed batching by sorting within windows of batches (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, window: int, seed: int,
               batch_fn, drop_remainder: bool, shuffle: bool = True):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f'bucket window={window} must be >= 1.')
    self._batch_size, self._window = batch_size, window
    self._kwargs = dict(window_size=window * batch_size, seed=seed, batch_fn=batch_fn,
                        group=_FixedRows(batch_size, drop_remainder), shuffle=shuffle)

  def __iter__(self):
    return _SortedWindowIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return f'SortedWindowBatchIterDataset({self._batch_size}x{self._window})'


class TokenBuckets:
  """Length buckets with a static row count each, set by a token budget (fairseq --max-tokens).

  Bucket i pads every sequence feature to the i-th of its `num_buckets` halvings of its max
  length (ascending, as `length_boundaries`, but indexed alike for all features, so seq2seq
  inputs and targets of different max lengths still give at most `num_buckets` shapes);
  buckets with identical widths are merged. An example's bucket is the first that holds all
  its features, i.e. the max over features of each feature's boundary index. Bucket i has
  `token_rows(max_tokens, max-over-features width_i, row_multiple)` rows, so every batch holds
  at most `max_tokens` padded tokens per feature.

  Used as the `group` of `TokenBucketBatchIterDataset` (greedy batches of length-sorted
  examples) and as its batch function (stacks and pads a batch to its bucket's shape; a batch
  with fewer examples than rows gets all-pad rows, as `PadBatch` does).

  Args:
    max_lengths: feature -> max length ('inputs', and 'targets' for seq2seq).
    num_buckets: as `data.num_length_buckets`.
    max_tokens: per-process token budget of one batch.
    row_multiple: every row count is a multiple of it (e.g. the local device count for pmap).

  Attributes:
    widths: per bucket, feature -> padded width (ascending).
    rows: per bucket, the row count (non-increasing).
  """

  def __init__(self, max_lengths: dict[str, int], num_buckets: int, max_tokens: int,
               row_multiple: int = 1):
    ladders = {f: _ladder(m, num_buckets) for f, m in max_lengths.items()}
    widths = []
    for i in range(num_buckets):
      w = {f: ladder[i] for f, ladder in ladders.items()}
      if not widths or w != widths[-1]:
        widths.append(w)
    self.widths = widths
    self.rows = [token_rows(max_tokens, max(w.values()), row_multiple) for w in widths]
    self.max_tokens = max_tokens

  def shapes(self) -> list[list[int]]:
    """Per bucket [rows, width], width the widest feature's."""
    return [[r, max(w.values())] for r, w in zip(self.rows, self.widths, strict=True)]

  def bucket_of(self, example: dict[str, Any]) -> int:
    for i, w in enumerate(self.widths):
      if all(len(example[f]) <= n for f, n in w.items() if f in example):
        return i
    lengths = {f: len(example[f]) for f in self.widths[-1] if f in example}
    raise ValueError(f'example lengths {lengths} exceed the largest bucket {self.widths[-1]}; '
                     'apply LengthPolicy first.')

  def group(self, examples: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Greedy batches over examples sorted by (bucket, length); none is dropped."""
    buckets = [self.bucket_of(e) for e in examples]
    longest = [max(len(e[f]) for f in self.widths[0] if f in e) for e in examples]
    batches, current = [], []
    for j in np.lexsort((np.asarray(longest, np.int64), np.asarray(buckets, np.int64))):
      # Sorted by bucket, so adding example j makes the batch bucket buckets[j]: close the
      # batch first if that bucket's row count is already reached.
      if current and len(current) >= self.rows[buckets[j]]:
        batches.append(current)
        current = []
      current.append(examples[j])
    if current:
      batches.append(current)
    return batches

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    bucket = max(self.bucket_of(e) for e in examples)
    rows = self.rows[bucket]
    if len(examples) > rows:
      raise ValueError(f'{len(examples)} examples > {rows} rows of bucket {bucket}.')
    out = {}
    for key in examples[0]:
      if key in self.widths[bucket]:
        arr = np.zeros((rows, self.widths[bucket][key]), np.int32)
        for i, e in enumerate(examples):
          arr[i, :len(e[key])] = e[key]
      else:
        arr = np.zeros((rows,), np.int32)
        arr[:len(examples)] = [e[key] for e in examples]
      out[key] = arr
    return out


class TokenBucketBatchIterDataset(grain.IterDataset):
  """Batches bounded by tokens: `TokenBuckets` shapes, greedy over length-sorted windows.

  Each window holds `window * buckets.rows[0]` examples (`window` batches of the narrowest,
  most-rowed bucket); its batches come out in a seeded random order, like
  `SortedWindowBatchIterDataset`. No example is dropped: a window's partly filled batches
  (at most one per bucket: where the sorted order moves to the next bucket, and the last) get
  all-pad rows. The iterator state is
  exact, as for `SortedWindowBatchIterDataset`.
  """

  def __init__(self, parent: grain.IterDataset, *, buckets: TokenBuckets, window: int,
               seed: int, shuffle: bool = True):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f'bucket window={window} must be >= 1.')
    self._buckets, self._window = buckets, window
    self._kwargs = dict(window_size=window * buckets.rows[0], group=buckets.group,
                        batch_fn=buckets, seed=seed, shuffle=shuffle)

  def __iter__(self):
    return _SortedWindowIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return f'TokenBucketBatchIterDataset({self._buckets.shapes()}, window={self._window})'


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 in each segment of `segment_ids` [..., length]; 0 on padding."""
  seg = np.asarray(segment_ids)
  idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
  starts = np.concatenate([np.ones(seg.shape[:-1] + (1,), bool),
                           seg[..., 1:] != seg[..., :-1]], axis=-1)
  start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
  return np.where(seg > 0, idx - start_idx, 0).astype(np.int32)


class FinalizePacked:
  """Renames grain's packing outputs to the batch contract and normalizes positions.

  grain: 'inputs_segment_ids', 'inputs_positions' -> contract: 'inputs_segmentation',
  'inputs_position'. Positions are recomputed from the segment ids so they restart at 0 in each
  segment even for rows that continue a split document (concat-then-split keeps the document's
  offset, which a learned position table of size max_length cannot index).
  """

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in batch.items():
      if key.endswith('_segment_ids'):
        out[key[:-len('_segment_ids')] + '_segmentation'] = value.astype(np.int32)
      elif key.endswith('_positions'):
        continue
      else:
        out[key] = np.asarray(value, np.int32)
    for f in SEQUENCE_FEATURES:
      if f + '_segmentation' in out:
        seg = out[f + '_segmentation']
        out[f + '_position'] = segment_positions(seg)
        out[f] = np.where(seg > 0, out[f], 0).astype(np.int32)
    return out


def pack(ds: grain.IterDataset, *, max_lengths: dict[str, int], batch_size: int,
         num_bins: int, seed: int, shuffle: bool, drop_remainder: bool) -> grain.IterDataset:
  """First-fit packing into rows of `max_lengths`, then batches of `batch_size` rows."""
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=dict(max_lengths), num_packing_bins=num_bins, seed=seed,
      shuffle_bins=shuffle)
  return ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=_PadRows(batch_size)).map(FinalizePacked())


def concat_split(ds: grain.IterDataset, *, max_length: int, batch_size: int,
                 drop_remainder: bool) -> grain.IterDataset:
  """LM rows of exactly `max_length` tokens cut from concatenated documents."""
  ds = _JsonSafeConcatState(
      grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={'inputs': max_length}))
  return ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=_PadRows(batch_size)).map(FinalizePacked())


class _JsonSafeConcatIterator(grain_dataset.DatasetIterator):
  """Delegates to grain's concat-then-split iterator, restoring tuples that JSON made lists.

  grain 0.2.18 compares `remainder_slices` values with the tuple (-1, -1); after a JSON round
  trip (what checkpoints store) they are lists, the comparison fails, and the restored iterator
  silently skips part of a document. Restoring tuples makes the checkpointed state exact.
  """

  def __init__(self, parent):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    state = dict(state)
    state['remainder_slices'] = {k: tuple(v) for k, v in state['remainder_slices'].items()}
    self._parent.set_state(state)


class _JsonSafeConcatState(grain.IterDataset):
  def __iter__(self):
    return _JsonSafeConcatIterator(self._parent.__iter__())


class _FixedCountIterator(grain_dataset.DatasetIterator):
  def __init__(self, parent, num_batches, template):
    super().__init__(parent)
    self._num_batches = num_batches
    self._template = template
    self._emitted = 0

  def __next__(self):
    if self._emitted >= self._num_batches:
      extra = next(self._parent, None)
      if extra is not None:
        raise ValueError(f'FixedBatchCountIterDataset: more than num_batches='
                         f'{self._num_batches} batches upstream.')
      raise StopIteration
    try:
      batch = next(self._parent)
    except StopIteration:
      batch = {k: np.zeros_like(v) for k, v in self._template.items()}
    self._emitted += 1
    return batch

  def get_state(self):
    return {'parent': self._parent.get_state(), 'emitted': self._emitted}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._emitted = state['emitted']


class FixedBatchCountIterDataset(grain.IterDataset):
  """Appends all-pad batches (shaped like `template`) until exactly `num_batches` were yielded.

  Multi-host evaluation needs every process to run the same number of steps, or collective
  ops wait forever; shards differ by one example, hence sometimes by one batch. The parent
  must not yield more than `num_batches` batches (checked: ValueError).
  """

  def __init__(self, parent: grain.IterDataset, *, num_batches: int,
               template: dict[str, np.ndarray]):
    super().__init__(parent)
    self._num_batches = num_batches
    self._template = template

  def __iter__(self):
    return _FixedCountIterator(self._parent.__iter__(), self._num_batches, self._template)


class _PadRows:
  """Stacks equal-shape rows, appending all-zero rows up to batch_size (short eval batches)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
      stacked = np.stack([np.asarray(r[key]) for r in rows])
      if len(rows) < self.batch_size:
        pad = np.zeros((self.batch_size - len(rows),) + stacked.shape[1:], stacked.dtype)
        stacked = np.concatenate([stacked, pad])
      out[key] = stacked
    return out
