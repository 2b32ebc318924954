"""Language modelling: predict each next token of `inputs`; eval samples continuations.

Batches (`attn_jax.data`): `inputs` int32 `[b, L]` padded with 0 (`concat` batching: rows cut
from concatenated documents, with `inputs_segmentation`/`inputs_position` when packed).
"""

from __future__ import annotations

import numpy as np

from attn_jax.experiment.evaluators.attention_maps import AttentionMapEvaluator
from attn_jax.experiment.evaluators.decoding import generate
from attn_jax.experiment.evaluators.lm_samples import SamplesEvaluator
from attn_jax.experiment.tasks.base import Task
from attn_jax.experiment.tasks.token_loss import token_loss
from attn_jax.tokens import EOS_ID
from attn_jax.train import losses


class LanguageModelTask(Task):
  """Next-token prediction with a decoder-only Transformer."""

  name = 'lm'
  model_kinds = ('decoder_lm',)
  evaluators = (SamplesEvaluator, AttentionMapEvaluator)

  def loss_fn(self, params, batch, rng, train):
    targets = batch['inputs']
    objective, metrics, _ = token_loss(self, params, batch, rng, train, targets,
                                       losses.token_weights(targets))
    return objective, metrics

  def predict_batch(self, params, ids, *, eval_config, max_decode_len, rng, tokenizers, meta):
    """Continuations of the texts (their EOS removed: continue the text, do not end it)."""
    del meta
    prompt = np.where(ids == EOS_ID, 0, ids)
    out = generate(self, params, eval_config, prompt=prompt, max_decode_len=max_decode_len,
                   rng=rng)
    detok = tokenizers.get('targets', tokenizers['inputs'])
    return [detok.decode(r) for r in out]
