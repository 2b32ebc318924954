"""Batching stages: padding, length policy, bucketing, packing (+ attention parity), state."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from attn_jax.data import batching


def _examples(n=23, seed=0, max_len=12, with_targets=True):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ex = {'inputs': np.append(rng.integers(4, 20, rng.integers(1, max_len)), 2).astype(np.int32)}
    if with_targets:
      ex['targets'] = np.append(rng.integers(4, 20, rng.integers(1, max_len)), 2).astype(np.int32)
    out.append(ex)
  return out


def _source(examples):
  return grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=1))


def test_length_boundaries():
  assert batching.length_boundaries(2048, 4) == (256, 512, 1024, 2048)
  assert batching.length_boundaries(100, 4) == (16, 32, 56, 100)
  assert batching.length_boundaries(10, 3) == (8, 10)


def test_length_policy_truncates_keeping_eos_and_counts():
  pol = batching.LengthPolicy({'inputs': 4}, 'truncate')
  ex = {'inputs': np.array([5, 6, 7, 8, 9, 2], np.int32)}
  assert pol(ex)
  assert ex['inputs'].tolist() == [5, 6, 7, 2]
  assert pol({'inputs': np.array([5, 2], np.int32)})
  assert pol.counts == {'truncated': 1, 'filtered': 0, 'seen': 2}
  filt = batching.LengthPolicy({'inputs': 4, 'targets': 3}, 'filter')
  assert not filt({'inputs': np.arange(3), 'targets': np.arange(4)})
  assert filt.counts['filtered'] == 1
  with pytest.raises(ValueError, match='length_policy'):
    batching.LengthPolicy({'inputs': 4}, 'drop')


def test_pad_batch_static_shapes_and_padding_rows():
  pad = batching.PadBatch({'inputs': (8, 16), 'targets': (8, 16)}, batch_size=4)
  exs = [{'inputs': np.arange(1, 10), 'targets': np.arange(1, 3), 'label': 7}] * 3
  b = pad(exs)
  assert b['inputs'].shape == (4, 16) and b['targets'].shape == (4, 8)
  assert b['label'].tolist() == [7, 7, 7, 0]
  assert (b['inputs'][3] == 0).all() and b['inputs'].dtype == np.int32
  assert b['inputs'][0, :9].tolist() == list(range(1, 10)) and (b['inputs'][0, 9:] == 0).all()


def test_segment_positions_matches_naive():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
  naive = np.zeros_like(seg)
  for r in range(seg.shape[0]):
    for i in range(seg.shape[1]):
      if seg[r, i]:
        naive[r, i] = i - min(j for j in range(i + 1) if seg[r, j] == seg[r, i])
  np.testing.assert_array_equal(batching.segment_positions(seg), naive)


def _unpack(batch, feature):
  rows = []
  for r in range(batch[feature].shape[0]):
    seg = batch[f'{feature}_segmentation'][r]
    for s in range(1, seg.max() + 1):
      rows.append(batch[feature][r][seg == s])
  return rows


def test_pack_keeps_every_example_with_correct_segments():
  exs = _examples(40)
  ds = batching.pack(_source(exs), max_lengths={'inputs': 16, 'targets': 16}, batch_size=4,
                     num_bins=8, seed=0, shuffle=False, drop_remainder=False)
  batches = list(ds)
  got_in, got_tgt = [], []
  for b in batches:
    assert set(b) == {'inputs', 'targets', 'inputs_segmentation', 'targets_segmentation',
                      'inputs_position', 'targets_position'}
    assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in b.values())
    for f in ('inputs', 'targets'):
      seg, pos = b[f'{f}_segmentation'], b[f'{f}_position']
      np.testing.assert_array_equal(pos, batching.segment_positions(seg))
      assert ((b[f] == 0) == (seg == 0)).all()  # pad exactly where there is no segment
      for row in seg:  # ids 1, 2, ... in order, padding at the end
        nz = row[row > 0]
        assert (np.diff(nz) >= 0).all() and (nz.size == 0 or nz[0] == 1)
    # inputs and targets of one example share a segment id
    assert (b['inputs_segmentation'].max(-1) == b['targets_segmentation'].max(-1)).all()
    got_in += _unpack(b, 'inputs')
    got_tgt += _unpack(b, 'targets')
  pairs = sorted((a.tolist(), t.tolist()) for a, t in zip(got_in, got_tgt, strict=True))
  assert pairs == sorted((e['inputs'].tolist(), e['targets'].tolist()) for e in exs)


@jax.jit
def _attend(params, tokens, positions, segment_ids, mask):
  """A one-layer causal self-attention with sinusoidal positions; [b, l] -> [b, l, h * k]."""
  emb, wq, wk, wv = params
  x = emb[tokens] + ops.sinusoidal(positions, emb.shape[-1])      # [b, l, d]
  q, k, v = (jnp.einsum('bld,dhk->blhk', x, w) for w in (wq, wk, wv))  # [b, l, h, k]
  return ops.dot_product_attention(q, k, v, is_causal=True, segment_ids=segment_ids, mask=mask,
                                   implementation='dense').reshape(x.shape[:2] + (-1,))


def test_packed_batch_matches_examples_one_by_one():
  exs = _examples(12, seed=1, max_len=7, with_targets=False)
  ds = batching.pack(_source(exs), max_lengths={'inputs': 16}, batch_size=3, num_bins=3,
                     seed=0, shuffle=False, drop_remainder=False)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = (jax.random.normal(keys[0], (20, 8)),) + tuple(
      jax.random.normal(k, (8, 2, 4)) / 3 for k in keys[1:])
  segments = []
  outputs = []
  for b in ds:
    out = _attend(params, b['inputs'], b['inputs_position'], b['inputs_segmentation'], None)
    for r in range(b['inputs'].shape[0]):
      seg = b['inputs_segmentation'][r]
      assert seg.max() >= 1
      for s in range(1, seg.max() + 1):
        segments.append(b['inputs'][r][seg == s])
        outputs.append(out[r][seg == s])
  assert len(segments) == len(exs) and len(segments) > 4  # several examples per row
  # Reference: each example alone in its own row (no segments), keys past its end masked.
  lengths = np.array([len(t) for t in segments])
  alone = np.zeros((len(segments), 16), np.int32)
  for i, t in enumerate(segments):
    alone[i, :len(t)] = t
  ref = _attend(params, alone, np.broadcast_to(np.arange(16), alone.shape), None,
                ops.padding_mask(lengths=jnp.asarray(lengths), length=16))
  for i, out in enumerate(outputs):
    # float32 on CPU: the calls differ only in summation order over masked keys.
    np.testing.assert_allclose(out, ref[i, :lengths[i]], rtol=1e-5, atol=1e-5)


def test_concat_split_rows_are_full_and_positions_restart():
  exs = _examples(30, seed=2, max_len=20, with_targets=False)
  ds = batching.concat_split(_source(exs), max_length=16, batch_size=2, drop_remainder=True)
  batches = list(ds)
  flat = np.concatenate([e['inputs'] for e in exs])
  got = np.concatenate([b['inputs'][b['inputs_segmentation'] > 0] for b in batches])
  np.testing.assert_array_equal(got, flat)  # nothing reordered or lost
  rows = np.concatenate([b['inputs_segmentation'] for b in batches])
  assert (rows[:-1] > 0).all()  # every row but the final one is full
  for b in batches:
    np.testing.assert_array_equal(b['inputs_position'],
                                  batching.segment_positions(b['inputs_segmentation']))
    assert (b['inputs_position'][:, 0] == 0).all()


def test_sorted_window_bucketing_groups_lengths_and_emits_each_once():
  exs = [{'inputs': np.full(n, 5, np.int32)} for n in [1, 30, 2, 29, 3, 28, 4, 27] * 2]
  pad = batching.PadBatch({'inputs': batching.length_boundaries(32, 3)}, 4)
  ds = batching.SortedWindowBatchIterDataset(_source(exs), batch_size=4, window=4, seed=0,
                                             batch_fn=pad, drop_remainder=False)
  batches = list(ds)
  assert sorted(b['inputs'].shape[1] for b in batches) == [8, 8, 32, 32]
  lengths = sorted(int(n) for b in batches for n in (b['inputs'] > 0).sum(-1))
  assert lengths == sorted(len(e['inputs']) for e in exs)


def _check_restore(make, n_before=3, n_after=4):
  it = iter(make())
  for _ in range(n_before):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(n_after)]
  fresh = iter(make())
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize('mode', ['pad', 'bucket', 'pack', 'concat'])
def test_iterator_state_restores_exact_next_batches(mode):
  exs = _examples(50, seed=3)

  def make():
    ds = grain.MapDataset.source(exs).shuffle(5).repeat(None).to_iter_dataset(
        grain.ReadOptions(num_threads=1))
    if mode == 'concat':
      ds = ds.map(lambda e: {'inputs': e['inputs']})
      return batching.concat_split(ds, max_length=16, batch_size=2, drop_remainder=True)
    if mode == 'pack':
      return batching.pack(ds, max_lengths={'inputs': 16, 'targets': 16}, batch_size=2,
                           num_bins=4, seed=1, shuffle=True, drop_remainder=True)
    pad = batching.PadBatch({'inputs': (8, 16), 'targets': (8, 16)}, 3)
    if mode == 'bucket':
      return batching.SortedWindowBatchIterDataset(ds, batch_size=3, window=3, seed=2,
                                                   batch_fn=pad, drop_remainder=True)
    return ds.batch(3, drop_remainder=True, batch_fn=pad)

  for n_before in (0, 2, 7):
    _check_restore(make, n_before=n_before)
