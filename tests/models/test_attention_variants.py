"""The attention variants of issue #26 against references written here, with gradients, and in
cached decoding: multi-head latent attention (whose absorbed decoding must equal the naive
up-projected forward), differential attention, the output gate, value residual, talking
heads and memory slots.

Each reference is one formula in `xp` (NumPy or jax.numpy): in float64 NumPy it checks the
values, in jax.numpy its gradients (of `sum(sin(out))` w.r.t. the input and every parameter)
check ours. One jitted program per variant holds the forward, the gradients and the cached
decode (prefill 3 tokens, then one at a time): compiling is what costs time here.
Tolerances: float32 against float64, 2e-5 on values, 1e-4 on gradients.
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models
from attn_jax.models import AttentionConfig, MultiHeadAttention, latent
from attn_jax.models.value_residual import StackState

B, L, F, H = 2, 6, 16, 4
D = F // H
ATOL, GRAD_ATOL = 2e-5, 1e-4


# --- Reference formulas (xp = numpy or jax.numpy) -------------------------------------------


def _proj(xp, p, x):
  return xp.einsum('blf,fhd->blhd', x, p['kernel']) + p['bias']


def _out(xp, p, heads):
  return xp.einsum('blhd,hdf->blf', heads, p['kernel']) + p['bias']


def _softmax(xp, logits, visible):
  z = xp.where(visible, logits, -1e30)
  z = xp.exp(z - z.max(axis=-1, keepdims=True)) * visible
  return z / z.sum(axis=-1, keepdims=True)


def _rope(xp, x):
  """Rotate-half RoPE at positions 0..len-1 on every channel of `x` `[b, len, h, d]`."""
  d = x.shape[-1]
  angle = np.arange(x.shape[1])[:, None] * 10_000.0 ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rms(xp, x, scale, eps):
  return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _attention(xp, q, k, v, visible, scale):
  w = _softmax(xp, xp.einsum('bthd,bshd->bhts', q, k) * scale, visible)
  return xp.einsum('bhts,bshd->bthd', w, v)


CAUSAL = np.tril(np.ones((L, L), bool))
WINDOW = CAUSAL & ~np.tril(np.ones((L, L), bool), k=-3)  # causal, at most 2 keys back


def _qkv(xp, p, x):
  return _proj(xp, p['query'], x), _proj(xp, p['key'], x), _proj(xp, p['value'], x)


def ref_gated(xp, p, x, first):
  q, k, v = _qkv(xp, p, x)
  heads = _attention(xp, q, k, v, CAUSAL, D ** -0.5)
  gate = 1.0 / (1.0 + xp.exp(-_proj(xp, p['gate'], x)))
  return _out(xp, p['out'], heads * gate)


def ref_value_residual(xp, p, x, first):
  q, k, v = _qkv(xp, p, x)
  lambdas = p['value_residual']
  v = lambdas[0] * v + lambdas[1] * first  # layer 2 of a stack whose layer 1 gave `first`
  return _out(xp, p['out'], _attention(xp, q, k, v, CAUSAL, D ** -0.5))


def ref_talking_heads(xp, p, x, first):
  q, k, v = _qkv(xp, p, x)
  logits = xp.einsum('bthd,bshd->bhts', q, k) * D ** -0.5
  logits = xp.einsum('bgts,gh->bhts', logits, p['talking_heads_pre'])
  weights = xp.einsum('bgts,gh->bhts', _softmax(xp, logits, WINDOW), p['talking_heads_post'])
  return _out(xp, p['out'], xp.einsum('bhts,bshd->bthd', weights * WINDOW, v))


def ref_memory(xp, p, x, first):
  q, k, v = _qkv(xp, p, x)
  q, k = _rope(xp, q), _rope(xp, k)
  mem_k, mem_v = p['memory_key'], p['memory_value']  # [slots, heads, d]
  logits = xp.concatenate([xp.einsum('bthd,mhd->bhtm', q, mem_k),
                           xp.einsum('bthd,bshd->bhts', q, k)], axis=-1) * D ** -0.5
  logits = 3.0 * xp.tanh(logits / 3.0)  # the soft-cap bounds the slots' logits too
  visible = np.concatenate([np.ones((L, mem_k.shape[0]), bool), CAUSAL], axis=-1)
  weights = _softmax(xp, logits, visible)
  values = xp.concatenate([xp.broadcast_to(mem_v[None], (B, *mem_v.shape)), v], axis=1)
  return _out(xp, p['out'], xp.einsum('bhts,bshd->bthd', weights, values))


def ref_differential(xp, p, x, first, depth=3):
  q, k, v = _qkv(xp, p, x)
  half = D // 2
  maps = [_softmax(xp, xp.einsum('bthd,bshd->bhts', _rope(xp, q[..., s]), _rope(xp, k[..., s]))
                   * half ** -0.5, CAUSAL)
          for s in (slice(None, half), slice(half, None))]
  start = 0.8 - 0.6 * np.exp(-0.3 * (depth - 1))
  lam = (xp.exp(xp.sum(p['lambda_q1'] * p['lambda_k1']))
         - xp.exp(xp.sum(p['lambda_q2'] * p['lambda_k2'])) + start)
  heads = xp.einsum('bhts,bshd->bthd', maps[0] - lam * maps[1], v)
  heads = _rms(xp, heads, p['diff_norm']['scale'], 1e-5) * (1.0 - start)
  return _out(xp, p['out'], heads)


def ref_latent(xp, p, x, first):
  m = p['latent']
  c_q = _rms(xp, xp.einsum('blf,fr->blr', x, m['query_down']['kernel'])
             + m['query_down']['bias'], m['query_norm']['scale'], 1e-6)
  q = xp.einsum('blr,rhd->blhd', c_q, m['query']['kernel']) + m['query']['bias']
  c_kv = _rms(xp, xp.einsum('blf,fr->blr', x, m['kv_down']['kernel']) + m['kv_down']['bias'],
              m['kv_norm']['scale'], 1e-6)
  k_rope = xp.einsum('blf,fr->blr', x, m['key_rope']['kernel']) + m['key_rope']['bias']
  k_rope = _rope(xp, k_rope[:, :, None, :])  # one decoupled key for every head
  q = xp.concatenate([q[..., :D], _rope(xp, q[..., D:])], axis=-1)
  k = xp.concatenate([xp.einsum('blr,rhd->blhd', c_kv, m['key_up']),
                      xp.broadcast_to(k_rope, (B, L, H, k_rope.shape[-1]))], axis=-1)
  v = xp.einsum('blr,rhd->blhd', c_kv, m['value_up'])
  return _out(xp, p['out'], _attention(xp, q, k, v, CAUSAL, (D + k_rope.shape[-1]) ** -0.5))


# case -> (attention options, layer options, reference, stack index or None)
CASES = {
    'gated': (dict(output_gate=True), {}, ref_gated, None),
    'value_residual': (dict(value_residual=True), {}, ref_value_residual, 1),
    'talking_heads': (dict(talking_heads=True, sliding_window=2), {}, ref_talking_heads, None),
    'memory_kv': (dict(num_memory_kv=3, logit_softcap=3.0), dict(positional='rope'), ref_memory,
                  None),
    'differential': (dict(kind='differential'), dict(positional='rope'), ref_differential, 2),
    'latent': (dict(kind='latent', kv_lora_rank=6, q_lora_rank=5, qk_rope_head_dim=2),
               dict(positional='rope'), ref_latent, None),
}


def _perturbed(params):
  """Non-trivial values where initialization is trivial (identity mixes, 0.5/0.5 lambdas,
  unit norm scales), so the references test every parameter."""
  def edit(path, x):
    name = jax.tree_util.keystr(path)
    if any(k in name for k in ('talking_heads', 'value_residual', 'scale')):
      noise = jax.random.normal(jax.random.key(zlib.crc32(name.encode())), x.shape)
      return x + 0.3 * noise
    return x
  return jax.tree_util.tree_map_with_path(edit, params)


@pytest.mark.parametrize('case', sorted(CASES))
def test_variant_matches_reference_with_gradients_and_in_cached_decoding(case):
  options, layer, reference, depth = CASES[case]
  attn = MultiHeadAttention(AttentionConfig(num_heads=H, **options), is_causal=True, **layer)
  x = jax.random.normal(jax.random.key(0), (B, L, F))
  first = jax.random.normal(jax.random.key(1), (B, L, H, D))

  def stack(rows=slice(None), values=first):
    if depth is None:
      return None
    return StackState(depth, values[:, rows] if options.get('value_residual') else None)

  def ours(params, x, rows=slice(None), **kwargs):
    out = attn.apply({'params': params}, x, stack=stack(rows), **kwargs)
    return out[0] if isinstance(out, tuple) else out

  @jax.jit
  def run(x):
    params = _perturbed(nn.unbox(attn.init(jax.random.key(2), x, stack=stack()))['params'])
    loss = lambda fn: lambda p, v: jnp.sum(jnp.sin(fn(p, v)))  # noqa: E731
    grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(loss(lambda p, v: reference(jnp, p, v, first)), argnums=(0, 1))(
        params, x)
    shapes = jax.eval_shape(lambda: attn.init(jax.random.key(0), jnp.zeros((B, 8, F)),
                                              decode=True,
                                              stack=stack(values=jnp.zeros((B, 8, H, D)))))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])
    steps = []
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, L)]:
      out, mutated = attn.apply({'params': params, 'cache': cache}, x[:, start:stop],
                                decode=True, mutable=['cache'], stack=stack(slice(start, stop)))
      cache = mutated['cache']
      steps.append(out[0] if isinstance(out, tuple) else out)
    return params, ours(params, x), grads, ref_grads, jnp.concatenate(steps, axis=1), cache

  params, out, grads, ref_grads, decoded, cache = run(x)
  as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = reference(np, as64, np.asarray(x, np.float64), np.asarray(first, np.float64))
  np.testing.assert_allclose(out, want, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=GRAD_ATOL), grads, ref_grads)
  np.testing.assert_allclose(decoded, out, atol=ATOL)  # the cache path equals the forward
  if case == 'latent':  # only the latent and the shared RoPE key are cached
    assert 'cached_value' not in cache
    assert cache['cached_key'].shape == (B, 8, 1, 6 + 2)


def test_value_residual_first_layer_keeps_and_hands_on_its_values():
  attn = MultiHeadAttention(AttentionConfig(num_heads=H, value_residual=True), is_causal=True)
  plain = MultiHeadAttention(AttentionConfig(num_heads=H), is_causal=True)
  x = jax.random.normal(jax.random.key(0), (B, L, F))

  @jax.jit
  def run(x):
    params = nn.unbox(attn.init(jax.random.key(2), x, stack=StackState(0, jnp.zeros(
        (B, L, H, D)))))['params']
    out, first = attn.apply({'params': params}, x, stack=StackState(0, jnp.ones((B, L, H, D))))
    traced = attn.apply({'params': params}, x, stack=StackState(
        jnp.zeros((), jnp.int32), jnp.ones((B, L, H, D))))  # the nn.scan form of depth 0
    values = _proj(jnp, params['value'], x)
    params.pop('value_residual')
    return out, first, traced, plain.apply({'params': params}, x), values

  out, first, traced, want, values = run(x)
  np.testing.assert_allclose(out, want, atol=ATOL)
  np.testing.assert_allclose(first, values, atol=ATOL)
  np.testing.assert_allclose(traced[0], want, atol=ATOL)
  np.testing.assert_allclose(traced[1], values, atol=ATOL)
  with pytest.raises(ValueError, match='needs the stack state'):
    attn.init(jax.random.key(0), x)


def _scanned(params):
  """Unrolled stacks' `layer_<i>` parameters stacked along a leading axis as `layers`."""
  if not isinstance(params, dict):
    return params
  layers = sorted(k for k in params if k.startswith('layer_'))
  out = {k: _scanned(v) for k, v in params.items() if k not in layers}
  if layers:
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layers])
  return out


