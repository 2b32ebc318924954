"""Sequence-to-sequence: translation and the algorithmic tasks (copy, reverse, sort, addition).

Batches (`attn_jax.data`): `inputs` int32 `[b, Ls]`, `targets` int32 `[b, Lt]`, each ending in
EOS and padded with 0; packed batches add `inputs_segmentation`/`targets_segmentation` and
`inputs_position`/`targets_position`. The loss is teacher-forced token cross-entropy; eval
decodes too (`DecodingEvaluator`: exact match by length, BLEU).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attn_jax.data import algorithmic
from attn_jax.experiment.evaluators.attention_maps import AttentionMapEvaluator
from attn_jax.experiment.evaluators.decoding import DecodingEvaluator, bleu, chrf, generate
from attn_jax.experiment.tasks.base import Task, exact_match
from attn_jax.experiment.tasks.token_loss import token_loss
from attn_jax.train import losses


class Seq2SeqTask(Task):
  """Inputs -> targets with an encoder-decoder (Transformer or RNN with attention)."""

  name = 'seq2seq'
  model_kinds = ('encoder_decoder', 'rnn_seq2seq')
  # Teacher-forced: the decoded exact-sequence accuracy comes from the DecodingEvaluator.
  metrics = {**losses.METRIC_DIRECTIONS, 'tf_sequence_accuracy': 'max'}
  evaluators = (DecodingEvaluator, AttentionMapEvaluator)
  token_fields = ('inputs', 'targets')

  @classmethod
  def data_fields(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The source vocabulary, and a separate target vocabulary when the data has one."""
    fields = super().data_fields(meta)
    target_vocab = int(meta.get('target_vocab_size') or fields['vocab_size'])
    if target_vocab != fields['vocab_size']:
      fields['output_vocab_size'] = target_vocab
    return fields

  def loss_fn(self, params, batch, rng, train):
    targets = batch['targets']
    weights = losses.token_weights(targets)
    objective, metrics, predictions = token_loss(self, params, batch, rng, train, targets,
                                                 weights)
    metrics['tf_sequence_accuracy'] = losses.sequence_accuracy(predictions, targets, weights)
    return objective, metrics

  def predict_batch(self, params, ids, *, eval_config, max_decode_len, rng, tokenizers, meta):
    """Decoded outputs (`config.eval`'s method), detokenized."""
    del meta
    out = generate(self, params, eval_config, inputs=ids, max_decode_len=max_decode_len,
                   rng=rng)
    detok = tokenizers.get('targets', tokenizers['inputs'])
    return [detok.decode(r) for r in out]

  def score(self, config, predictions: Sequence[str], references: Sequence[str]
            ) -> dict[str, float]:
    """Exact match for the algorithmic tasks; BLEU and chrF (detokenized) for translation."""
    if config.data.name in algorithmic.ALGORITHMIC_TASKS:
      return exact_match(predictions, references)
    return {'bleu': bleu(predictions, references), 'chrf': chrf(predictions, references)}
