"""Sequence classification: ListOps, text classification (IMDB, AG News, labelled files).

Batches (`attn_jax.data`): `inputs` int32 `[b, L]` padded with 0 (+ `inputs_segmentation`),
`label` int32 `[b]`; eval batches are padded with all-pad rows, which must not count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attn_jax.experiment.evaluators.attention_maps import AttentionMapEvaluator
from attn_jax.experiment.tasks.base import Task, exact_match
from attn_jax.models import names
from attn_jax.train import losses

CLS_LABEL = '<cls>'  # The heatmap label of the learned [CLS] position.


class ClassificationTask(Task):
  """A sequence -> one of `num_classes` labels, with a Transformer encoder."""

  name = 'classification'
  model_kinds = ('encoder_classifier',)
  evaluators = (AttentionMapEvaluator,)

  @classmethod
  def data_fields(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**super().data_fields(meta), 'num_classes': int(meta.get('num_classes') or 2)}

  def loss_fn(self, params, batch, rng, train):
    logits = self.apply(params, batch, train=train, rng=rng)
    weights = self.real_rows(batch).astype(np.float32)
    return losses.softmax_loss_and_metrics(logits, batch['label'], weights,
                                           label_smoothing=self.label_smoothing)

  def attention_axes(self, module, example, tokenizers):
    """As a token task's, with the [CLS] position first when the model pools it."""
    q_tok, k_tok = super().attention_axes(module, example, tokenizers)
    if module == names.ENCODER_SELF and getattr(self.model_config, 'pooling', '') == 'cls':
      q_tok = k_tok = [CLS_LABEL] + q_tok
    return q_tok, k_tok

  def predict_batch(self, params, ids, *, eval_config, max_decode_len, rng, tokenizers, meta):
    """The predicted label's name (or its index when the data names none)."""
    del eval_config, max_decode_len, rng, tokenizers
    labels = meta.get('label_names') or []
    pred = np.argmax(np.asarray(self.apply(params, {'inputs': ids})), axis=-1)
    return [labels[p] if p < len(labels) else str(p) for p in pred]

  def score(self, config, predictions: Sequence[str], references: Sequence[str]
            ) -> dict[str, float]:
    del config
    return exact_match(predictions, references)