def test_stacks_carry_depth_and_first_values_under_scan_as_unrolled():
  """Differential attention (depth-dependent lambda_init) with value residual and the output
  gate, encoder and decoder of 3 layers: the scanned stack, whose carry holds the depth and the
  first layer's values, computes what the unrolled one does with the same weights, and its
  cached decoding equals its forward."""
  cfg = dict(num_encoder_layers=3, num_decoder_layers=3, positional='rope',
             attention=dict(kind='differential', value_residual=True, output_gate=True))
  unrolled = models.EncoderDecoder(models.transformer_config('tiny', vocab_size=13,
                                                             dropout_rate=0.0, **cfg))
  scanned = models.EncoderDecoder(models.transformer_config('tiny', vocab_size=13,
                                                            dropout_rate=0.0, scan_layers=True,
                                                            **cfg))
  inputs = jnp.array([[4, 5, 6, 7, 0, 0], [8, 9, 10, 11, 12, 5]], jnp.int32)
  targets = jnp.array([[5, 6, 7, 8, 9, 2], [6, 7, 8, 2, 0, 0]], jnp.int32)

  @jax.jit
  def run(inputs, targets):
    params = nn.unbox(unrolled.init(jax.random.key(0), inputs, targets))['params']
    stacked = _scanned(params)
    full = scanned.apply({'params': stacked}, inputs, targets)
    encoded = scanned.apply({'params': stacked}, inputs, method='encode')
    shapes = jax.eval_shape(lambda: scanned.init(
        jax.random.key(0), encoded, inputs, jnp.ones((2, 8), jnp.int32), decode=True,
        method='decode'))['cache']
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    decoder_inputs = models.shift_right(targets)
    steps = []
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, 6)]:
      chunk = decoder_inputs[:, start:stop]
      positions = jnp.broadcast_to(start + jnp.arange(stop - start), chunk.shape)
      logits, mutated = scanned.apply(
          {'params': stacked, 'cache': cache}, encoded if start == 0 else None, inputs, chunk,
          targets_positions=positions, targets_segmentation=jnp.ones_like(chunk), decode=True,
          method='decode', mutable=['cache'])
      cache = mutated['cache']
      steps.append(logits)
    return unrolled.apply({'params': params}, inputs, targets), full, jnp.concatenate(steps, 1)

  want, full, decoded = run(inputs, targets)
  np.testing.assert_allclose(full, want, atol=ATOL)
  np.testing.assert_allclose(decoded, full, atol=ATOL)


