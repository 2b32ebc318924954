"""MultiHeadAttention (+ KV cache), AdditiveAttention, LuongAttention against references.

Tolerances: float32 throughout; 1e-5 where both sides do the same float32 maths in a
different order, 1e-4 for gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.models import AdditiveAttention, AttentionConfig, LuongAttention, MultiHeadAttention

B, L, F, H = 2, 7, 16, 4
ATOL = 1e-5
LAYER = ('is_causal', 'cross_attention', 'positional', 'dtype')


def _mha(num_heads=H, **options):
  """MultiHeadAttention with `options` split between its config and the layer's own."""
  layer = {k: options.pop(k) for k in LAYER if k in options}
  return MultiHeadAttention(AttentionConfig(num_heads=num_heads, **options), **layer)


def _x(seed=0, shape=(B, L, F)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


STATIC = ('decode', 'mutable', 'capture_attention', 'deterministic')


def _init(module, *args, **kwargs):
  # Jitted: eager Flax would compile every primitive on its own, which dominates runtime.
  init = jax.jit(module.init, static_argnames=STATIC)
  return nn.unbox(init(jax.random.key(1), *args, **kwargs))


def _apply(module):
  return jax.jit(module.apply, static_argnames=STATIC)


def _empty_cache(module, x):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, decode=True))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_matches_flax_multihead_attention_with_copied_params():
  x, kv = _x(0), _x(1, (B, 5, F))
  mask = jax.random.bernoulli(jax.random.key(2), 0.7, (B, 1, L, 5)).at[..., 0].set(True)
  ref = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=F, out_features=F)
  # num_kv_heads == num_heads is plain multi-head attention.
  ours = _mha(num_heads=H, num_kv_heads=H, cross_attention=True)

  @jax.jit  # one program: compiling dominates the runtime of this test
  def outputs_and_grads(x):
    params = ref.init(jax.random.key(3), x, kv)['params']
    results = []
    for module in (ours, ref):
      def loss(p, q, module=module):
        out = module.apply({'params': p}, q, kv, mask=mask)
        return jnp.sum(jnp.sin(out)), out
      results.append(jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x))
    return params, results

  params, ((g_ours, out), (g_ref, ref_out)) = outputs_and_grads(x)
  shapes = jax.eval_shape(lambda: nn.unbox(ours.init(jax.random.key(0), x, kv)))['params']
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(out, ref_out, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_ours, g_ref)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
  x = _x(0)
  gqa = _mha(num_heads=H, num_kv_heads=2, is_causal=True)
  params = _init(gqa, x)['params']
  assert params['key']['kernel'].shape == (F, 2, F // H)
  # Query head h reads k/v head h // groups: repeat each kv head `groups` times.
  mha_params = dict(params)
  for name in ('key', 'value'):
    mha_params[name] = jax.tree.map(lambda w: jnp.repeat(w, 2, axis=-2), params[name])
  mha = _mha(num_heads=H, is_causal=True)
  np.testing.assert_allclose(_apply(gqa)({'params': params}, x),
                             _apply(mha)({'params': mha_params}, x), atol=ATOL)


@pytest.mark.parametrize('positional', ['none', 'rope', 'alibi', 't5'])
def test_causal_self_attention_has_no_gradient_from_the_future(positional):
  x = _x(0)
  attn = _mha(num_heads=H, is_causal=True, positional=positional)
  params = _init(attn, x)['params']
  jac = jax.jit(jax.jacobian(lambda v: attn.apply({'params': params}, v)))(x)  # [B, L, F, B, L, F]
  dependence = jnp.abs(jac).sum(axis=(2, 5))[0, :, 0]  # [L (out), L (in)]
  future = np.triu(np.ones((L, L), bool), k=1)
  assert np.all(np.asarray(dependence)[future] == 0.0)
  assert np.all(np.asarray(dependence)[~future] > 0.0)


CACHE_CASES = {
    'mha': dict(),
    'gqa_rope': dict(num_kv_heads=2, positional='rope'),
    'mqa_alibi': dict(num_kv_heads=1, positional='alibi'),
    't5': dict(positional='t5'),
    'sliding_window': dict(sliding_window=2, num_kv_heads=2, positional='rope'),
}


@pytest.mark.parametrize('case', sorted(CACHE_CASES))
def test_prefill_then_stepwise_decoding_equals_full_forward(case):
  x = _x(0, (B, 8, F))
  attn = _mha(num_heads=H, is_causal=True, **CACHE_CASES[case])

  @jax.jit  # one program per case: compiling is what costs time here
  def full_and_cached(x):
    params = attn.init(jax.random.key(1), x)['params']
    full = attn.apply({'params': params}, x)
    cache = _empty_cache(attn, jnp.zeros((B, 10, F)))
    outs = []
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 8)]:  # prefill 5, then one at a time
      out, mutated = attn.apply({'params': params, 'cache': cache}, x[:, start:stop],
                                decode=True, mutable=['cache'])
      cache = mutated['cache']
      outs.append(out)
    return full, jnp.concatenate(outs, axis=1), cache

  full, cached, cache = full_and_cached(x)
  window = CACHE_CASES[case].get('sliding_window')
  if window is None:
    assert cache['cached_key'].shape[:2] == (B, 10)
  else:  # a rolling cache of the window, whatever the length: the prefill of 5 wraps it
    assert cache['window_key'].shape[:2] == (B, window + 1) and 'cached_key' not in cache
  assert int(cache['cache_index']) == 8
  np.testing.assert_allclose(cached, full, atol=ATOL)


