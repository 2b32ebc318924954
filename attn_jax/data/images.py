"""Image classification data: the datasets by name, their normalization and augmentation.

    cfg = attn_jax.data.default_config('digits')        # or 'mnist', 'cifar10'
    data = attn_jax.data.make_datasets(cfg, data_dir='/tmp/tfds', seed=0)
    batch = next(data.train)          # {'image': float32 [b, H, W, C], 'label': int32 [b]}

Datasets (`IMAGE_DATASETS`):
    digits    scikit-learn's 1,797 real 8x8x1 handwritten digits, inside its wheel (no
              download), built as a local TFDS dataset with a fixed stratified split:
              train 1,259 / validation 179 / test 359 (`attn_jax.data.digits`)
    mnist     TFDS 'mnist', 28x28x1: train 60,000 / test 10,000
    cifar10   TFDS 'cifar10', 32x32x3: train 50,000 / test 10,000
TFDS downloads and converts mnist and cifar10 once; that step imports TensorFlow (pip install
'attn_jax[tf]'). Once prepared under data_dir they are read with no TensorFlow (Pillow decodes
the stored PNGs). `data.tfds.train_split` / `eval_splits` and `data.eval_splits` choose splits
(TFDS slicing such as 'train[:90%]' included) for all three.

Batches: 'image' float32 `[b, H, W, C]`, the uint8 pixels scaled to [0, 1], then standardized
per channel with the dataset's training-split mean and std (`ImageSpec.mean`/`std`,
`normalize`); 'label' int32 `[b]`. Training batches are full; eval batches are padded to the
per-process eval batch size with rows of image 0 and label `PAD_LABEL` (-1), and every process
gets the same number of them: weight rows by `label >= 0`.

Augmentation (training batches only; `data.image.augment`): 'none'; 'crop' (pad each side with
`crop_padding` black pixels, crop back to H x W at a random offset); 'crop_flip' ('crop', then
a horizontal flip with probability 1/2). '' takes the dataset's default: 'crop_flip' for
cifar10, 'none' for digits and mnist (a mirrored digit is another glyph). Each example's draw
comes from grain's `random_map`, seeded by (seed, position in the stream), so it differs per
epoch and a restored iterator repeats it exactly.

Importing this module loads numpy only (config code reads `IMAGE_DATASETS` from it); TFDS is
imported when a dataset is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence

import numpy as np

from attn_jax.data import digits

IMAGE_DATASETS = ('digits', 'mnist', 'cifar10')
TASK = 'image_classification'
AUGMENTATIONS = ('none', 'crop', 'crop_flip')
PAD_LABEL = -1  # the label of an eval batch's padding rows


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What the pipeline needs to know about one image dataset.

  Attributes:
    shape: (height, width, channels) of every image.
    label_names: one name per class.
    mean, std: per channel, of the training split's pixels scaled to [0, 1].
    augment: the default training augmentation (one of AUGMENTATIONS).
    tfds_name: the TFDS dataset, '' for the local digits builder.
    train_split / eval_splits: the default splits.
  """

  shape: tuple[int, int, int]
  label_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str = 'none'
  tfds_name: str = ''
  train_split: str = 'train'
  eval_splits: tuple[str, ...] = ('test',)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


_CIFAR10_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                  'ship', 'truck')
_SPECS = {
    # Mean and std of the 1,259 training images (tests/data/test_images.py recomputes them).
    'digits': ImageSpec(digits.SHAPE, digits.LABEL_NAMES, (0.30576,), (0.37612,),
                        eval_splits=('validation', 'test')),
    # The statistics commonly quoted for the training splits.
    'mnist': ImageSpec((28, 28, 1), digits.LABEL_NAMES, (0.1307,), (0.3081,), tfds_name='mnist'),
    'cifar10': ImageSpec((32, 32, 3), _CIFAR10_NAMES, (0.4914, 0.4822, 0.4465),
                         (0.2470, 0.2435, 0.2616), augment='crop_flip', tfds_name='cifar10'),
}


def spec_for(name: str) -> ImageSpec:
  if name not in _SPECS:
    raise ValueError(f'Unknown image dataset {name!r}; allowed: {IMAGE_DATASETS}.')
  return _SPECS[name]


def augmentation(cfg) -> str:
  """The training augmentation a data config asks for ('' resolved to the dataset's)."""
  return cfg.image.augment or spec_for(cfg.name).augment