@pytest.mark.parametrize('attention, message', [
    (dict(kind='latent'), 'needs kv_lora_rank > 0'),
    (dict(kind='latent', kv_lora_rank=8, qk_rope_head_dim=3), 'even qk_rope_head_dim'),
    (dict(kv_lora_rank=8), r"\['kv_lora_rank'\] apply to kind='latent'"),
    (dict(kind='latent', kv_lora_rank=8, qk_rope_head_dim=4, num_kv_heads=2),
     r"\['num_kv_heads'\]"),
    (dict(kind='latent', kv_lora_rank=8, qk_rope_head_dim=4, value_residual=True),
     'value_residual'),
    (dict(kind='differential', talking_heads=True), 'talking_heads'),
    (dict(talking_heads=True, implementation='blockwise'), r"\['implementation'\]"),
    (dict(talking_heads=True, sinks=True), r"\['sinks'\]"),
    (dict(num_memory_kv=2, kind='linear'), r"\['kind'\]"),
    (dict(num_memory_kv=-1), 'num_memory_kv must be >= 0'),
])
def test_bad_variant_options_raise_naming_the_field(attention, message):
  with pytest.raises(ValueError, match=message):
    models.transformer_config('tiny', positional='rope', attention=attention)


def test_model_level_rules_of_the_variants():
  with pytest.raises(ValueError, match="kind='latent' rotates its decoupled RoPE part"):
    models.transformer_config('tiny', positional='sinusoidal', attention=dict(
        kind='latent', kv_lora_rank=8, qk_rope_head_dim=4))
  with pytest.raises(ValueError, match="kind='differential' splits each head in two"):
    models.transformer_config('tiny', d_model=36, attention=dict(kind='differential'))
  odd = MultiHeadAttention(AttentionConfig(num_heads=2, kind='differential'), is_causal=True)
  with pytest.raises(ValueError, match='head_dim 3 must be even'):
    odd.init(jax.random.key(0), jnp.zeros((1, 2, 6)))
  cross = AttentionConfig(kind='latent', kv_lora_rank=8, qk_rope_head_dim=4, num_memory_kv=0,
                          output_gate=True).for_cross()
  assert (cross.kind, cross.kv_lora_rank, cross.output_gate) == ('softmax', 0, True)
  # Every new field defaults to the old behaviour (saved runs rebuild unchanged).
  defaults = AttentionConfig()
  assert (defaults.kind, defaults.talking_heads, defaults.num_memory_kv, defaults.output_gate,
          defaults.value_residual) == ('softmax', False, 0, False, False)


def test_cache_elements_per_token_of_mla_mha_gqa_match_the_caches():
  x = jnp.zeros((1, 16, 64))
  configs = {'mha': AttentionConfig(num_heads=8), 'gqa': AttentionConfig(num_heads=8,
                                                                         num_kv_heads=2),
             'latent': AttentionConfig(num_heads=8, kind='latent', kv_lora_rank=32,
                                       qk_rope_head_dim=4)}
  for name, config in configs.items():
    attn = MultiHeadAttention(config, is_causal=True, positional='rope')
    cache = jax.eval_shape(lambda a=attn: a.init(jax.random.key(0), x, decode=True))['cache']
    kv = sum(np.prod(cache[k].shape) for k in ('cached_key', 'cached_value') if k in cache)
    assert kv / 16 == latent.cache_elements_per_token(config, 8), name
  assert latent.cache_elements_per_token(configs['latent'], 8) == 36  # against 128 (MHA)
