"""RNN encoder-decoder: step-by-step decoding equals teacher forcing, padding invariance,
the attention-free ablation, sown attention. float32, atol 1e-5."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models

VOCAB = 11


@pytest.mark.parametrize('attention, cell', [('additive', 'lstm'), ('none', 'gru')])
def test_stepwise_decoding_equals_teacher_forcing_and_padding_is_invisible(attention, cell):
  cfg = models.rnn_config('tiny', vocab_size=VOCAB, attention=attention, cell=cell,
                          capture_attention=True)
  model = models.RNNSeq2Seq(cfg)
  inputs = jnp.array([[5, 6, 7, 2, 0, 0], [4, 9, 8, 3, 10, 2]], jnp.int32)
  targets = jnp.array([[6, 5, 2, 0], [7, 7, 8, 2]], jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs, targets))['params']
  if attention == 'none':
    assert 'attention' not in params['step']

  @jax.jit
  def forward(inputs):
    return model.apply({'params': params}, inputs, targets, mutable=('intermediates',))
  logits, state = forward(inputs)
  assert logits.shape == (2, 4, VOCAB) and logits.dtype == jnp.float32
  if attention != 'none':
    (weights,) = state['intermediates']['rnn_attention']
    assert weights.shape == (2, 4, 6)
    np.testing.assert_allclose(weights[0, :, 4:], 0.0)  # source padding gets no weight
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)

  padded, _ = forward(jnp.pad(inputs, ((0, 0), (0, 3))))
  np.testing.assert_allclose(padded, logits, atol=1e-5)

  decode_step = jax.jit(lambda state, tokens: model.apply(
      {'params': params}, state, tokens, method='decode_step'))
  state = jax.jit(lambda x: model.apply({'params': params}, x, method='encode'))(inputs)
  previous = models.shift_right(targets)
  for t in range(targets.shape[1]):
    step_logits, state = decode_step(state, previous[:, t])
    np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)
