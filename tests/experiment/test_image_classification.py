"""Image classification, the task added through the extension points: the config's smoke run
trains a ViT on the real digits, writes the patch-attention figure, and the saved run reloads
and classifies images as the model does."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from attn_jax import data as data_lib
from attn_jax.experiment import inference, run, tasks
from attn_jax.experiment import workdir as workdir_lib
from configs import image_classification


def test_digits_smoke_run_trains_draws_attention_and_reloads(tmp_path):
  config = image_classification.get_config('smoke')
  run.train_and_evaluate(config, tmp_path)
  done = json.loads((tmp_path / workdir_lib.DONE_FILE).read_text())
  assert set(done['final']) >= {'validation/accuracy', 'test/accuracy', 'test/loss'}
  assert (tmp_path / 'attention' / 'step_2' / 'patch_attention.png').stat().st_size > 2_000

  loaded = inference.load_run(tmp_path)
  assert isinstance(loaded.task, tasks.TASKS['image_classification'])
  bundle = data_lib.make_datasets(loaded.config.data)
  batch = next(iter(bundle.eval['test']))
  real = np.asarray(batch['label']) >= 0
  names = loaded.meta['label_names']
  predicted = loaded.task.classify(loaded.params, batch['image'][real], names)
  logits = jax.jit(lambda p, b: loaded.task.apply(p, b))(loaded.params, batch)
  assert predicted == [names[i] for i in np.argmax(np.asarray(logits), -1)[real]]


def test_the_model_is_checked_against_the_images_before_any_data_is_read():
  config = image_classification.get_config('smoke')
  with config.unlocked():
    config.model.patch_size = 3  # 8x8 digits do not cut into 3x3 patches
  with pytest.raises(ValueError, match='patch'):
    run.validate_config(config)
