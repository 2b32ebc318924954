"""Generated datasets: determinism, correctness checked independently, TFDS round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest

from attn_jax.data import algorithmic, builders, listops

ALGO = dict(num_symbols=7, train_length=[2, 5], test_length=[8, 12], num_train=40,
            num_validation=10, num_test=10, seed=3)
LISTOPS = dict(length=[20, 80], max_depth=5, max_args=5, operator_prob=0.25, num_train=30,
               num_validation=5, num_test=5, seed=1)


def evaluate_listops(text: str) -> tuple[int, int]:
  """Independent evaluator: a stack machine over the tokens; returns (value, depth)."""
  stack: list[list] = []
  result, depth = None, 0
  for tok in text.split():
    if tok.startswith('['):
      stack.append([tok])
      depth = max(depth, len(stack))
    elif tok == ']':
      op, *args = stack.pop()
      if op == '[MAX':
        v = max(args)
      elif op == '[MIN':
        v = min(args)
      elif op == '[SM':
        v = sum(args) % 10
      elif op == '[MED':
        v = int(np.median(args))  # LRA's definition
      else:
        raise AssertionError(op)
      if stack:
        stack[-1].append(v)
      else:
        result = v
    else:
      stack[-1].append(int(tok))
  assert not stack and result is not None, text
  return result, depth


@pytest.mark.parametrize('task', algorithmic.ALGORITHMIC_TASKS)
def test_algorithmic_examples_are_correct(task):
  params = dict(ALGO, task=task)
  for split in ('train', 'test'):
    lo, hi = params['test_length' if split == 'test' else 'train_length']
    for _, ex in algorithmic.generate_split(params, split):
      src, tgt = ex['inputs'].split(), ex['targets'].split()
      if task == 'addition':
        a, b = ex['inputs'].replace(' ', '').split('+')
        assert int(''.join(tgt)) == int(a) + int(b)
        assert lo <= len(a) <= hi and lo <= len(b) <= hi
        assert a == str(int(a)) and b == str(int(b))  # no leading zeros
      else:
        assert lo <= len(src) <= hi
        assert all(0 <= int(s) < params['num_symbols'] for s in src)
        expected = {'copy': src, 'reverse': src[::-1],
                    'sort': sorted(src, key=int)}[task]
        assert tgt == expected


def test_algorithmic_deterministic_by_seed():
  params = dict(ALGO, task='reverse')
  first = list(algorithmic.generate_split(params, 'train'))
  assert first == list(algorithmic.generate_split(params, 'train'))
  other = list(algorithmic.generate_split(dict(params, seed=4), 'train'))
  assert first != other
  # Validation draws from its own stream: not a copy of train.
  assert [e for _, e in algorithmic.generate_split(params, 'validation')] != \
      [e for _, e in first[:10]]


def test_listops_labels_match_independent_evaluator():
  lo, hi = LISTOPS['length']
  for split in ('train', 'test'):
    for _, ex in listops.generate_split(LISTOPS, split):
      value, depth = evaluate_listops(ex['text'])
      assert ex['label'] == value
      assert lo <= len(ex['text'].split()) <= hi
      assert depth <= LISTOPS['max_depth']
      assert set(ex['text'].split()) <= set(listops.VOCABULARY)


def test_listops_median_even_count_floors_like_lra():
  assert evaluate_listops('[MED 1 2 ]')[0] == listops._apply('[MED', [1, 2]) == 1
  assert listops._apply('[MED', [3, 9, 4, 8]) == int(np.median([3, 9, 4, 8])) == 6


def test_listops_deterministic_and_label_spread():
  a = [e for _, e in listops.generate_split(LISTOPS, 'train')]
  assert a == [e for _, e in listops.generate_split(LISTOPS, 'train')]
  assert a != [e for _, e in listops.generate_split(dict(LISTOPS, seed=2), 'train')]
  assert len({e['label'] for e in a}) >= 4


def test_listops_impossible_range_raises():
  with pytest.raises(ValueError, match='no tree'):
    listops.make_example(random.Random(0), min_length=50, max_length=60, max_depth=2,
                         max_args=3, operator_prob=0.25, max_tries=50)
  with pytest.raises(ValueError, match='max_args'):
    listops.validate_params(dict(LISTOPS, max_args=1))


def test_builders_write_identical_data_in_separate_dirs(tmp_path):
  records = []
  for d in ('a', 'b'):
    b = builders.prepare('listops', LISTOPS, str(tmp_path / d))
    src = b.as_data_source('train')
    records.append([(src[i]['text'], int(src[i]['label'])) for i in range(len(src))])
  assert len(records[0]) == LISTOPS['num_train']
  assert records[0] == records[1]
  gen = [(e['text'].encode(), e['label']) for _, e in listops.generate_split(LISTOPS, 'train')]
  assert sorted(records[0]) == sorted(gen)


def test_builder_config_name_changes_with_params(tmp_path):
  a = builders.make_config('algorithmic', dict(ALGO, task='copy'))
  b = builders.make_config('algorithmic', dict(ALGO, task='copy', num_train=41))
  assert a.name != b.name
  built = builders.prepare('algorithmic', dict(ALGO, task='copy'), str(tmp_path))
  again = builders.prepare('algorithmic', dict(ALGO, task='copy'), str(tmp_path))
  assert built.data_dir == again.data_dir
  test = built.as_data_source('test')
  assert all(8 <= len(test[i]['inputs'].split()) <= 12 for i in range(len(test)))
