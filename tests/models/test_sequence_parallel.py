"""Context parallelism in the models: on 8 fake CPU devices, a model whose sequences are split
over the mesh's `sequence` axis (ring attention, the zig-zag layout in causal stacks) computes
what it computes on one device, logits and parameter gradients. float32; 2e-5 for logits,
1e-4 relative to the largest entry for gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attn_jax import models
from attn_jax.models import names
from attn_jax.models import sequence_parallel as sp
from attn_jax.train import parallel

VOCAB = 19


def _mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ('data', 'sequence'))


def _tokens(batch=2, length=16, pad_from=12):
  tokens = np.random.default_rng(0).integers(4, VOCAB, size=(batch, length)).astype(np.int32)
  tokens[1, pad_from:] = 0
  return jnp.asarray(tokens)


def _run(model, tokens, mesh=None, **kwargs):
  """Logits and the gradient of a loss on them, unsharded or with the length over the mesh."""
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, **kwargs))['params']

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens, **kwargs)
    return jnp.mean(jnp.sin(logits)), logits

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    return step(params, tokens)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(tokens, NamedSharding(mesh, P('data', 'sequence')))
    return step(params, sharded)


@pytest.mark.parametrize('attention, extra', [
    (dict(num_kv_heads=2, sinks=True, logit_softcap=5.0), dict(positional='rope')),
    (dict(sliding_window=3, modifiers='temperature'),
     dict(positional='alibi', layer_pattern='LG')),
])
def test_a_decoder_lm_split_over_the_sequence_axis_equals_one_device(attention, extra):
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0,
                                  num_encoder_layers=0, attention=attention, **extra)
  model = models.DecoderLM(cfg)
  tokens = _tokens()
  (_, want), want_grads = _run(model, tokens)
  (_, got), got_grads = _run(model, tokens, _mesh())
  np.testing.assert_allclose(got, want, atol=2e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale),
               got_grads, want_grads)


def test_an_encoder_classifier_with_padding_splits_too():
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0,
                                  num_decoder_layers=0, pooling='mean', num_classes=3,
                                  positional='t5')
  model = models.EncoderClassifier(cfg)
  tokens = _tokens(length=16, pad_from=9)
  (_, want), _ = _run(model, tokens)
  (_, got), _ = _run(model, tokens, _mesh())
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_unsupported_attention_is_refused_naming_what():
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, num_encoder_layers=0,
                                  attention=dict(dropout_rate=0.1))
  model = models.DecoderLM(cfg)
  tokens = _tokens()
  params = jax.jit(model.init)(jax.random.key(0), tokens)['params']
  with jax.set_mesh(_mesh()), pytest.raises(ValueError, match='attention dropout'):
    model.apply({'params': params}, tokens, train=True, rngs={'dropout': jax.random.key(1)})


def test_the_mesh_axis_is_one_name_in_the_models_and_the_train_layer():
  assert names.SEQUENCE_AXIS == parallel.SEQUENCE_AXIS in parallel.MESH_AXES
  assert sp.sequence_devices() == 1  # no ambient mesh: off
  with jax.set_mesh(_mesh()):
    assert sp.sequence_devices() == 4


def test_training_with_the_sequence_axis_gives_the_losses_of_one_device(tmp_path):
  """The language-model smoke config trained with `parallel.mesh.sequence=4` (and data=2) on
  8 fake devices logs the losses of the same run on one device."""
  from attn_jax.experiment import run
  from attn_jax.train.metrics import read_metrics
  from configs import language_model

  def train(workdir, **parallel_fields):
    config = language_model.get_config('smoke')
    with config.unlocked():
      config.train.num_steps = 3
      config.data.max_length = 16
      config.train.tensorboard = False
      config.eval.num_samples = config.eval.attention_examples = 0  # losses only
      for name, value in parallel_fields.items():
        setattr(config.parallel, name, value)
    run.train_and_evaluate(config, workdir)
    return [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]

  one = train(tmp_path / 'one')
  split = train(tmp_path / 'split', mode='sharded',
                mesh=dict(data=2, fsdp=1, sequence=4, tensor=1))
  np.testing.assert_allclose(split, one, rtol=1e-5)
  with pytest.raises(ValueError, match='multiple of 2 x config.parallel.mesh.sequence = 8'):
    config = language_model.get_config('smoke')
    with config.unlocked():
      config.data.max_length = 20
      config.parallel.mode = 'sharded'
      config.parallel.mesh.sequence = 4
    run.validate_config(config)
