"""Image classification with a Vision Transformer: digits (offline), MNIST, CIFAR-10.

Batches (`attn_jax.data.images`): `image` float32 `[b, H, W, C]` (normalized), `label` int32
`[b]`; eval batches are padded with rows of label -1, which must not count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from attn_jax.experiment.evaluators.image_attention import ImageAttentionEvaluator
from attn_jax.experiment.tasks.base import Task, exact_match
from attn_jax.train import losses


class ImageClassificationTask(Task):
  """An image -> one of `num_classes` labels, with a ViT over its patches."""

  name = 'image_classification'
  model_kinds = ('vision_transformer',)
  evaluators = (ImageAttentionEvaluator,)
  token_fields = ()  # see count_tokens: the patches an image gives the encoder

  @classmethod
  def data_fields(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
    height, width, channels = (int(n) for n in meta['image_shape'])
    return {'image_size': (height, width), 'channels': channels,
            'num_classes': int(meta['num_classes'])}

  def dummy_batch(self) -> dict[str, np.ndarray]:
    return {'image': np.zeros((1, *self.model_config.image_shape), np.float32),
            'label': np.zeros((1,), np.int32)}

  def real_rows(self, batch: Mapping[str, Any]) -> Any:
    return batch['label'] >= 0

  def count_tokens(self, batch: Mapping[str, Any]) -> int:
    """The positions the encoder processes for the real images: patches (+ the class token),
    so tokens/s compares with a text encoder's (images/s is this over the tokens an image)."""
    cfg = self.model_config
    per_image = cfg.num_patches + (cfg.pooling == 'cls')
    return int(np.sum(np.asarray(batch['label']) >= 0)) * per_image

  def loss_fn(self, params, batch, rng, train):
    logits = self.apply(params, batch, train=train, rng=rng)
    weights = self.real_rows(batch).astype(np.float32)
    # Padding rows' label -1 takes weight 0; the one-hot of -1 is all zeros, so it stays finite.
    return losses.softmax_loss_and_metrics(logits, batch['label'], weights,
                                           label_smoothing=self.label_smoothing)

  def classify(self, params, images: np.ndarray, label_names: Sequence[str] = ()
               ) -> list[str]:
    """The predicted label (its name when the data names them) of each normalized image
    `[n, H, W, C]`."""
    logits = jax.jit(lambda p, x: self.apply(p, {'image': x}))(params, np.asarray(images))
    return [label_names[p] if p < len(label_names) else str(p)
            for p in np.argmax(np.asarray(logits), axis=-1)]

  def score(self, config, predictions: Sequence[str], references: Sequence[str]
            ) -> dict[str, float]:
    del config
    return exact_match(predictions, references)
