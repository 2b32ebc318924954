"""make_datasets end to end: configs, tokenizers, batches, sharding, state, workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attn_jax import data
from tests.data.conftest import FIXTURES, tiny_config
from tests.data.test_generators import evaluate_listops


def _rows(ids):
  """Token rows without padding."""
  return [r[r != 0] for r in np.asarray(ids)]


def test_config_validation_names_field_and_allowed_values():
  with pytest.raises(ValueError, match="Unknown dataset 'nope'.*listops"):
    data.default_config('nope')
  c = tiny_config('copy')
  with pytest.raises(AttributeError):
    c.batchsize = 3  # locked: typos fail loudly
  bad = {'name': 'wikitext', 'tokenizer.kind': 'sentencepiece', 'batching': 'ragged',
         'length_policy': 'drop', 'batch_size': 0}
  for key, value in bad.items():
    with pytest.raises(ValueError, match=key.split('.')[-1]):
      data.validate_config(tiny_config('copy', **{key: value}))
  with pytest.raises(ValueError, match="'pack' is not supported for classification"):
    data.validate_config(tiny_config('listops', batching='pack'))
  with pytest.raises(ValueError, match='process_count=3'):
    data.validate_config(tiny_config('copy'), process_count=3)
  with pytest.raises(ValueError, match='train_length'):
    data.validate_config(tiny_config('copy', **{'algorithmic.train_length': (5, 2)}))


@pytest.mark.parametrize('name', ['copy', 'reverse', 'sort', 'addition'])
def test_algorithmic_batches_follow_contract(name, data_dir):
  bundle = data.make_datasets(tiny_config(name), data_dir=data_dir, seed=0)
  tok = bundle.tokenizers['targets']
  assert bundle.meta['task'] == 'seq2seq' and bundle.meta['vocab_size'] == tok.vocab_size
  for _ in range(3):
    b = next(bundle.train)
    assert set(b) == {'inputs', 'targets'}
    assert b['inputs'].shape[0] == 4 and b['inputs'].dtype == np.int32
    assert b['inputs'].shape[1] in data.length_boundaries(32, 4)
    for src, tgt in zip(_rows(b['inputs']), _rows(b['targets']), strict=True):
      assert src[-1] == data.EOS_ID and tgt[-1] == data.EOS_ID
      s, t = tok.decode(src).split(), tok.decode(tgt).split()
      if name == 'addition':
        a, c = ''.join(s).split('+')
        assert int(''.join(t)) == int(a) + int(c)
      else:
        assert t == {'copy': s, 'reverse': s[::-1], 'sort': sorted(s, key=int)}[name]
  test_lengths = [len(r) - 1 for b in bundle.eval['test'] for r in _rows(b['inputs'])]
  assert len(test_lengths) == 8 and min(test_lengths) >= 7  # longer test split


def test_listops_labels_survive_the_pipeline(data_dir):
  bundle = data.make_datasets(tiny_config('listops', batching='pad'), data_dir=data_dir, seed=0)
  assert bundle.meta['num_classes'] == 10 and bundle.meta['task'] == 'classification'
  tok = bundle.tokenizers['inputs']
  seen = 0
  for b in bundle.eval['validation']:
    assert set(b) == {'inputs', 'label'} and b['label'].shape == (4,)
    for row, label in zip(_rows(b['inputs']), b['label'], strict=True):
      assert evaluate_listops(tok.decode(row))[0] == label
      seen += 1
  assert seen == 8


def test_eval_batches_keep_static_shape_with_padding_rows(data_dir):
  cfg = tiny_config('listops', eval_batch_size=3, batching='pad')
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  batches = list(bundle.eval['test'])
  assert [b['inputs'].shape[0] for b in batches] == [3, 3, 3]
  real = np.concatenate([(b['inputs'] != 0).any(-1) for b in batches])
  assert real.sum() == 8 and not real[-1]  # the documented weight rule finds the padding row


def test_train_state_restores_across_epochs(data_dir):
  cfg = tiny_config('copy', bucket_window=2)
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=7)
  for _ in range(20):  # 64 examples / 4 per batch: past the first epoch
    next(bundle.train)
  state = json.loads(json.dumps(bundle.train.get_state()))
  want = [next(bundle.train) for _ in range(5)]
  again = data.make_datasets(cfg, data_dir=data_dir, seed=7)
  again.train.set_state(state)
  for w in want:
    got = next(again.train)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  other = data.make_datasets(cfg, data_dir=data_dir, seed=8)
  assert not all(np.array_equal(next(other.train)['inputs'], w['inputs']) for w in want[:1])


def test_process_shards_are_disjoint_and_complete(data_dir):
  cfg = tiny_config('reverse', batching='pad')
  seen = []
  for pi in range(2):
    bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0, process_index=pi,
                                process_count=2)
    assert bundle.meta['per_process_batch_size'] == 2
    seen.append({tuple(r) for b in bundle.eval['validation'] for r in _rows(b['inputs'])})
  full = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  everything = {tuple(r) for b in full.eval['validation'] for r in _rows(b['inputs'])}
  assert not seen[0] & seen[1] and seen[0] | seen[1] == everything
  with pytest.raises(ValueError, match='process_index=2'):
    data.make_datasets(cfg, data_dir=data_dir, process_index=2, process_count=2)


def test_local_parallel_corpus_with_sentencepiece_and_packing(data_dir, tmp_path):
  cfg = tiny_config('local', batching='pack', max_length=48, **{
      'local.task': 'seq2seq', 'local.train': os.path.join(FIXTURES, 'tiny'),
      'local.source_suffix': 'de', 'local.target_suffix': 'en',
      'local.validation_fraction': 0.1})
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  tok = bundle.tokenizers['inputs']
  assert tok is bundle.tokenizers['targets'] and tok.kind == 'sentencepiece'  # joint by default
  b = next(bundle.train)
  assert b['inputs'].shape == (4, 48)
  assert max(next(bundle.train)['inputs_segmentation'].max() for _ in range(4)) >= 2
  np.testing.assert_array_equal(b['targets_position'],
                                data.segment_positions(b['targets_segmentation']))
  eval_batch = next(iter(bundle.eval['validation']))
  assert 'inputs_segmentation' not in eval_batch  # eval is never packed (decoding needs rows)
  decoded = tok.decode(_rows(eval_batch['targets'])[0])
  with open(os.path.join(FIXTURES, 'tiny.en'), encoding='utf-8') as f:
    assert decoded in {line.rstrip('\n') for line in f}
  # The tokenizer is cached with the dataset and saved with the run.
  path = bundle.meta['tokenizer_paths']['inputs']
  assert os.path.exists(path)
  again = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  assert again.tokenizers['inputs'].model_proto == tok.model_proto
  saved = bundle.save_tokenizers(str(tmp_path))
  assert data.load_tokenizer(saved['targets']).encode('The cat.').tolist() == \
      tok.encode('The cat.').tolist()
  assert bundle.meta['task'] == 'seq2seq'


def test_length_policy_counts_are_reported(data_dir):
  bundle = data.make_datasets(tiny_config('copy', max_length=4, length_policy='filter',
                                          batching='pad'), data_dir=data_dir, seed=0)
  for _ in range(3):
    b = next(bundle.train)
    assert b['inputs'].shape[1] == 4
  counts = bundle.length_policies['train'].counts
  assert counts['filtered'] > 0 and counts['seen'] > counts['filtered']
  list(bundle.eval['test'])  # test lengths 7-10 > 4: all truncated, kept, counted
  assert bundle.length_policies['test'].counts['truncated'] == 8


@pytest.mark.slow
def test_worker_processes_give_restorable_batches(data_dir):
  cfg = tiny_config('copy', num_workers=1, batching='pad')
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  first = [next(bundle.train) for _ in range(3)]
  state = bundle.train.get_state()
  want = [next(bundle.train) for _ in range(3)]
  again = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  again.train.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again.train)['inputs'], w['inputs'])
  assert all(b['inputs'].shape[0] == 4 for b in first)
  bundle.train.close()
  again.train.close()


def test_local_classification_and_lm_through_make_datasets(data_dir, tmp_path):
  train = tmp_path / 'train.csv'
  train.write_text('text,label\n' + ''.join(f'"review {i}, fine",{"good" if i % 3 else "bad"}\n'
                                            for i in range(20)))
  test = tmp_path / 'test.csv'
  test.write_text('text,label\nfine,bad\nview 0,good\n')
  cfg = tiny_config('local', **{'local.train': str(train), 'local.test': str(test),
                                'tokenizer.kind': 'char'})
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  assert bundle.meta['num_classes'] == 2 and bundle.meta['label_names'] == ['bad', 'good']
  assert bundle.meta['eval_splits'] == ['test']
  (batch,) = list(bundle.eval['test'])
  assert batch['label'][:2].tolist() == [0, 1]
  assert data.decode_batch(bundle.tokenizers['inputs'], batch['inputs'])[:2] == ['fine',
                                                                                'view 0']
  # The tokenizer file of this run can be given back to later runs.
  again = data.make_datasets(tiny_config('local', **{
      'local.train': str(train), 'local.test': str(test), 'tokenizer.kind': 'char',
      'tokenizer.path': bundle.meta['tokenizer_paths']['inputs']}), data_dir=data_dir, seed=0)
  assert again.tokenizers['inputs'].chars == bundle.tokenizers['inputs'].chars

  text = tmp_path / 'lm.txt'
  text.write_text(''.join(f'line number {i} of a small corpus\n' for i in range(30)))
  lm = data.make_datasets(tiny_config('local', batching='pack', **{
      'local.task': 'lm', 'local.train': str(text), 'local.validation_fraction': 0.2}),
      data_dir=data_dir, seed=0)
  b = next(lm.train)
  assert set(b) == {'inputs', 'inputs_segmentation', 'inputs_position'}
  assert lm.meta['tokenizer_kind'] == 'byte' and b['inputs'].shape == (4, 32)
  assert lm.meta['num_examples'] == {'train': 24, 'validation': 6}


def test_eval_batch_count_equal_across_processes(data_dir):
  # 8 examples, 3 processes -> shards of 3, 3, 2; per-process batch 1 -> 3 batches each.
  cfg = tiny_config('copy', batch_size=3, eval_batch_size=3, batching='pad')
  counts, real = [], 0
  for pi in range(3):
    bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0, process_index=pi,
                                process_count=3)
    batches = list(bundle.eval['test'])
    counts.append(len(batches))
    assert all(b['inputs'].shape[0] == 1 for b in batches)
    real += sum(int((b['inputs'] != 0).any()) for b in batches)
  assert counts == [3, 3, 3] and real == 8


def test_sentencepiece_learns_from_lines_of_one_long_document(data_dir, tmp_path):
  book = tmp_path / 'book.txt'
  book.write_text(''.join(f'chapter {i % 50} tells of the river and the town {i}\n'
                          for i in range(600)))  # one ~30k character document
  cfg = tiny_config('local', batching='concat', **{
      'local.task': 'lm', 'local.train': str(book), 'local.lm_documents': 'file',
      'tokenizer.kind': 'sentencepiece', 'eval_splits': ''})
  bundle = data.make_datasets(cfg, data_dir=data_dir, seed=0)
  tok = bundle.tokenizers['inputs']
  assert tok.vocab_size > 30 and tok.decode(tok.encode('the river')) == 'the river'
  b = next(bundle.train)
  assert b['inputs'].shape == (4, 32) and (b['inputs_segmentation'] == 1).all()
