"""`tasks.softmax_loss_from_hidden`, the Transformers' loss that projects only real tokens,
against the dense `losses.softmax_loss_and_metrics` on the projected logits (float32; rtol
1e-6 for values, atol 1e-6 for gradients), and loading runs saved before its option existed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attn_jax.experiment import config as experiment_config
from attn_jax.experiment import tasks
from attn_jax.experiment.tasks import softmax_loss_from_hidden
from attn_jax.models.configs import TransformerConfig
from attn_jax.train import losses
from configs import translation


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('chunk', [4, 0])
def test_softmax_loss_from_hidden_equals_the_dense_loss_and_gradients(smoothing, chunk):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 9)), jnp.float32)
  targets = jnp.asarray(rng.integers(1, 9, size=(2, 7)), jnp.int32)
  targets = targets.at[0, 4:].set(0).at[1, 2:].set(0)  # 6 of 14 real: 2 of 4 chunks skipped
  weights = losses.token_weights(targets) * jnp.asarray(rng.uniform(0.5, 2, (2, 7)))

  def chunked(w, hidden):
    objective, metrics, predictions = softmax_loss_from_hidden(
        lambda h: h @ w, hidden, targets, weights, label_smoothing=smoothing, chunk=chunk)
    return objective, (metrics, predictions)

  def dense(w, hidden):
    logits = hidden @ w
    objective, metrics = losses.softmax_loss_and_metrics(logits, targets, weights,
                                                         label_smoothing=smoothing)
    return objective, (metrics, jnp.argmax(logits, -1))

  (got, (metrics, predictions)), got_grads = jax.value_and_grad(
      chunked, argnums=(0, 1), has_aux=True)(w, hidden)
  (want, (want_metrics, want_predictions)), want_grads = jax.value_and_grad(
      dense, argnums=(0, 1), has_aux=True)(w, hidden)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name in ('loss', 'accuracy'):
    np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-6)
  real = np.asarray(weights) > 0
  np.testing.assert_array_equal(np.asarray(predictions)[real], np.asarray(want_predictions)[real])
  for g, r in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-6)


def test_softmax_loss_from_hidden_names_bad_shapes():
  hidden, targets = jnp.zeros((2, 5, 3)), jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match='hidden'):
    softmax_loss_from_hidden(lambda h: h, hidden, targets, jnp.ones((2, 4)))



@pytest.mark.parametrize('arg,has_field', [('model=small,data=local,smoke', True),
                                           ('model=rnn,data=local,smoke', False)])
def test_a_run_saved_before_pad_skip_chunk_loads_with_it_filled_in(arg, has_field):
  meta = {'task': 'seq2seq', 'input_vocab_size': 32, 'target_vocab_size': 32, 'max_length': 8,
          'max_target_length': 8}
  saved = translation.get_config(arg).to_dict()
  assert (saved['model'].pop('pad_skip_chunk', None) is not None) == has_field
  if has_field:
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['pad_skip_chunk'\]"):
      tasks.make_task(ml_collections.ConfigDict(saved), meta)
  config = experiment_config.saved_config(saved)
  # Filled in for the Transformer, whose config has the field; nothing added to the RNN's.
  assert ('pad_skip_chunk' in config.model) == has_field
  if has_field:
    assert config.model.pad_skip_chunk == TransformerConfig().pad_skip_chunk  # its default
  tasks.make_task(config, meta)
