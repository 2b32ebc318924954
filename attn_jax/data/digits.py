"""scikit-learn's handwritten digits as a dataset with a fixed, stratified split.

`sklearn.datasets.load_digits` ships inside scikit-learn's wheel (no download): 1,797 real 8x8
grey images of the digits 0-9 (the test part of UCI's "Optical Recognition of Handwritten
Digits", Alpaydin & Kaynak 1998), pixels 0..16 (how many of a 4x4 block of the 32x32 scan
were ink).

The split is fixed, the same on every machine and for every `data.data_seed`:

    for each class c = 0..9, in that order, one generator np.random.default_rng(SPLIT['seed'])
    permutes the indices of class c; the first round(n_c * test_fraction) go to 'test', the
    next round(n_c * validation_fraction) to 'validation', the rest to 'train'

with test_fraction 0.2 and validation_fraction 0.1: 1,259 train, 179 validation, 359 test
examples, each class in the same proportion in every split (35-37 test examples per class).
Each split lists its examples in scikit-learn's order. Pixels are stored as uint8
`round(v * 255 / 16)` (0..16 -> 0..255, one to one), so every image dataset reads as uint8
0..255 and is normalized by one rule (`images.normalize`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SHAPE = (8, 8, 1)
LABEL_NAMES = tuple(str(d) for d in range(10))
# The builder's parameters: changing any builds a new dataset beside the old one.
SPLIT = {'test_fraction': 0.2, 'validation_fraction': 0.1, 'seed': 0}
SPLITS = ('train', 'validation', 'test')


def load() -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images `[1797, 8, 8, 1]` in 0..255, int64 labels `[1797]`), scikit-learn's order."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # A dependency, but a trimmed environment may lack it.
    raise ValueError('the digits dataset needs scikit-learn: pip install scikit-learn') from e
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target


def split_indices(labels: np.ndarray, params: dict) -> dict[str, np.ndarray]:
  """The examples of each split (see the module docstring), sorted: split -> int64 `[n]`."""
  rng = np.random.default_rng(params['seed'])
  parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  for c in np.unique(labels):
    order = rng.permutation(np.flatnonzero(labels == c))
    n_test = round(len(order) * params['test_fraction'])
    n_val = round(len(order) * params['validation_fraction'])
    parts['test'].append(order[:n_test])
    parts['validation'].append(order[n_test:n_test + n_val])
    parts['train'].append(order[n_test + n_val:])
  return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def generate_split(params: dict, split: str) -> Iterator[tuple[int, dict[str, object]]]:
  """Yields (index in scikit-learn's order, {'image': uint8 [8, 8, 1], 'label': int})."""
  images, labels = load()
  for i in split_indices(labels, params)[split]:
    yield int(i), {'image': images[i], 'label': int(labels[i])}
