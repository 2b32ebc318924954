"""Transformer models: causality, padding invariance, cache == full forward, scan == loop,
remat, sown attention, logical axes. float32; tolerances 1e-5 (values) / 1e-4 (grads)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models

STATIC = ('train', 'decode', 'mutable', 'capture_attention', 'method')
ATOL = 1e-5
VOCAB = 13


def _cfg(**overrides):
  return models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0, **overrides)


def _init(model, *args, **kwargs):
  init = jax.jit(model.init, static_argnames=STATIC)
  return nn.unbox(init(jax.random.key(0), *args, **kwargs))


def _apply(model):
  return jax.jit(model.apply, static_argnames=STATIC)


def _tokens(seed, shape, lengths=None):
  tokens = jax.random.randint(jax.random.key(seed), shape, 3, VOCAB)
  if lengths is not None:
    tokens = jnp.where(jnp.arange(shape[1])[None] < jnp.asarray(lengths)[:, None], tokens, 0)
  return tokens.astype(jnp.int32)


def test_decoder_lm_logits_do_not_depend_on_later_tokens():
  cfg = _cfg(positional='rope', num_kv_heads=2)
  model = models.DecoderLM(cfg)
  tokens = _tokens(0, (1, 8))
  params = _init(model, tokens)['params']
  j = 5
  changed = tokens.at[0, j].set((tokens[0, j] + 1 - 3) % (VOCAB - 3) + 3)
  logits = _apply(model)({'params': params}, jnp.concatenate([tokens, changed]))
  # logits[:, i] predicts token i from tokens < i: position j's own change shows from j + 1.
  np.testing.assert_allclose(logits[0, :j + 1], logits[1, :j + 1], atol=ATOL)
  assert not np.allclose(logits[0, j + 1:], logits[1, j + 1:], atol=1e-3)


def test_decoder_layer_gradient_from_the_future_is_zero():
  cfg = _cfg(norm_position='pre', activation='gelu')
  layer = models.DecoderLayer(cfg)
  y = jax.random.normal(jax.random.key(0), (1, 6, cfg.d_model))
  args = (None, None, None, None, None)  # no encoder, masks, segments or positions
  params = _init(layer, y, *args)['params']
  jac = jax.jit(jax.jacobian(lambda v: layer.apply({'params': params}, v, *args)[0]))(y)
  dependence = np.asarray(jnp.abs(jac).sum(axis=(2, 5))[0, :, 0])  # [out pos, in pos]
  assert np.all(dependence[np.triu_indices(6, k=1)] == 0.0)
  assert np.all(np.diag(dependence) > 0.0)


def test_changing_padding_changes_no_real_output():
  cfg = _cfg()
  model = models.EncoderDecoder(cfg)
  inputs = _tokens(0, (2, 6), lengths=[4, 6])
  targets = _tokens(1, (2, 5), lengths=[3, 5])
  params = _init(model, inputs, targets)['params']
  apply = _apply(model)
  logits = apply({'params': params}, inputs, targets)
  longer = apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 3))),
                 jnp.pad(targets, ((0, 0), (0, 2))))
  real = np.asarray(targets != 0)
  np.testing.assert_allclose(np.asarray(longer[:, :5])[real], np.asarray(logits)[real],
                             atol=ATOL)
  # Packed batches: whatever sits in segment-0 (padding) slots is invisible.
  segmentation = (inputs != 0).astype(jnp.int32)
  junk = jnp.where(segmentation == 0, 7, inputs)
  packed = apply({'params': params}, inputs, targets, inputs_segmentation=segmentation)
  packed_junk = apply({'params': params}, junk, targets, inputs_segmentation=segmentation)
  np.testing.assert_allclose(packed_junk, packed, atol=ATOL)
  np.testing.assert_allclose(np.asarray(packed)[real], np.asarray(logits)[real], atol=ATOL)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_classifier_ignores_padding(pooling):
  model = models.EncoderClassifier(_cfg(pooling=pooling, num_classes=3))
  inputs = _tokens(0, (2, 6), lengths=[4, 6])
  params = _init(model, inputs)['params']
  apply = _apply(model)
  out = apply({'params': params}, inputs)
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 4)))), out,
                             atol=ATOL)


def _decode_matches_full(model, params, full_logits, decoder_tokens, apply_decode, cache):
  """Prefill 3 tokens, then feed the rest one at a time; compare with `full_logits`."""
  outs = []
  for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, decoder_tokens.shape[1])]:
    logits, mutated = apply_decode({'params': params, 'cache': cache},
                                   decoder_tokens[:, start:stop], start)
    cache = mutated['cache']
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full_logits, atol=ATOL)


def _empty_cache(model, *args, **kwargs):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


LM_CACHE_CASES = {
    'gqa_rope_scan_pre_swiglu_rms': dict(positional='rope', num_kv_heads=2, scan_layers=True,
                                         norm_position='pre', activation='swiglu',
                                         norm='rmsnorm'),
    'alibi_sliding_window': dict(positional='alibi', sliding_window=2),
    't5_learned_untied': dict(positional='t5', tie_output=False),
    'learned': dict(positional='learned'),
}


@pytest.mark.parametrize('case', sorted(LM_CACHE_CASES))
def test_decoder_lm_cached_decoding_equals_full_forward(case):
  model = models.DecoderLM(_cfg(**LM_CACHE_CASES[case]))
  tokens = _tokens(0, (2, 7))
  params = _init(model, tokens)['params']
  full = _apply(model)({'params': params}, tokens)
  shifted = models.shift_right(tokens)
  apply = _apply(model)

  def apply_decode(variables, chunk, start):
    del start  # the cache index knows where the chunk goes
    return apply(variables, chunk, decode=True, mutable=('cache',))
  cache = _empty_cache(model, jnp.ones((2, 9), jnp.int32), decode=True)
  _decode_matches_full(model, params, full, shifted, apply_decode, cache)


def test_encoder_decoder_cached_decoding_equals_full_forward():
  model = models.EncoderDecoder(_cfg(num_kv_heads=1))
  inputs, targets = _tokens(0, (2, 6), lengths=[4, 6]), _tokens(1, (2, 6))
  params = _init(model, inputs, targets)['params']
  apply = _apply(model)
  full = apply({'params': params}, inputs, targets)
  encoded = apply({'params': params}, inputs, method='encode')

  def apply_decode(variables, chunk, start):
    positions = jnp.broadcast_to(start + jnp.arange(chunk.shape[1]), chunk.shape)
    return apply(variables, encoded, inputs, chunk, targets_positions=positions,
                 targets_segmentation=jnp.ones_like(chunk), decode=True, method='decode',
                 mutable=('cache',))
  cache = _empty_cache(model, encoded, inputs, jnp.ones((2, 8), jnp.int32), decode=True,
                       method='decode')
  _decode_matches_full(model, params, full, models.shift_right(targets), apply_decode, cache)


def _stack_layers(params):
  """Unrolled `layer_i` parameters -> the `layers` tree of a scanned stack."""
  if not isinstance(params, dict):
    return params
  layer_keys = sorted((k for k in params if k.startswith('layer_')), key=lambda k: int(k[6:]))
  out = {k: _stack_layers(v) for k, v in params.items() if not k.startswith('layer_')}
  if layer_keys:
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layer_keys])
  return out


def test_scan_and_remat_change_no_value_or_gradient():
  base = dict(positional='t5', norm_position='pre')
  inputs, targets = _tokens(0, (2, 5), lengths=[3, 5]), _tokens(1, (2, 4))
  unrolled = models.EncoderDecoder(_cfg(**base))
  params = _init(unrolled, inputs, targets)['params']

  def loss_and_grad(model, params):
    def loss(p):
      logits = model.apply({'params': p}, inputs, targets)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5] * jnp.arange(4.0))
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_loss, ref_grad = loss_and_grad(unrolled, params)
  for overrides, convert in [(dict(remat=True), lambda p: p),
                             (dict(scan_layers=True, remat=True), _stack_layers)]:
    model = models.EncoderDecoder(_cfg(**base, **overrides))
    model_params = convert(params)
    assert (jax.tree.structure(model_params)
            == jax.tree.structure(_init(model, inputs, targets)['params']))
    value, grad = loss_and_grad(model, model_params)
    np.testing.assert_allclose(value, ref_loss, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grad,
                 convert(ref_grad))


def test_attention_weights_are_sown_per_attention_and_layer():
  model = models.EncoderDecoder(_cfg(capture_attention=True))
  inputs, targets = _tokens(0, (2, 5), lengths=[3, 5]), _tokens(1, (2, 4))
  variables = _init(model, inputs, targets)
  _, state = _apply(model)({'params': variables['params']}, inputs, targets,
                           mutable=('intermediates',))
  inter = state['intermediates']
  heads = model.config.num_heads
  assert inter['encoder']['layer_1']['encoder_self']['attention_weights'][0].shape == (
      2, heads, 5, 5)
  assert inter['decoder']['layer_0']['decoder_self']['attention_weights'][0].shape == (
      2, heads, 4, 4)
  cross = inter['decoder']['layer_1']['cross']['attention_weights'][0]
  assert cross.shape == (2, heads, 4, 5)
  np.testing.assert_allclose(cross[0, :, :, 3:], 0.0)  # source padding gets no weight


def test_parameters_carry_logical_axis_names():
  model = models.DecoderLM(_cfg(scan_layers=True))
  tokens = _tokens(0, (1, 4))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  specs = nn.get_partition_spec(boxed)['params']
  layers = specs['decoder']['layers']
  assert tuple(layers['decoder_self']['query']['kernel']) == ('layers', 'embed', 'heads', 'kv')
  assert tuple(layers['mlp']['wi']['kernel']) == ('layers', 'embed', 'mlp')
  assert tuple(specs['embed']['token']['embedding']) == ('vocab', 'embed')
