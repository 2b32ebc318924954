"""Token-budget batching (data.max_tokens): bounds, static shapes, nothing lost, exact resume."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import pytest

from attn_jax import data
from attn_jax.data import batching
from tests.data.conftest import tiny_config
from tests.data.test_batching import _check_restore


def _examples(n, seed=0, max_in=32, max_tgt=64):
  """Seq2seq examples of varied lengths (tokens 4..19, final EOS=2; never 0, the pad id)."""
  rng = np.random.default_rng(seed)
  return [{'inputs': np.append(rng.integers(4, 20, rng.integers(0, max_in)), 2).astype(np.int32),
           'targets': np.append(rng.integers(4, 20, rng.integers(0, max_tgt)), 2).astype(np.int32)}
          for _ in range(n)]


def _key(inputs, targets):
  return tuple(inputs[inputs != 0]), tuple(targets[targets != 0])


def _check_batches(batches, *, max_tokens, num_buckets, row_multiple):
  """Token bound, few shapes, rows a multiple; returns the real examples the batches hold."""
  shapes = set()
  got = []
  for b in batches:
    rows = b['inputs'].shape[0]
    assert b['targets'].shape[0] == rows and b['inputs'].dtype == np.int32
    assert rows * max(b['inputs'].shape[1], b['targets'].shape[1]) <= max_tokens
    assert rows % row_multiple == 0
    shapes.add((b['inputs'].shape, b['targets'].shape))
    real = (b['inputs'] != 0).any(-1)
    assert not real[np.argmin(real):].any() or real.all()  # all-pad rows only at the end
    got += [_key(i, t) for i, t, r in zip(b['inputs'], b['targets'], real, strict=True) if r]
  assert len(shapes) <= num_buckets
  return got


def test_token_buckets_share_indices_across_features_and_round_rows():
  tb = batching.TokenBuckets({'inputs': 32, 'targets': 64}, 3, max_tokens=200, row_multiple=2)
  assert tb.widths == [{'inputs': 8, 'targets': 16}, {'inputs': 16, 'targets': 32},
                       {'inputs': 32, 'targets': 64}]
  assert tb.rows == [12, 6, 2]  # 200 // 16 = 12, 200 // 32 = 6, 200 // 64 = 3 -> 2
  assert tb.shapes() == [[12, 16], [6, 32], [2, 64]]
  # Bucket = max over features of each one's boundary index.
  assert tb.bucket_of({'inputs': np.ones(20), 'targets': np.ones(3)}) == 2
  assert tb.bucket_of({'inputs': np.ones(3), 'targets': np.ones(17)}) == 1
  b = tb([{'inputs': np.arange(1, 10), 'targets': np.arange(1, 3)}])
  assert b['inputs'].shape == (6, 16) and b['targets'].shape == (6, 32)
  assert (b['inputs'][1:] == 0).all()
  # Identical width pairs merge: at most num_buckets shapes.
  assert batching.TokenBuckets({'inputs': 10}, 3, 40).widths == [{'inputs': 8}, {'inputs': 10}]
  with pytest.raises(ValueError, match='row_multiple=2.*width 64.*need at least 128'):
    batching.TokenBuckets({'inputs': 32, 'targets': 64}, 3, max_tokens=100, row_multiple=2)


@pytest.mark.parametrize('window,row_multiple', [(1, 1), (3, 2), (50, 4)])
def test_token_batches_bound_tokens_and_keep_every_example(window, row_multiple):
  exs = _examples(150)
  tb = batching.TokenBuckets({'inputs': 32, 'targets': 64}, 4, max_tokens=256,
                             row_multiple=row_multiple)
  src = grain.MapDataset.source(exs).to_iter_dataset(grain.ReadOptions(num_threads=1))
  ds = batching.TokenBucketBatchIterDataset(src, buckets=tb, window=window, seed=0)
  batches = list(ds)
  got = _check_batches(batches, max_tokens=256, num_buckets=4, row_multiple=row_multiple)
  assert collections.Counter(got) == collections.Counter(_key(e['inputs'], e['targets'])
                                                         for e in exs)
  for b in batches:
    assert [b['inputs'].shape[0], b['targets'].shape[1]] in tb.shapes()
  if window * tb.rows[0] >= len(exs):  # one window: greedy leaves <= one short batch a bucket
    short = sum(int(not (b['inputs'] != 0).any(-1).all()) for b in batches)
    assert short <= len(tb.rows)


def test_token_batches_restore_exact_next_batches():
  exs = _examples(60, seed=3, max_in=16, max_tgt=16)
  tb = batching.TokenBuckets({'inputs': 16, 'targets': 16}, 2, max_tokens=64, row_multiple=2)

  def make():
    src = grain.MapDataset.source(exs).shuffle(5).repeat(None).to_iter_dataset(
        grain.ReadOptions(num_threads=1))
    return batching.TokenBucketBatchIterDataset(src, buckets=tb, window=2, seed=2)

  for n_before in (0, 2, 7, 30):  # 30: well past the first epoch
    _check_restore(make, n_before=n_before, n_after=6)


def test_max_tokens_validation_names_field_and_numbers():
  data.validate_config(tiny_config('copy', max_tokens=32))  # one 32-wide row fits
  with pytest.raises(ValueError, match=r'data\.max_tokens=-1 must be an int >= 0'):
    data.validate_config(tiny_config('copy', max_tokens=-1))
  with pytest.raises(ValueError, match=r'max_tokens=31 gives 31 tokens.*widest padded row '
                                       r'\(32 tokens.*at least 32'):
    data.validate_config(tiny_config('copy', max_tokens=31))
  with pytest.raises(ValueError, match=r'max_tokens=40 .*\(48 tokens'):
    data.validate_config(tiny_config('copy', max_tokens=40, max_target_length=48))
  with pytest.raises(ValueError, match=r'max_tokens=40 gives 20 tokens per process '
                                       r'\(process_count=2\).*at least 64'):
    data.validate_config(tiny_config('copy', max_tokens=40), process_count=2)


def test_make_datasets_with_max_tokens(data_dir):
  # Train lengths 2-21 with EOS, max_length 24: buckets 8, 16 and 24 wide.
  over = {'algorithmic.train_length': (1, 20), 'max_length': 24, 'max_tokens': 96,
          'num_epochs': 1}
  bundle = data.make_datasets(tiny_config('copy', **over), data_dir=data_dir, seed=0,
                              row_multiple=4)
  assert bundle.meta['batch_shapes'] == [[12, 8], [4, 16], [4, 24]]  # 96 // 16 = 6 -> 4
  assert bundle.meta['max_tokens'] == 96 and bundle.meta['per_process_batch_size'] == 12
  batches = list(bundle.train)
  got = _check_batches(batches, max_tokens=96, num_buckets=4, row_multiple=4)
  assert len({b['inputs'].shape for b in batches}) == 3
  # Every training example exactly once in the (single) epoch: max_tokens batching drops
  # nothing (short batches get all-pad rows). Reference: fixed batches of 4, 64 % 4 == 0.
  ref = data.make_datasets(tiny_config('copy', **{**over, 'max_tokens': 0, 'batching': 'pad'}),
                           data_dir=data_dir, seed=0)
  want = [_key(i, t) for b in ref.train for i, t in zip(b['inputs'], b['targets'], strict=True)]
  assert len(want) == 64 and collections.Counter(got) == collections.Counter(want)
  assert next(iter(bundle.eval['validation']))['inputs'].shape[0] == 4  # eval_batch_size
  # Exact resume through make_datasets, across epochs.
  over['num_epochs'] = 0
  bundle = data.make_datasets(tiny_config('copy', **over), data_dir=data_dir, seed=0)
  for _ in range(len(batches) + 3):
    next(bundle.train)
  state = json.loads(json.dumps(bundle.train.get_state()))
  want = [next(bundle.train) for _ in range(4)]
  again = data.make_datasets(tiny_config('copy', **over), data_dir=data_dir, seed=0)
  again.train.set_state(state)
  for w in want:
    for k, v in next(again.train).items():
      np.testing.assert_array_equal(v, w[k])
  # 'pack': rows of max_length, so the budget only sets the row count.
  packed = data.make_datasets(tiny_config('copy', **over, batching='pack'), data_dir=data_dir,
                              seed=0)
  assert next(packed.train)['inputs'].shape == (4, 24)
  assert packed.meta['batch_shapes'] == [[4, 24]]
  with pytest.raises(ValueError, match='row_multiple=5'):
    data.make_datasets(tiny_config('copy', **over), data_dir=data_dir, row_multiple=5)
