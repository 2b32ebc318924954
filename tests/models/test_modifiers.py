"""Learned attention modifiers (`models.modifiers.MODIFIERS`): each against an independent
reference, with gradients on the dense and the blockwise path, and in cached decoding.

The temperature's reference: scaling head h's logits by exp(t_h) is scaling its query
projection (kernel and bias) by exp(t_h) in a layer without the modifier.
Tolerances: float32, 1e-5 for values, 1e-4 (relative to the largest entry) for gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models
from attn_jax.models import AttentionConfig, MultiHeadAttention, modifiers

B, L, F, H = 2, 9, 16, 4
TEMPERATURE = jnp.array([0.5, -0.3, 0.0, 1.2])  # log scales, one per head


def _layer(positional='rope', **options):
  return MultiHeadAttention(AttentionConfig(num_heads=H, **options), is_causal=True,
                            positional=positional)


def _x():
  return jax.random.normal(jax.random.key(0), (B, L, F))


def test_temperature_scales_each_heads_logits_like_its_query_projection():
  x = _x()
  with_t, without = _layer(modifiers='temperature'), _layer()

  @jax.jit
  def run(x):
    params = nn.unbox(with_t.init(jax.random.key(1), x))['params']
    assert params['log_temperature'].shape == (H,)
    at_init = with_t.apply({'params': params}, x)
    plain = {k: v for k, v in params.items() if k != 'log_temperature'}
    params = dict(params, log_temperature=TEMPERATURE)
    scale = jnp.exp(TEMPERATURE)[:, None]  # query kernel [F, H, D], bias [H, D]
    query = {'kernel': plain['query']['kernel'] * scale, 'bias': plain['query']['bias'] * scale}
    return (at_init, without.apply({'params': plain}, x), with_t.apply({'params': params}, x),
            without.apply({'params': dict(plain, query=query)}, x))

  at_init, reference_init, out, reference = run(x)
  np.testing.assert_allclose(at_init, reference_init, atol=1e-5)  # exp(0) = 1
  np.testing.assert_allclose(out, reference, atol=1e-5)
  assert not np.allclose(out, at_init, atol=1e-3)


def test_temperature_gets_the_same_gradient_on_the_dense_and_blockwise_paths():
  x = _x()
  # With ALiBi too: the temperature then scales the biased logit (the chain's order).
  dense, blockwise = (_layer('alibi', modifiers='temperature', implementation=i)
                      for i in ('dense', 'blockwise'))

  @jax.jit
  def grads(x):
    params = nn.unbox(dense.init(jax.random.key(1), x))['params']
    params = dict(params, log_temperature=TEMPERATURE)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({'params': p}, x)))  # noqa: E731
    return [jax.grad(loss(m))(params)['log_temperature'] for m in (dense, blockwise)]

  g_dense, g_blockwise = grads(x)
  assert np.all(np.abs(np.asarray(g_dense)) > 0)
  np.testing.assert_allclose(g_blockwise, g_dense, atol=1e-4 * float(jnp.abs(g_dense).max()))


def test_cached_decoding_with_a_modifier_equals_the_full_forward():
  cfg = models.transformer_config('tiny', vocab_size=13, dropout_rate=0.0, num_encoder_layers=0,
                                  positional='rope', attention=dict(modifiers='temperature'))
  model = models.DecoderLM(cfg)
  tokens = jnp.array([[5, 6, 7, 8, 9, 10], [4, 4, 9, 11, 12, 6]], jnp.int32)

  @jax.jit
  def run(tokens):
    params = nn.unbox(model.init(jax.random.key(0), tokens))['params']
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: TEMPERATURE if path[-1].key == 'log_temperature' else p, params)
    full = model.apply({'params': params}, tokens)  # logits[:, i] predicts tokens[:, i]
    fns = model.decoding_fns(params, prompt=tokens[:, :3], max_decode_len=4)
    logits, state = fns.start()  # after BOS + the 3-token prompt: predicts tokens[:, 3]
    steps = [logits]
    for t in (3, 4):
      logits, state = fns.step(state, tokens[:, t])
      steps.append(logits)
    return full, jnp.stack(steps, axis=1)

  full, stepwise = run(tokens)
  np.testing.assert_allclose(stepwise, full[:, 3:6], atol=1e-5)


def test_modifier_names_resolve_or_fail_before_tracing():
  assert modifiers.resolve_modifier('temperature') is modifiers.MODIFIERS['temperature']
  with pytest.raises(ValueError, match="modifier 'temprature' is not one of"):
    modifiers.check_names(AttentionConfig(modifiers='temperature, temprature'))
  with pytest.raises(ValueError, match='not a attn_jax.models.modifiers.Modifier'):
    modifiers.resolve_modifier('attn_jax.ops.mask_mods:causal')
  with pytest.raises(ValueError, match="kind='linear' has no logits.*modifiers"):
    AttentionConfig(kind='linear', modifiers='temperature')
