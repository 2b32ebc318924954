"""Transformer models: causality, padding invariance, cache == full forward, scan == loop,
remat, sown attention, logical axes. float32; tolerances 1e-5 (values) / 1e-4 (grads)."""

from __future__ import annotations

import functools

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
  # One layer each unless a test is about stacking: compile time dominates these tests.
  overrides = dict(dict(num_encoder_layers=1, num_decoder_layers=1), **overrides)
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
  cfg = _cfg(positional='rope', attention=dict(num_kv_heads=2))
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
  segmentation = (inputs != 0).astype(jnp.int32)
  junk = jnp.where(segmentation == 0, 7, inputs)

  @jax.jit  # one program: compiling is what costs time here
  def run(inputs, targets):
    params = model.init(jax.random.key(0), inputs, targets)['params']
    def apply(*args, **kwargs):
      return model.apply({'params': params}, *args, **kwargs)
    return (apply(inputs, targets),
            apply(jnp.pad(inputs, ((0, 0), (0, 3))), jnp.pad(targets, ((0, 0), (0, 2)))),
            # Packed batches: whatever sits in segment-0 (padding) slots is invisible.
            apply(inputs, targets, inputs_segmentation=segmentation),
            apply(junk, targets, inputs_segmentation=segmentation))

  logits, longer, packed, packed_junk = run(inputs, targets)
  real = np.asarray(targets != 0)
  np.testing.assert_allclose(np.asarray(longer[:, :5])[real], np.asarray(logits)[real],
                             atol=ATOL)
  np.testing.assert_allclose(packed_junk, packed, atol=ATOL)
  np.testing.assert_allclose(np.asarray(packed)[real], np.asarray(logits)[real], atol=ATOL)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_classifier_ignores_padding(pooling):
  model = models.EncoderClassifier(_cfg(pooling=pooling, num_classes=3))
  inputs = _tokens(0, (2, 6), lengths=[4, 6])

  @jax.jit
  def run(inputs):
    params = model.init(jax.random.key(0), inputs)['params']
    return (model.apply({'params': params}, inputs),
            model.apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 4)))))

  out, padded = run(inputs)
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(padded, out, atol=ATOL)


def _prefill_and_step(decode_fn, cache, decoder_tokens):
  """Prefill 3 tokens, then feed the rest one at a time: logits `[b, len, vocab]`."""
  outs = []
  for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, decoder_tokens.shape[1])]:
    logits, mutated = decode_fn(cache, decoder_tokens[:, start:stop], start)
    cache = mutated['cache']
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def _empty_cache(model, *args, **kwargs):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


LM_CACHE_CASES = {
    'gqa_rope_scan_pre_swiglu_rms': dict(positional='rope', scan_layers=True, norm_position='pre',
                                         activation='swiglu', norm='rmsnorm',
                                         attention=dict(num_kv_heads=2)),
    'alibi_sliding_window': dict(positional='alibi', attention=dict(sliding_window=2)),
    't5_untied': dict(positional='t5', tie_output=False),
    'learned_mha': dict(positional='learned'),
    # Open attention options: every one must hold in the cached path too.
    'softcap_sinks_qknorm': dict(positional='rope', attention=dict(
        logit_softcap=2.0, sinks=True, qk_norm=True, num_kv_heads=2)),
    'local_global_nope': dict(positional='rope', layer_pattern='LN', num_decoder_layers=2,
                              attention=dict(sliding_window=2)),
    'user_mask_and_score_mods': dict(positional='alibi', attention=dict(
        mask_mod='dilated_2', score_mod='soft_cap_5')),
}


@pytest.mark.parametrize('case', sorted(LM_CACHE_CASES))
def test_decoder_lm_cached_decoding_equals_full_forward(case):
  model = models.DecoderLM(_cfg(**LM_CACHE_CASES[case]))
  tokens = _tokens(0, (2, 7))

  @jax.jit  # one program per case: compiling is what costs time here
  def full_and_cached(tokens):
    params = model.init(jax.random.key(0), tokens)['params']
    full = model.apply({'params': params}, tokens)

    def decode_fn(cache, chunk, start):
      del start  # the cache index knows where the chunk goes
      return model.apply({'params': params, 'cache': cache}, chunk, decode=True,
                         mutable=['cache'])
    cache = _empty_cache(model, jnp.ones((2, 9), jnp.int32), decode=True)
    return full, _prefill_and_step(decode_fn, cache, models.shift_right(tokens))

  full, cached = full_and_cached(tokens)
  np.testing.assert_allclose(cached, full, atol=ATOL)


