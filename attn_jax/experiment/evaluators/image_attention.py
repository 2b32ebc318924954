"""Where a Vision Transformer looks: patch-attention maps of a few eval images, drawn at the end.

    ImageAttentionEvaluator(config, task, bundle, workdir)(state, step) -> {}

At the final step it captures the encoder's attention on the first
`config.eval.attention_examples` real images of the first eval split, reduces it to one map
over the patch grid per image (`models.vit.patch_attention_map`: attention rollout, Abnar &
Zuidema 2020), and draws each image beside its map with `plots.plot_image_attention` into
`workdir/attention/step_<N>/patch_attention.png`, captioned with the label and the prediction.
It writes no metrics.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax
import numpy as np

from attn_jax.experiment import plots
from attn_jax.experiment.evaluators.attention_maps import ATTENTION_DIR
from attn_jax.experiment.evaluators.base import Evaluator, eval_splits
from attn_jax.models import vit

FIGURE = 'patch_attention.png'


class ImageAttentionEvaluator(Evaluator):
  """Patch-attention maps of a few eval images at the final step (no metrics)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return config.eval.attention_examples > 0

  def __call__(self, state, step):
    if step != self.config.train.num_steps or jax.process_index() != 0:
      return {}
    batch = next(iter(self.bundle.eval[eval_splits(self.config, self.bundle)[0]]))
    path = pathlib.Path(self.workdir) / ATTENTION_DIR / f'step_{step}' / FIGURE
    draw(self.task, state.params, batch, path, self.config.eval.attention_examples,
         self.bundle.meta.get('label_names') or [])
    logging.info('wrote the patch-attention maps of step %d to %s', step, path)
    return {}


def draw(task, params, batch, path: str | os.PathLike, num_examples: int,
         label_names) -> pathlib.Path | None:
  """The first `num_examples` real images of `batch` beside their rollout maps, at `path`."""
  keep = np.flatnonzero(np.asarray(task.real_rows(batch)))[:num_examples]
  if not len(keep):
    return None
  small = {k: np.asarray(v)[keep] for k, v in batch.items()}
  logits, inter = task.apply(params, small, capture=True)
  maps = vit.patch_attention_map(vit.attention_weights(inter), task.model_config)
  name = lambda i: label_names[i] if i < len(label_names) else str(i)  # noqa: E731
  captions = [f'label {name(int(y))}, predicted {name(int(p))}'
              for y, p in zip(small['label'], np.argmax(np.asarray(logits), -1), strict=True)]
  return plots.plot_image_attention(small['image'], np.asarray(maps), path, captions=captions,
                                    title='attention rollout over patches')
