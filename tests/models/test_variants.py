"""Transformer options of issue #13: cached decoding equals the full forward for each variant,
parameter-sharing and projection-free variants equal the standard model with tied weights,
backward aggregation ignores padding, and the config refuses meaningless combinations by name.

float32; tolerances 1e-5 (values). One jitted program per test: compiling is what costs time.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models
from tests.models.test_transformer import _empty_cache, _prefill_and_step, _tokens

ATOL = 1e-5
VOCAB = 13


def _cfg(**overrides):
  overrides = dict(dict(num_encoder_layers=1, num_decoder_layers=1), **overrides)
  return models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0, **overrides)


LM_CACHE_CASES = {
    # The self penalty after the soft cap, seen at token positions; one layer applied twice
    # with a cache per application.
    'shared_qk_rope_softcap_share_layers': dict(
        positional='rope', share_layers=True, num_decoder_layers=2,
        attention=dict(shared_qk=True, logit_softcap=2.0)),
    'no_kv_projection_concat_geometric': dict(
        positional='concat_geometric', geometric_frequencies=4,
        attention=dict(value_projection=False, key_projection=False)),
    'linear_gqa_shared_heads': dict(attention=dict(kind='linear', num_kv_heads=2,
                                                   share_head_projections=True)),
    'performer_rope': dict(positional='rope',
                           attention=dict(kind='performer', performer_features=16)),
}


@pytest.mark.parametrize('case', sorted(LM_CACHE_CASES))
def test_decoder_lm_cached_decoding_equals_full_forward(case):
  model = models.DecoderLM(_cfg(**LM_CACHE_CASES[case]))
  tokens = _tokens(0, (2, 7))

  @jax.jit
  def full_and_cached(tokens):
    params = model.init(jax.random.key(0), tokens)['params']
    full = model.apply({'params': params}, tokens)

    def decode_fn(cache, chunk, start):
      del start
      return model.apply({'params': params, 'cache': cache}, chunk, decode=True,
                         mutable=['cache'])
    cache = _empty_cache(model, jnp.ones((2, 9), jnp.int32), decode=True)
    return full, _prefill_and_step(decode_fn, cache, models.shift_right(tokens))

  full, cached = full_and_cached(tokens)
  np.testing.assert_allclose(cached, full, atol=ATOL)


@pytest.mark.parametrize('options', [
    # Backward aggregation in the encoder; projection-free cross-attention values.
    dict(num_encoder_layers=2, attention=dict(aggregation='backward', value_projection=False)),
    # Linear attention in every attention, cross-attention included; ALBERT stacks.
    dict(share_layers=True, num_encoder_layers=2, num_decoder_layers=2,
         attention=dict(kind='linear')),
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
      return model.apply({'params': params, 'cache': cache}, encoded if start == 0 else None,
                         inputs, chunk, targets_positions=positions,
                         targets_segmentation=jnp.ones_like(chunk), decode=True,
                         method='decode', mutable=['cache'])
    cache = _empty_cache(model, encoded, inputs, jnp.ones((2, 8), jnp.int32), decode=True,
                         method='decode')
    return full, _prefill_and_step(decode_fn, cache, models.shift_right(targets))

  full, cached = full_and_cached(inputs, targets)
  np.testing.assert_allclose(cached, full, atol=ATOL)


def _tie(params, case):
  """The standard model's parameters that make it compute what variant `case` computes."""
  params = jax.tree.map(lambda x: x, params)  # a copy to edit

  def edit(tree):
    if not isinstance(tree, dict):
      return tree
    tree = {k: edit(v) for k, v in tree.items()}
    if case == 'share_layers' and 'shared_layer' in tree:
      shared = tree.pop('shared_layer')
      tree.update(layer_0=shared, layer_1=shared)
    if case == 'share_head_projections':
      for name in ('query', 'key', 'value'):
        if name in tree and tree[name]['kernel'].ndim == 2:  # [features, head_dim]
          heads = 4
          tree[name] = {'kernel': jnp.repeat(tree[name]['kernel'][:, None], heads, axis=1),
                        'bias': jnp.repeat(tree[name]['bias'][None], heads, axis=0)}
    if case == 'no_value_projection' and 'query' in tree and 'value' not in tree:
      features, heads, head_dim = tree['query']['kernel'].shape
      # The identity, head h reading channels h * head_dim ... (h + 1) * head_dim - 1.
      tree['value'] = {'kernel': jnp.eye(features).reshape(features, heads, head_dim),
                       'bias': jnp.zeros((heads, head_dim))}
    return tree

  return edit(params)