@pytest.mark.parametrize('options', [
    dict(attention=dict(num_kv_heads=1)),
    # QK-norm is applied before the cross-attention keys are cached; sinks and the soft cap in
    # self- and cross-attention alike.
    dict(attention=dict(qk_norm=True, sinks=True, logit_softcap=3.0, num_kv_heads=1)),
])
def test_encoder_decoder_cached_decoding_equals_full_forward(options):
  model = models.EncoderDecoder(_cfg(**options))
  inputs, targets = _tokens(0, (2, 6), lengths=[4, 6]), _tokens(1, (2, 6))

  @jax.jit
  def full_and_cached(inputs, targets):
    params = model.init(jax.random.key(0), inputs, targets)['params']
    full = model.apply({'params': params}, inputs, targets)
    encoded = model.apply({'params': params}, inputs, method='encode')

    def decode_fn(cache, chunk, start):
      positions = jnp.broadcast_to(start + jnp.arange(chunk.shape[1]), chunk.shape)
      # Only the prefill sees the encoder output; the steps read its cached keys/values.
      return model.apply({'params': params, 'cache': cache}, encoded if start == 0 else None,
                         inputs, chunk, targets_positions=positions,
                         targets_segmentation=jnp.ones_like(chunk), decode=True,
                         method='decode', mutable=['cache'])
    cache = _empty_cache(model, encoded, inputs, jnp.ones((2, 8), jnp.int32), decode=True,
                         method='decode')
    return full, _prefill_and_step(decode_fn, cache, models.shift_right(targets)), cache

  full, cached, cache = full_and_cached(inputs, targets)
  np.testing.assert_allclose(cached, full, atol=ATOL)
  cross = cache['decoder']['layer_0']['cross']
  assert cross['cross_key'].shape == (2, 6, 1, model.config.head_dim)  # [b, Ls, kv_heads, d]


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
  base = dict(positional='rope', norm_position='pre', num_decoder_layers=2)
  tokens = _tokens(0, (2, 5))
  unrolled = models.DecoderLM(_cfg(**base))
  # (model, unrolled parameters -> its parameters); the first is the reference.
  cases = [(unrolled, lambda p: p),
           (models.DecoderLM(_cfg(**base, remat=True)), lambda p: p),
           (models.DecoderLM(_cfg(**base, scan_layers=True, remat=True)), _stack_layers)]

  def loss(model, p):
    logits = model.apply({'params': p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5] * jnp.arange(5.0))

  @jax.jit  # init and all three gradients in one program: compiling is what costs time
  def all_grads(tokens):
    params = nn.unbox(unrolled.init(jax.random.key(0), tokens))['params']
    return params, [jax.value_and_grad(functools.partial(loss, m))(convert(params))
                    for m, convert in cases]

  params, ((ref_loss, ref_grad), *others) = all_grads(tokens)
  for (model, convert), (value, grad) in zip(cases[1:], others, strict=True):
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), tokens))['params']
    assert (jax.tree.map(jnp.shape, convert(params))
            == jax.tree.map(jnp.shape, nn.unbox(shapes)))
    np.testing.assert_allclose(value, ref_loss, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), grad,
                 convert(ref_grad))


def test_attention_weights_are_sown_per_attention_and_layer():
  model = models.EncoderDecoder(_cfg(capture_attention=True, num_encoder_layers=2,
                                     num_decoder_layers=2))
  inputs, targets = _tokens(0, (2, 5), lengths=[3, 5]), _tokens(1, (2, 4))


  @jax.jit  # init and apply in one program: compiling is what costs time here
  def sown(inputs, targets):
    params = model.init(jax.random.key(0), inputs, targets)['params']
    return model.apply({'params': params}, inputs, targets, mutable=('intermediates',))[1]

  inter = sown(inputs, targets)['intermediates']
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
