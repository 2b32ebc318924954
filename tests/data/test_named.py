"""Named TFDS datasets under tfds.testing.mock_data (no network) and their clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn_jax import data
from attn_jax.data import named
from tests.data.conftest import tiny_config


@pytest.mark.parametrize('name,task,num_classes', [
    ('imdb_reviews', 'classification', 2), ('ag_news_subset', 'classification', 4),
    ('lm1b', 'lm', 0), ('tiny_shakespeare', 'lm', 0)])
def test_mocked_named_datasets_give_well_formed_batches(name, task, num_classes, tmp_path):
  cfg = tiny_config(name, **{'tokenizer.vocab_size': 40})
  with tfds.testing.mock_data(num_examples=12):
    bundle = data.make_datasets(cfg, data_dir=str(tmp_path), seed=0)
    batch = next(bundle.train)
    evals = {s: list(ds) for s, ds in bundle.eval.items()}
  assert bundle.meta['task'] == task and bundle.meta['num_classes'] == num_classes
  assert len(bundle.meta.get('label_names', [])) == num_classes
  assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape[0] == 4
  assert (batch['inputs'] < bundle.meta['vocab_size']).all()
  if task == 'classification':
    assert set(batch) == {'inputs', 'label'}
    assert ((0 <= batch['label']) & (batch['label'] < num_classes)).all()
    rows = [r[r != 0] for r in batch['inputs']]
    assert all(r[-1] == data.EOS_ID for r in rows)
  else:  # LM default: concat-then-split rows of exactly max_length
    assert set(batch) == {'inputs', 'inputs_segmentation', 'inputs_position'}
    assert batch['inputs'].shape == (4, 32)
    assert (batch['inputs_segmentation'] > 0).all()
    assert (batch['inputs'] == data.EOS_ID).any()  # documents end with EOS
  assert evals and all(len(batches) >= 1 for batches in evals.values())


def test_field_mapping():
  rec = {'title': b'Title', 'description': b'Body', 'label': np.array(3)}
  assert named.Canonicalize(named.spec_for('ag_news_subset'))(rec) == {'text': 'Title Body',
                                                                        'label': 3}
  pair = {'de': b'Hallo', 'en': 'Hello'}
  assert named.Canonicalize(named.spec_for('wmt14_translate/de-en'))(pair) == {
      'source': 'Hallo', 'target': 'Hello'}
  rev = named.spec_for('wmt17_translate/de-en', reverse_translation=True)
  assert named.Canonicalize(rev)(pair) == {'source': 'Hello', 'target': 'Hallo'}
  assert named.spec_for('wmt19_translate/fr-en').fields == ('fr', 'en')
  with pytest.raises(ValueError, match='imdb_reviews'):
    named.spec_for('imbd_reviews')


def test_wmt_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
  real = named.importlib.util.find_spec
  monkeypatch.setattr(named.importlib.util, 'find_spec',
                      lambda n, *a: None if n == 'tensorflow' else real(n, *a))
  with pytest.raises(ValueError, match=r"attn_jax\[tf\]"):
    data.make_datasets(tiny_config('wmt14_translate/de-en'), data_dir=str(tmp_path))
