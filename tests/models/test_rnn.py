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

  @jax.jit  # one program per case: compiling is what costs time here
  def run(inputs):
    params = nn.unbox(model.init(jax.random.key(0), inputs, targets))['params']
    logits, state = model.apply({'params': params}, inputs, targets, mutable=['intermediates'])
    padded = model.apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 3))), targets)
    decode_state = model.apply({'params': params}, inputs, method='encode')
    previous, steps = models.shift_right(targets), []
    for t in range(targets.shape[1]):
      step_logits, decode_state = model.apply({'params': params}, decode_state, previous[:, t],
                                              method='decode_step')
      steps.append(step_logits)
    return params, logits, state.get('intermediates', {}), padded, jnp.stack(steps, axis=1)

  params, logits, intermediates, padded, stepwise = run(inputs)
  assert logits.shape == (2, 4, VOCAB) and logits.dtype == jnp.float32
  if attention == 'none':
    assert 'attention' not in params['step'] and not intermediates
  else:
    (weights,) = intermediates['rnn_attention']
    assert weights.shape == (2, 4, 6)
    np.testing.assert_allclose(weights[0, :, 4:], 0.0)  # source padding gets no weight
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(padded, logits, atol=1e-5)
  np.testing.assert_allclose(stepwise, logits, atol=1e-5)