def test_decoding_a_ragged_prompt_matches_each_row_alone():
  """Row 0's prompt has 2 padding slots; its next token must see positions, not slots."""
  x = _x(0, (1, 5, F))
  attn = _mha(num_heads=H, is_causal=True, positional='alibi')
  params = _init(attn, x)['params']
  apply = _apply(attn)
  full = apply({'params': params}, x)  # the unpadded 5-token sequence
  cache = _empty_cache(attn, jnp.zeros((1, 8, F)))
  prompt = jnp.concatenate([x[:, :4], jnp.zeros((1, 2, F))], axis=1)  # 4 real + 2 pad
  variables = {'params': params, 'cache': cache}
  _, mutated = apply(variables, prompt, segment_ids=jnp.array([[1, 1, 1, 1, 0, 0]]),
                     decode=True, mutable=('cache',))
  out, _ = apply({'params': params, 'cache': mutated['cache']}, x[:, 4:5],
                 positions=jnp.array([[4]]), decode=True, mutable=('cache',))
  np.testing.assert_allclose(out, full[:, 4:5], atol=ATOL)


def test_sliding_window_limits_the_receptive_field():
  x = _x(0)
  attn = _mha(num_heads=H, sliding_window=1)  # bidirectional, +-1 token
  params = _init(attn, x)['params']
  jac = jax.jit(jax.jacobian(lambda v: attn.apply({'params': params}, v)))(x)
  dependence = np.asarray(jnp.abs(jac).sum(axis=(2, 5))[0, :, 0])
  band = np.abs(np.arange(L)[:, None] - np.arange(L)[None, :]) <= 1
  assert np.all(dependence[~band] == 0.0) and np.all(dependence[band] > 0.0)


def test_attention_weights_are_sown_and_dropout_needs_train():
  x = _x(0)
  attn = _mha(num_heads=H, dropout_rate=0.5)

  @jax.jit
  def run(x):
    variables = attn.init(jax.random.key(1), x)
    out, state = attn.apply(variables, x, capture_attention=True, mutable=['intermediates'])
    plain = attn.apply(variables, x)
    dropped = attn.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(5)})
    return out, state['intermediates']['attention_weights'], plain, dropped

  out, (weights,), plain, dropped = run(x)
  assert weights.shape == (B, H, L, L)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=ATOL)
  np.testing.assert_allclose(out, plain, atol=ATOL)  # capturing changes nothing
  assert not np.allclose(dropped, out)


def test_bad_head_configuration_raises_naming_the_field():
  x = _x(0)
  with pytest.raises(ValueError, match='num_kv_heads'):
    _mha(num_heads=4, num_kv_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='num_heads'):
    _mha(num_heads=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='positional'):
    _mha(num_heads=4, positional='xpos').init(jax.random.key(0), x)


def test_self_or_cross_attention_is_said_not_inferred():
  x, memory = _x(0), _x(1, (B, 5, F))
  with pytest.raises(ValueError, match='set cross_attention=True'):
    _mha(num_heads=H).init(jax.random.key(0), x, memory)
  with pytest.raises(ValueError, match='cross_attention=True needs inputs_kv'):
    _mha(num_heads=H, cross_attention=True).init(jax.random.key(0), x)
  # Non-causal self-attention cannot decode (it used to be taken for cross-attention).
  with pytest.raises(ValueError, match='needs is_causal=True'):
    _mha(num_heads=H).init(jax.random.key(0), x, decode=True)


