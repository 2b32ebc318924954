"""Skipping padding (`pad_skip_chunk`): the feed-forward sublayers and the loss's logits skip
chunks of padding, and every real token's loss and every parameter gradient stay those of the
dense computation, across the model kinds and the variants that treat padding differently.
float32; tolerances 2e-5 (loss) and 1e-4 (gradients): the same math on other row blocks."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models
from attn_jax.experiment.tasks import softmax_loss_from_hidden
from attn_jax.train import losses

VOCAB = 13
CHUNK = 4  # 3 x 7 = 21 tokens, about half padding: several chunks are skipped


def _cfg(**overrides):
  overrides = dict(dict(num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                        pad_skip_chunk=CHUNK),
                   **overrides)
  return models.transformer_config('tiny', vocab_size=VOCAB, **overrides)


def _tokens(seed, lengths, length=7):
  tokens = jax.random.randint(jax.random.key(seed), (len(lengths), length), 3, VOCAB)
  valid = jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]
  return jnp.where(valid, tokens, 0).astype(jnp.int32)


def _loss_and_grads(model, params, args, kwargs, targets, *, skip):
  """The train loss (sum over real targets) and its gradient, through the hidden-state path
  with padding skipped or through the dense logits."""
  weights = losses.token_weights(targets)

  def loss(params):
    if skip:
      hidden = model.apply({'params': params}, *args, return_hidden=True, **kwargs)
      project = lambda h: model.apply({'params': params}, h, method='project')  # noqa: E731
      objective, _, _ = softmax_loss_from_hidden(project, hidden, targets, weights,
                                                 chunk=CHUNK)
      return objective
    logits = model.apply({'params': params}, *args, **kwargs)
    return losses.softmax_loss_and_metrics(logits, targets, weights)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(cfg, model_cls, args, kwargs, targets):
  skipping = model_cls(cfg)
  dense = model_cls(dataclasses.replace(cfg, pad_skip_chunk=0))
  params = nn.unbox(jax.jit(dense.init)(jax.random.key(0), *args, **kwargs))['params']
  got = _loss_and_grads(skipping, params, args, kwargs, targets, skip=True)
  want = _loss_and_grads(dense, params, args, kwargs, targets, skip=False)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
    r = want[1]
    for key in path:
      r = r[key.key]
    np.testing.assert_allclose(g, r, atol=1e-4, err_msg=jax.tree_util.keystr(path))


SOURCES = _tokens(0, [7, 2, 4])
TARGETS = _tokens(1, [3, 6, 1])


@pytest.mark.parametrize('options', [
    # Post-LN with the encoder's attention summed over queries (padding hidden as a query).
    dict(attention=dict(aggregation='backward')),
    # Pre-LN, RMSNorm, SwiGLU, scanned + rematerialized layers, separate untied embeddings,
    # linear attention (padding masked inside the kernel sums).
    dict(norm_position='pre', norm='rmsnorm', activation='swiglu', scan_layers=True, remat=True,
         share_embeddings=False, tie_output=False, output_vocab_size=VOCAB,
         attention=dict(kind='linear')),
], ids=['post_ln_backward_aggregation', 'pre_rms_swiglu_scan_remat_untied_linear'])
def test_encoder_decoder_loss_and_gradients_equal_the_dense_path(options):
  _assert_same(_cfg(**options), models.EncoderDecoder, (SOURCES, TARGETS), {}, TARGETS)


def test_padding_inside_a_target_is_still_computed():
  # Causal self-attention does not mask padding as a key, so a pad token before real ones
  # feeds them: only trailing padding may be skipped.
  targets = TARGETS.at[1, 2].set(0)
  _assert_same(_cfg(), models.EncoderDecoder, (SOURCES, targets), {}, targets)


def test_packed_encoder_decoder_equals_the_dense_path():
  inputs_segmentation = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0],
                                   [1, 2, 2, 2, 0, 0, 0]])
  targets_segmentation = jnp.array([[1, 1, 2, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0],
                                    [1, 0, 0, 0, 0, 0, 0]])
  sources = jnp.where(inputs_segmentation > 0, SOURCES.at[:, :].set(5), 0)
  targets = jnp.where(targets_segmentation > 0, 7, 0).astype(jnp.int32)
  kwargs = dict(inputs_segmentation=inputs_segmentation,
                targets_segmentation=targets_segmentation)
  _assert_same(_cfg(), models.EncoderDecoder, (sources, targets), kwargs, targets)


def test_decoder_lm_with_a_mask_mod_equals_the_dense_path():
  inputs = _tokens(2, [7, 3, 5])
  _assert_same(_cfg(positional='rope', attention=dict(mask_mod='global_1')), models.DecoderLM,
               (inputs,), {},
               inputs)


def test_classifier_mean_pooling_ignores_skipped_padding():
  cfg = _cfg(pooling='mean', num_classes=3, pad_skip_chunk=CHUNK)
  skipping = models.EncoderClassifier(cfg)
  dense = models.EncoderClassifier(dataclasses.replace(cfg, pad_skip_chunk=0))
  params = nn.unbox(jax.jit(dense.init)(jax.random.key(0), SOURCES))['params']
  np.testing.assert_allclose(skipping.apply({'params': params}, SOURCES),
                             dense.apply({'params': params}, SOURCES), atol=1e-5)


def test_dropout_still_applies_to_the_chunks_that_run():
  cfg = _cfg(dropout_rate=0.5)
  model = models.EncoderDecoder(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), SOURCES, TARGETS))['params']
  apply = jax.jit(lambda rng: model.apply({'params': params}, SOURCES, TARGETS, train=True,
                                          rngs={'dropout': rng}))
  real = np.asarray(TARGETS) > 0
  a, b, again = apply(jax.random.key(1)), apply(jax.random.key(2)), apply(jax.random.key(1))
  np.testing.assert_array_equal(a, again)
  assert not np.allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-3)
  assert np.all(np.isfinite(a))


def test_negative_chunk_is_rejected():
  with pytest.raises(ValueError, match='pad_skip_chunk'):
    _cfg(pad_skip_chunk=-1)