@pytest.mark.parametrize('case, options', [
    ('share_layers', dict(share_layers=True)),
    ('share_head_projections', dict(attention=dict(share_head_projections=True))),
    ('no_value_projection', dict(attention=dict(value_projection=False))),
])
def test_variant_equals_the_standard_model_with_tied_weights(case, options):
  variant = models.DecoderLM(_cfg(num_decoder_layers=2, positional='alibi', **options))
  standard = models.DecoderLM(_cfg(num_decoder_layers=2, positional='alibi'))
  tokens = _tokens(0, (2, 6))

  @jax.jit
  def both(tokens):
    params = nn.unbox(variant.init(jax.random.key(0), tokens))['params']
    return params, variant.apply({'params': params}, tokens), standard.apply(
        {'params': _tie(params, case)}, tokens)

  params, got, want = both(tokens)
  np.testing.assert_allclose(got, want, atol=ATOL)
  count = sum(x.size for x in jax.tree.leaves(params))
  standard_count = sum(x.size for x in jax.tree.leaves(_tie(params, case)))
  assert count < standard_count


def test_backward_aggregation_encoder_ignores_padding_and_differs_from_forward():
  backward = models.EncoderClassifier(_cfg(pooling='mean', num_classes=3,
                                           attention=dict(aggregation='backward')))
  forward = models.EncoderClassifier(_cfg(pooling='mean', num_classes=3))
  inputs = _tokens(0, (2, 6), lengths=[4, 6])

  @jax.jit
  def run(inputs):
    params = backward.init(jax.random.key(0), inputs)['params']
    return (backward.apply({'params': params}, inputs),
            backward.apply({'params': params}, jnp.pad(inputs, ((0, 0), (0, 4)))),
            forward.apply({'params': params}, inputs))

  out, padded, forward_out = run(inputs)
  np.testing.assert_allclose(padded, out, atol=ATOL)  # padding sends nothing to real tokens
  assert not np.allclose(out, forward_out, atol=1e-3)  # same weights, other direction


def test_performer_projection_is_a_constant_of_the_seed_not_a_parameter():
  tokens = _tokens(0, (1, 5))
  seeds = [models.DecoderLM(_cfg(attention=dict(kind='performer', performer_seed=seed,
                                                 performer_features=8))) for seed in (0, 1)]
  standard = models.DecoderLM(_cfg())

  @jax.jit
  def run(tokens):
    params = nn.unbox(seeds[0].init(jax.random.key(0), tokens))['params']
    return params, [m.apply({'params': params}, tokens) for m in (*seeds, seeds[0])]

  params, (zero, one, zero_again) = run(tokens)
  shapes = jax.eval_shape(lambda: nn.unbox(standard.init(jax.random.key(0), tokens)))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shapes['params'])
  np.testing.assert_array_equal(zero_again, zero)
  assert not np.allclose(one, zero, atol=1e-4)  # another seed, other random features


@pytest.mark.parametrize('overrides, message', [
    (dict(positional='alibi', attention=dict(kind='linear')),
     r"'linear' has no logits.*positional"),
    (dict(attention=dict(kind='performer', sinks=True)), 'sinks'),
    (dict(attention=dict(kind='softmax2')), "kind='softmax2'"),
    (dict(attention=dict(shared_qk=True, num_kv_heads=2)),
     'shared_qk=True makes the keys the queries'),
    (dict(attention=dict(shared_qk=True, key_projection=False)), 'key_projection=False'),
    (dict(attention=dict(key_projection=False, num_kv_heads=1)), 'key_projection=False splits'),
    (dict(attention=dict(aggregation='sideways')), 'aggregation'),
    (dict(num_encoder_layers=0, attention=dict(aggregation='backward')), 'num_encoder_layers=0'),
    (dict(share_layers=True, layer_pattern='LG', attention=dict(sliding_window=2)),
     'share_layers=True'),
    (dict(positional='concat_geometric', geometric_frequencies=0), 'geometric_frequencies'),
])
def test_bad_variant_combinations_raise_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.transformer_config('tiny', **overrides)


def test_backward_aggregation_is_refused_in_a_decoder_lm():
  model = models.DecoderLM(_cfg(attention=dict(aggregation='backward')))
  with pytest.raises(ValueError, match="attention.aggregation='backward' applies to an encoder"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32)))
