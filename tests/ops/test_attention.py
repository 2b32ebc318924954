"""dot_product_attention (dense path and dispatcher) against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from attn_jax import ops
from tests.ops import reference

# Tolerances by input dtype: fp32 against a float64 reference; bf16 inputs carry
# 8 mantissa bits, so ~1e-2 relative error per element of q, k, v.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(b=2, t=5, s=7, n=4, kh=4, d=8, dv=None, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, dv or d)), dtype)
  return q, k, v


CASES = {
    'plain': dict(),
    'gqa': dict(kh=2),
    'mqa': dict(kh=1, dv=6),
    'causal_offset': dict(t=3, s=7, is_causal=True, q_offset=4),
    'window': dict(t=7, local_window=(2, 1)),
    'padding_bias_scale': dict(padding=True, bias=True, scale=0.3),
    'segments': dict(t=6, s=6, segments=True),
}


def _case(name):
  spec = dict(CASES[name])
  shape = {key: spec.pop(key) for key in ('t', 's', 'kh', 'dv') if key in spec}
  q, k, v = _qkv(**shape)
  b, t, n, _ = q.shape
  s = k.shape[1]
  kwargs, ref_mask, ref_bias = {}, np.ones((b, n, t, s), bool), None
  offset = spec.pop('q_offset', 0)
  if spec.pop('is_causal', False):
    kwargs.update(is_causal=True, q_offset=offset)
    ref_mask &= reference.causal(t, s, offset)
  if 'local_window' in spec:
    left, right = spec.pop('local_window')
    kwargs['local_window'] = (left, right)
    ref_mask &= reference.window(t, s, left, right)
  if spec.pop('padding', False):
    kwargs['mask'] = ops.padding_mask(jnp.array([s, 3]), length=s)
    ref_mask &= np.asarray(kwargs['mask'])
  if spec.pop('bias', False):
    ref_bias = np.random.default_rng(3).normal(size=(1, n, t, s)).astype(np.float32)
    kwargs['bias'] = jnp.asarray(ref_bias)
  if spec.pop('segments', False):
    ids = jnp.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    kwargs['segment_ids'] = ids
    ref_mask &= reference.segments(ids, ids)
  if 'scale' in spec:
    kwargs['scale'] = spec.pop('scale')
  assert not spec, spec
  return (q, k, v), kwargs, dict(mask=ref_mask, bias=ref_bias, scale=kwargs.get('scale'))


@pytest.mark.parametrize('name', sorted(CASES))
def test_dense_matches_reference(name):
  (q, k, v), kwargs, ref_kwargs = _case(name)
  out, weights = ops.dot_product_attention(q, k, v, implementation='dense', return_weights=True,
                                           **kwargs)
  want, want_w = reference.reference_attention(q, k, v, return_weights=True, **ref_kwargs)
  assert out.shape == want.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, want, **TOL[jnp.float32])
  np.testing.assert_allclose(weights, want_w, **TOL[jnp.float32])


@pytest.mark.parametrize('kwargs', [dict(), dict(is_causal=True), dict(local_window_size=(2, 1)),
                                    dict(bias=True)], ids=['plain', 'causal', 'window', 'bias'])
@pytest.mark.parametrize('kh', [4, 2])
def test_matches_jax_nn(kwargs, kh):
  q, k, v = _qkv(t=6, s=6, kh=kh)
  kwargs = dict(kwargs)
  ours = dict(kwargs)
  if 'local_window_size' in kwargs:
    ours['local_window'] = ours.pop('local_window_size')
  if kwargs.get('bias'):
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 6, 6)), jnp.float32)
    kwargs['bias'] = ours['bias'] = bias
  want = jax.nn.dot_product_attention(q, k, v, implementation='xla', **kwargs)
  got = ops.dot_product_attention(q, k, v, implementation='dense', **ours)
  np.testing.assert_allclose(got, want, **TOL[jnp.float32])


def test_matches_flax_linen():
  q, k, v = _qkv(t=6, s=6)
  mask = nn.make_causal_mask(jnp.ones((2, 6))).astype(bool)  # flax masks are float 0/1
  want = nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(ops.dot_product_attention(q, k, v, is_causal=True), want,
                             **TOL[jnp.float32])
  np.testing.assert_allclose(ops.dot_product_attention(q, k, v, mask=mask), want,
                             **TOL[jnp.float32])


@pytest.mark.parametrize('implementation', ['dense', 'blockwise'])
def test_gradients_numerically(implementation):
  (q, k, v), kwargs, _ = _case('padding_bias_scale')
  del kwargs['bias']

  def f(q, k, v):
    return ops.dot_product_attention(q, k, v, implementation=implementation, block_size=4,
                                     is_causal=True, **kwargs)
  check_grads(f, (q, k, v), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('implementation', ['dense', 'blockwise'])
def test_fully_masked_rows_are_zero_with_finite_grads(implementation):
  q, k, v = _qkv(t=4, s=4)
  mask = jnp.array([True, False, True, True])[None, None, :, None] & jnp.ones((1, 1, 4, 4), bool)

  def f(q, k, v):
    return ops.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                     block_size=2)
  out = f(q, k, v)
  np.testing.assert_array_equal(out[:, 1], 0.0)
  assert np.all(np.isfinite(out))
  grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][:, 1], 0.0)


@pytest.mark.parametrize('implementation', ['dense', 'blockwise'])
def test_huge_logits_stay_finite(implementation):
  q, k, v = _qkv(t=4, s=4)
  q = q * 1e2
  k = k * 1e2  # logits ~ 1e4 * sqrt(d)
  out = ops.dot_product_attention(q, k, v, implementation=implementation, is_causal=True,
                                  block_size=2)
  want = reference.reference_attention(q, k, v, mask=reference.causal(4, 4))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want, atol=1e-4)
  grads = jax.grad(lambda q: ops.dot_product_attention(
      q, k, v, implementation=implementation, block_size=2).sum())(q)
  assert np.all(np.isfinite(grads))


@pytest.mark.parametrize('implementation', ['dense', 'blockwise'])
def test_bf16_inputs(implementation):
  q, k, v = _qkv(t=8, s=8, kh=2, dtype=jnp.bfloat16)
  out = ops.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                  block_size=4)
  assert out.dtype == jnp.bfloat16
  want = reference.reference_attention(q, k, v, mask=reference.causal(8, 8))
  np.testing.assert_allclose(out.astype(np.float32), want, **TOL[jnp.bfloat16])

  def loss(q, k, v):
    out = ops.dot_product_attention(q, k, v, is_causal=True, implementation=implementation,
                                    block_size=4)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  grads16 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  grads32 = jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g16, g32 in zip(grads16, grads32, strict=True):
    assert g16.dtype == jnp.bfloat16
    # Relative to the gradient's scale: bf16 rounding of inputs, outputs and cotangents.
    np.testing.assert_allclose(g16.astype(np.float32) / np.abs(g32).max(),
                               g32 / np.abs(g32).max(), atol=2e-2)


def test_dropout_on_weights():
  q, k, v = _qkv()
  rng = jax.random.key(0)
  out, w = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng,
                                     return_weights=True)
  _, clean = ops.dot_product_attention(q, k, v, return_weights=True)
  kept = np.asarray(w) != 0
  assert 0.3 < kept.mean() < 0.7
  np.testing.assert_allclose(np.asarray(w)[kept], 2 * np.asarray(clean)[kept], rtol=1e-5)
  np.testing.assert_allclose(out, jnp.einsum('bhqk,bkhd->bqhd', w, v), atol=1e-5)
  again = ops.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng)
  np.testing.assert_array_equal(out, again)  # same rng, same mask
  with pytest.raises(ValueError, match='dropout_rng'):
    ops.dot_product_attention(q, k, v, dropout_rate=0.1)


def test_bad_inputs_name_the_shapes():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r'4-D .*q \(2, 5, 4\)'):
    ops.dot_product_attention(q[..., 0], k, v)
  with pytest.raises(ValueError, match=r'head_dim of q \(8\) and k \(6\)'):
    ops.dot_product_attention(q, k[..., :6], v)
  q3, k3, v3 = _qkv(n=4, kh=3)
  with pytest.raises(ValueError, match=r'q heads \(4\) must be a multiple of k/v heads \(3\)'):
    ops.dot_product_attention(q3, k3, v3)
  with pytest.raises(ValueError, match=r'mask of shape \(2, 1, 5, 3\) does not broadcast'):
    ops.dot_product_attention(q, k, v, mask=jnp.ones((2, 1, 5, 3), bool))
  with pytest.raises(ValueError, match='boolean'):
    ops.dot_product_attention(q, k, v, mask=jnp.ones((2, 1, 5, 7)))
  with pytest.raises(ValueError, match='implementation'):
    ops.dot_product_attention(q, k, v, implementation='flash')
  with pytest.raises(ValueError, match='return_weights'):
    ops.dot_product_attention(q, k, v, implementation='blockwise', return_weights=True)
  with pytest.raises(ValueError, match='segment ids'):
    ops.dot_product_attention(q, k, v, segment_ids=jnp.zeros((2, 5), int))


def test_implementation_choice():
  small = jnp.zeros((1, 64, 2, 8))
  big = jax.ShapeDtypeStruct((1, 4096, 2, 8), jnp.float32)
  kw = dict(return_weights=False, dropout_rate=0.0, bias_fn=None, q_offset=0)
  assert ops.choose_implementation(small, small, **kw) == 'dense'
  assert ops.choose_implementation(big, big, **kw) == 'blockwise'
  assert ops.choose_implementation(big, big, **{**kw, 'return_weights': True}) == 'dense'
  # The CPU threshold is q_len * kv_len: a 256-token query block over 256 keys switches.
  at, below = (jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32) for n in (256, 255))
  assert jax.default_backend() == 'cpu'
  assert ops.choose_implementation(at, at, **kw) == 'blockwise'
  assert ops.choose_implementation(below, at, **kw) == 'dense'


@settings(max_examples=15, deadline=None, derandomize=True)
@given(t=st.integers(1, 9), s=st.integers(1, 9), kh=st.sampled_from([1, 2, 3]),
       groups=st.sampled_from([1, 2]), causal=st.booleans(), offset=st.integers(0, 4),
       mask_p=st.sampled_from([0.0, 0.3, 0.9]), bias=st.booleans(), seed=st.integers(0, 999))
def test_property_dense_matches_reference(t, s, kh, groups, causal, offset, mask_p, bias, seed):
  q, k, v = _qkv(b=2, t=t, s=s, n=kh * groups, kh=kh, d=4, seed=seed)
  rng = np.random.default_rng(seed)
  mask = rng.random((2, 1, t, s)) >= mask_p
  bias_arr = rng.normal(size=(1, kh * groups, t, s)).astype(np.float32) if bias else None
  out = ops.dot_product_attention(q, k, v, mask=jnp.asarray(mask), is_causal=causal,
                                  q_offset=offset, implementation='dense',
                                  bias=None if bias_arr is None else jnp.asarray(bias_arr))
  ref_mask = mask & reference.causal(t, s, offset) if causal else mask
  want = reference.reference_attention(q, k, v, mask=ref_mask, bias=bias_arr)
  np.testing.assert_allclose(out, want, **TOL[jnp.float32])
