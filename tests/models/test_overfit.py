"""Every model type memorizes one small batch: the whole model trains end to end."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from attn_jax import models

VOCAB, STEPS = 12, 300
INPUTS = jnp.array([[5, 6, 7, 8, 2, 0], [9, 4, 11, 2, 0, 0], [10, 10, 3, 6, 5, 2]], jnp.int32)
TARGETS = jnp.array([[8, 7, 6, 5, 2], [11, 4, 9, 2, 0], [2, 0, 0, 0, 0]], jnp.int32)
LABELS = jnp.array([1, 0, 2], jnp.int32)
# One document: with several, the first token (predicted from BOS alone) is a coin flip.
DOCUMENT = jnp.array([[5, 6, 7, 8, 9, 4, 11, 2]], jnp.int32)


def _transformer(**overrides):
  return models.transformer_config('tiny', vocab_size=VOCAB, num_classes=3, dropout_rate=0.0,
                                   num_encoder_layers=1, num_decoder_layers=1, **overrides)


def _token_loss(logits, targets):
  weights = (targets != 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * weights) / jnp.sum(weights)


CASES = {
    'encoder_decoder': (lambda: models.EncoderDecoder(_transformer()),
                        lambda m, p: _token_loss(m.apply(p, INPUTS, TARGETS), TARGETS)),
    'decoder_lm': (lambda: models.DecoderLM(_transformer(positional='rope', norm_position='pre')),
                   lambda m, p: _token_loss(m.apply(p, DOCUMENT), DOCUMENT)),
    'classifier': (lambda: models.EncoderClassifier(_transformer(pooling='mean')),
                   lambda m, p: optax.softmax_cross_entropy_with_integer_labels(
                       m.apply(p, INPUTS), LABELS).mean()),
    'rnn': (lambda: models.RNNSeq2Seq(models.rnn_config('tiny', vocab_size=VOCAB,
                                                        dropout_rate=0.0)),
            lambda m, p: _token_loss(m.apply(p, INPUTS, TARGETS), TARGETS)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_model_overfits_one_batch(case):
  make, loss_fn = CASES[case]
  model = make()
  init_args = {'decoder_lm': (DOCUMENT,), 'classifier': (INPUTS,)}.get(case, (INPUTS, TARGETS))
  optimizer = optax.adam(1e-2)

  @jax.jit  # init and training in one program: compiling is what costs time here
  def train(init_args):
    params = nn.unbox(model.init(jax.random.key(0), *init_args))
    def step(carry, _):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=STEPS)
    return losses, loss_fn(model, params)

  losses, final = train(init_args)
  assert float(losses[0]) > 0.5
  assert float(final) < 0.01, f'{case}: loss {float(final):.4f} after {STEPS} steps'