def _naive_attention(scores, mask, values):
  scores = np.where(mask, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  return np.einsum('bk,bkd->bd', weights, values), weights


def test_additive_attention_matches_the_bahdanau_formula():
  query, keys = _x(0, (B, 6)), _x(1, (B, 5, 8))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  attn = AdditiveAttention(attention_dim=3)
  params = _init(attn, query, keys, mask)['params']
  context, weights = _apply(attn)({'params': params}, query, keys, mask)
  w_q, w_k, v = (np.asarray(params[n], np.float64) for n in ('w_query', 'w_key', 'v'))
  q, k = np.asarray(query, np.float64), np.asarray(keys, np.float64)
  scores = np.tanh((q @ w_q)[:, None, :] + k @ w_k) @ v  # [B, 5]
  ref_context, ref_weights = _naive_attention(scores, mask, k)
  np.testing.assert_allclose(weights, ref_weights, atol=ATOL)
  np.testing.assert_allclose(context, ref_context, atol=ATOL)
  assert np.all(np.asarray(weights)[~mask] == 0.0)


@pytest.mark.parametrize('score', ['dot', 'general'])
def test_luong_attention_matches_the_formula(score):
  query, keys = _x(0, (B, 8)), _x(1, (B, 5, 8))
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  attn = LuongAttention(score=score)
  params = _init(attn, query, keys, mask).get('params', {})
  context, weights = _apply(attn)({'params': params}, query, keys, mask)
  q, k = np.asarray(query, np.float64), np.asarray(keys, np.float64)
  if score == 'general':
    q = q @ np.asarray(params['w'], np.float64)
  ref_context, ref_weights = _naive_attention(np.einsum('bd,bkd->bk', q, k), mask, k)
  np.testing.assert_allclose(weights, ref_weights, atol=ATOL)
  np.testing.assert_allclose(context, ref_context, atol=ATOL)


def test_bfloat16_compute_stays_close_to_float32():
  x = _x(0)
  attn32 = _mha(num_heads=H, is_causal=True, positional='rope')
  attn16 = _mha(num_heads=H, is_causal=True, positional='rope',
                              dtype=jnp.bfloat16)
  params = _init(attn32, x)['params']
  out16 = _apply(attn16)({'params': params}, x)
  assert out16.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32  # param_dtype stays float32
  # bfloat16 keeps 8 mantissa bits: ~1e-2 relative error after three projections.
  np.testing.assert_allclose(out16.astype(jnp.float32), _apply(attn32)({'params': params}, x),
                             atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('options', [
    dict(rope_fraction=0.5, rope_interleaved=True),
    dict(rope_scaling='yarn', rope_scaling_factor=4.0, rope_original_length=8),
])
def test_rope_options_reach_the_rotation_and_the_cache(options):
  """The layer's RoPE equals `ops.rope` with the config's options (the projections are the
  identity here, so the logits are the rotated inputs'), and cached decoding follows."""
  from attn_jax import ops
  from attn_jax.models.attention import rope_scaling
  x = _x(0, (B, 8, F))
  attn = _mha(is_causal=True, positional='rope', **options)
  config = attn.config
  params = _init(attn, x)['params']

  @jax.jit
  def run(x):
    full = attn.apply({'params': params}, x)
    cache = _empty_cache(attn, jnp.zeros((B, 8, F)))
    out, _ = attn.apply({'params': params, 'cache': cache}, x, decode=True, mutable=['cache'])
    q = jnp.einsum('blf,fhd->blhd', x, params['query']['kernel']) + params['query']['bias']
    k = jnp.einsum('blf,fhd->blhd', x, params['key']['kernel']) + params['key']['bias']
    v = jnp.einsum('blf,fhd->blhd', x, params['value']['kernel']) + params['value']['bias']
    rot = lambda t: ops.rope(t, None, config.rope_base, fraction=config.rope_fraction,  # noqa: E731
                             interleaved=config.rope_interleaved, scaling=rope_scaling(config))
    ref = ops.dot_product_attention(rot(q), rot(k), v, is_causal=True, implementation='dense')
    ref = jnp.einsum('blhd,hdf->blf', ref, params['out']['kernel']) + params['out']['bias']
    return full, out, ref

  full, cached, reference = run(x)
  np.testing.assert_allclose(full, reference, atol=ATOL)
  np.testing.assert_allclose(cached, full, atol=ATOL)


def test_rope_options_are_checked_before_tracing():
  from attn_jax import models
  from attn_jax.models.attention import rope_scaling
  from attn_jax.models.configs import ROPE_SCALINGS
  from attn_jax.ops.rope import SCALING_KINDS
  assert ROPE_SCALINGS == SCALING_KINDS
  with pytest.raises(ValueError, match='rope_original_length'):
    rope_scaling(AttentionConfig(rope_scaling='yarn', rope_scaling_factor=2.0))
  with pytest.raises(ValueError, match='rope_scaling'):
    AttentionConfig(rope_scaling='xpos')
  with pytest.raises(ValueError, match='must be even'):
    models.transformer_config('tiny', positional='rope', attention=dict(rope_fraction=0.375))
