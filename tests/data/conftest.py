"""Fixtures shared by the attn_jax.data tests: tiny configs and a session-wide data_dir."""

from __future__ import annotations

import os

import pytest
import tensorflow_datasets as tfds

from attn_jax import data

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')

tfds.disable_progress_bar()


def tiny_config(name: str, /, **overrides):
  """A data config small enough for unit tests (tens of examples, short sequences)."""
  c = data.default_config(name)
  c.algorithmic.num_train, c.algorithmic.num_validation, c.algorithmic.num_test = 64, 8, 8
  c.algorithmic.train_length, c.algorithmic.test_length = (1, 6), (7, 10)
  if name == 'addition':
    c.algorithmic.train_length, c.algorithmic.test_length = (1, 4), (5, 7)
  c.listops.num_train, c.listops.num_validation, c.listops.num_test = 32, 8, 8
  c.listops.length, c.listops.max_depth, c.listops.max_args = (10, 31), 4, 5
  c.max_length, c.batch_size, c.eval_batch_size = 32, 4, 4
  c.read_threads, c.bucket_window = 1, 2
  c.tokenizer.vocab_size = 64
  c.update_from_flattened_dict(overrides)  # 'a.b' keys reach nested fields
  return c


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))
