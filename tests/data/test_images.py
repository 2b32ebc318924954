"""Image datasets: the digits' fixed split, batches, normalization, padding, sharding, resume,
augmentation; mnist / cifar10 through their code path under tfds.testing.mock_data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn_jax import data
from attn_jax.data import digits, images


def image_config(name: str, /, **overrides):
  c = data.default_config(name)
  c.batch_size, c.eval_batch_size, c.read_threads = 8, 64, 1
  c.update_from_flattened_dict(overrides)  # 'a.b' keys reach nested fields
  return c


@pytest.fixture(scope='module')
def digit_arrays():
  """(uint8 images, labels, split -> indices) read straight from scikit-learn."""
  x, y = digits.load()
  return x, y, digits.split_indices(y, digits.SPLIT)


def test_config_knows_the_image_datasets_and_checks_their_options():
  for name in images.IMAGE_DATASETS:
    assert data.task_of(data.default_config(name)) == 'image_classification'
    data.validate_config(data.default_config(name))
  bad = {'image.augment': ('flip', 'augment'), 'batching': ('bucket', 'batching'),
         'max_tokens': (64, 'max_tokens'), 'batch_size': (0, 'batch_size')}
  for key, (value, field) in bad.items():
    with pytest.raises(ValueError, match=field):
      data.validate_config(image_config('digits', **{key: value}))
  with pytest.raises(ValueError, match=r'crop_padding=5 must be an int in \[1, 4\].*8x8'):
    data.validate_config(image_config('digits', **{'image.augment': 'crop',
                                                   'image.crop_padding': 5}))
  data.validate_config(image_config('digits', **{'image.crop_padding': 5}))  # no crop: unread
  with pytest.raises(ValueError, match='eval_batch_size=64 is not divisible by process_count=3'):
    data.validate_config(image_config('digits', batch_size=6), process_count=3)


def test_digits_split_is_fixed_stratified_and_covers_every_image(digit_arrays):
  _, labels, split = digit_arrays
  assert {s: len(i) for s, i in split.items()} == {'train': 1259, 'validation': 179, 'test': 359}
  everything = np.concatenate(list(split.values()))
  assert sorted(everything.tolist()) == list(range(1797))  # disjoint, complete
  per_class = np.bincount(labels)
  for name, fraction in (('test', 0.2), ('validation', 0.1)):
    counts = np.bincount(labels[split[name]], minlength=10)
    assert (np.abs(counts - per_class * fraction) <= 0.5).all()  # each class rounded
  # The normalization constants are the training split's statistics.
  train = digit_arrays[0][split['train']] / 255.0
  spec = images.spec_for('digits')
  np.testing.assert_allclose((train.mean(), train.std()), (spec.mean[0], spec.std[0]), atol=1e-5)


def test_digits_batches_are_normalized_pixels_with_padded_eval(data_dir, digit_arrays):
  x, y, split = digit_arrays
  bundle = data.make_datasets(image_config('digits', eval_batch_size=100), data_dir=data_dir)
  meta = bundle.meta
  assert bundle.tokenizers == {} and meta['task'] == 'image_classification'
  assert (meta['image_shape'], meta['num_classes'], meta['eval_splits'], meta['train_split']) == (
      [8, 8, 1], 10, ['validation', 'test'], 'train')
  assert meta['label_names'] == list('0123456789') and meta['augment'] == 'none'
  assert meta['normalization'] == {'mean': [0.30576], 'std': [0.37612]}
  assert meta['num_examples'] == {'train': 1259, 'validation': 179, 'test': 359}
  batch = next(bundle.train)
  assert batch['image'].shape == (8, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  test = list(bundle.eval['test'])
  assert [b['image'].shape for b in test] == [(100, 8, 8, 1)] * 4
  labels = np.concatenate([b['label'] for b in test])
  real = labels >= 0
  assert real.sum() == 359 and (labels[~real] == -1).all() and real[:359].all()
  pixels = np.concatenate([b['image'] for b in test])
  assert (pixels[~real] == 0).all()
  # Eval keeps the split's order: undo the normalization and find the scikit-learn images.
  want = (x[split['test']] / 255.0 - 0.30576) / 0.37612
  np.testing.assert_allclose(pixels[real], want, atol=1e-5)
  np.testing.assert_array_equal(labels[real], y[split['test']])


def _real_rows(batches) -> list[bytes]:
  return sorted(b['image'][i].tobytes() + b['label'][i].tobytes() for b in batches
                for i in np.flatnonzero(b['label'] >= 0))


def test_processes_read_disjoint_shards_and_equal_eval_steps(data_dir):
  cfg = image_config('digits', eval_batch_size=64)
  whole = _real_rows(data.make_datasets(cfg, data_dir=data_dir).eval['validation'])
  shards = []
  for index in range(2):
    bundle = data.make_datasets(cfg, data_dir=data_dir, process_index=index, process_count=2)
    assert bundle.meta['per_process_batch_size'] == 4 and next(bundle.train)['label'].shape == (4,)
    batches = list(bundle.eval['validation'])
    # 90 and 89 examples: both processes run ceil(90 / 32) = 3 steps of 32 rows.
    assert len(batches) == 3 and all(b['label'].shape == (32,) for b in batches)
    shards.append(_real_rows(batches))
  assert (len(shards[0]), len(shards[1])) == (90, 89)
  assert sorted(shards[0] + shards[1]) == whole  # together, every example once


def test_training_order_follows_the_seed_and_reshuffles_each_epoch(data_dir):
  def labels(seed, n=160):
    train = data.make_datasets(image_config('digits', batch_size=64), data_dir=data_dir,
                               seed=seed).train
    return np.concatenate([next(train)['label'] for _ in range(n // 64 + 1)])

  first = labels(0)
  np.testing.assert_array_equal(labels(0), first)
  assert not np.array_equal(labels(1), first)
  train = data.make_datasets(image_config('digits', batch_size=1259), data_dir=data_dir).train
  epoch1, epoch2 = next(train)['label'], next(train)['label']
  np.testing.assert_array_equal(np.bincount(epoch1), np.bincount(epoch2))  # every example once
  assert not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize('augment', ['none', 'crop_flip'])
def test_train_iterator_state_restores_the_exact_next_batches(data_dir, augment):
  cfg = image_config('digits', batch_size=64, **{'image.augment': augment,
                                                 'image.crop_padding': 2})
  it = data.make_datasets(cfg, data_dir=data_dir, seed=3).train
  for n_before in (0, 25):  # 25 batches cross into the second epoch
    for _ in range(n_before):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [next(it) for _ in range(3)]
    fresh = data.make_datasets(cfg, data_dir=data_dir, seed=3).train
    fresh.set_state(state)
    for expected in want:
      got = next(fresh)
      for key in ('image', 'label'):
        np.testing.assert_array_equal(got[key], expected[key])


def test_augment_crops_a_window_of_the_padded_image_and_flips():
  image = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)
  example = {'image': image, 'label': np.int32(1)}
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  windows = {padded[r:r + 4, c:c + 4].tobytes() for r in range(5) for c in range(5)}
  flips = {np.ascontiguousarray(np.frombuffer(w, np.uint8).reshape(4, 4, 1)[:, ::-1]).tobytes()
           for w in windows}
  crops, flipped = set(), 0
  for seed in range(60):
    out = images.Augment('crop_flip', 2)(example, np.random.default_rng(seed))['image']
    assert out.shape == (4, 4, 1) and out.dtype == np.uint8
    crops.add(out.tobytes())
    assert out.tobytes() in windows | flips
    flipped += out.tobytes() in flips - windows
  assert len(crops) > 10 and 10 < flipped < 50
  same = images.Augment('crop', 2)(example, np.random.default_rng(7))['image']
  np.testing.assert_array_equal(images.Augment('crop', 2)(example, np.random.default_rng(7))[
      'image'], same)


@pytest.mark.parametrize('name,shape,augment', [('mnist', (28, 28, 1), 'none'),
                                                ('cifar10', (32, 32, 3), 'crop_flip')])
def test_tfds_image_datasets_under_mock_data(name, shape, augment, tmp_path, monkeypatch):
  # mock_data stands in for the download and conversion, the step that needs TensorFlow.
  monkeypatch.setattr(images, 'tensorflow_installed', lambda: True)
  cfg = image_config(name, batch_size=4, eval_batch_size=8)
  with tfds.testing.mock_data(num_examples=10):
    bundle = data.make_datasets(cfg, data_dir=str(tmp_path), seed=0)
    batch = next(bundle.train)
    test = list(bundle.eval['test'])
  meta = bundle.meta
  assert meta['image_shape'] == list(shape) and meta['augment'] == augment
  assert meta['num_classes'] == 10 and len(meta['label_names']) == 10
  assert meta['num_examples'] == {'train': 10, 'test': 10}
  assert batch['image'].shape == (4, *shape) and batch['image'].dtype == np.float32
  assert ((0 <= batch['label']) & (batch['label'] < 10)).all()
  labels = np.concatenate([b['label'] for b in test])
  assert labels.shape == (16,) and (labels >= 0).sum() == 10 and (labels[10:] == -1).all()


def test_tfds_image_dataset_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(images, 'tensorflow_installed', lambda: False)
  with pytest.raises(ValueError, match=r"cifar10 is not prepared.*attn_jax\[tf\]"):
    data.make_datasets(image_config('cifar10'), data_dir=str(tmp_path))