def validate_config(cfg) -> None:
  """The image-only rules of a data config (`config.validate_config` calls it)."""
  h, w, _ = spec_for(cfg.name).shape
  if cfg.image.augment not in ('',) + AUGMENTATIONS:
    raise ValueError(f"data.image.augment={cfg.image.augment!r}; allowed: {('',) + AUGMENTATIONS}"
                     " ('' = the dataset's default).")
  pad = cfg.image.crop_padding
  if augmentation(cfg).startswith('crop') and not (
      isinstance(pad, int) and 1 <= pad <= min(h, w) // 2):
    raise ValueError(f'data.image.crop_padding={pad!r} must be an int in [1, {min(h, w) // 2}] '
                     f'(half the smaller side of {cfg.name} images, {h}x{w}) for '
                     f'augment={augmentation(cfg)!r}.')
  if cfg.batching != 'pad':
    raise ValueError(f"data.batching={cfg.batching!r}: image batches are fixed rows ('pad').")
  if cfg.max_tokens:
    raise ValueError(f'data.max_tokens={cfg.max_tokens}: images have no tokens; set '
                     'data.batch_size instead.')


def tensorflow_installed() -> bool:
  """Whether TFDS can download and convert mnist / cifar10 here (their builders use TF)."""
  return importlib.util.find_spec('tensorflow') is not None


def load_builder(name: str, data_dir: str):
  """The prepared TFDS builder of image dataset `name` under `data_dir` (built once)."""
  import tensorflow_datasets as tfds

  from attn_jax.data import builders

  spec = spec_for(name)
  if not spec.tfds_name:
    return builders.prepare(name, digits.SPLIT, data_dir)

  def make():
    return tfds.builder(spec.tfds_name, data_dir=data_dir, file_format='array_record')

  try:
    prepared = make().is_prepared()
  except Exception as e:  # TFDS raises several types (DatasetNotFoundError, ...)
    raise ValueError(f'TFDS could not load {name!r} (data_dir={data_dir!r}): {e}') from e
  if not prepared and not tensorflow_installed():
    raise ValueError(f'{name} is not prepared under data_dir={data_dir!r}, and TFDS needs '
                     "TensorFlow to download and convert it: pip install 'attn_jax[tf]' "
                     '(tensorflow>=2.16); reading it afterwards needs no TensorFlow.')
  return builders.prepare_once(make, name)


class ToExample:
  """A TFDS record -> {'image': uint8 `[H, W, C]`, 'label': int32} (picklable for workers)."""

  def __init__(self, spec: ImageSpec):
    self.shape = spec.shape

  def __call__(self, record: dict) -> dict[str, np.ndarray]:
    image = np.asarray(record['image'])
    if image.shape != self.shape or image.dtype != np.uint8:
      raise ValueError(f'expected uint8 images of shape {self.shape}, got {image.dtype} '
                       f'{image.shape}')
    return {'image': image, 'label': np.int32(record['label'])}


class Augment:
  """grain `random_map` transform: random crop after zero padding (+ horizontal flip)."""

  def __init__(self, kind: str, padding: int):
    if kind not in AUGMENTATIONS:
      raise ValueError(f'augment={kind!r}; allowed: {AUGMENTATIONS}')
    self.kind, self.padding = kind, padding

  def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator):
    image = example['image']
    if self.kind in ('crop', 'crop_flip'):
      p = self.padding
      h, w = image.shape[:2]
      padded = np.pad(image, ((p, p), (p, p), (0, 0)))
      top, left = rng.integers(0, 2 * p + 1, size=2)
      image = padded[top:top + h, left:left + w]
    if self.kind == 'crop_flip' and rng.random() < 0.5:
      image = image[:, ::-1]
    return {**example, 'image': np.ascontiguousarray(image)}


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 pixels `[..., H, W, C]` -> float32 `(x / 255 - mean) / std` per channel: the one
  rule every batch goes through, and an image given to a trained model (with the
  `meta['normalization']` of its data)."""
  x = np.asarray(images, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class Normalize:
  """Per-example `normalize` (picklable for workers)."""

  def __init__(self, spec: ImageSpec):
    self.spec = spec

  def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**example, 'image': normalize(example['image'], self.spec.mean, self.spec.std)}


class PadImageBatch:
  """Stacks examples into `batch_size` rows; missing rows get image 0 and label PAD_LABEL."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    images = np.stack([e['image'] for e in examples]).astype(np.float32)
    labels = np.array([e['label'] for e in examples], np.int32)
    missing = self.batch_size - len(examples)
    if missing:
      images = np.concatenate([images, np.zeros((missing,) + images.shape[1:], np.float32)])
      labels = np.concatenate([labels, np.full((missing,), PAD_LABEL, np.int32)])
    return {'image': images, 'label': labels}

  def empty(self, shape: Sequence[int]) -> dict[str, np.ndarray]:
    """An all-padding batch of images of `shape` (H, W, C)."""
    return {'image': np.zeros((self.batch_size, *shape), np.float32),
            'label': np.full((self.batch_size,), PAD_LABEL, np.int32)}
