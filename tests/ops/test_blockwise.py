"""The blockwise path equals the dense path (fp32, 1e-5) in values and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from attn_jax import ops

FP32 = dict(atol=1e-5, rtol=1e-5)


def _qkv(b, t, s, n, kh, d, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, kh, d)), jnp.float32))


def _relative(num_heads):
  table = jnp.asarray(np.random.default_rng(7).normal(size=(16, num_heads)), jnp.float32)
  return functools.partial(ops.relative_position_bias, bidirectional=True, max_distance=32), table


# (t, s, heads, kv_heads, block, kwargs): lengths not divisible by the blocks throughout.
CASES = {
    'odd_lengths': (19, 23, 2, 2, (8, 8), dict()),
    'causal': (21, 21, 2, 2, (4, 8), dict(is_causal=True)),
    'causal_q_ne_kv_offset': (5, 21, 2, 1, (4, 4), dict(is_causal=True, q_offset=13)),
    'window': (21, 21, 4, 2, (4, 4), dict(local_window=(5, 2))),
    'causal_window_gqa': (21, 21, 4, 1, (8, 4), dict(is_causal=True, local_window=(6, 0))),
    'segments': (17, 17, 2, 2, (8, 4), dict(segments=True)),
    'dense_mask_and_bias': (13, 11, 2, 2, (4, 4), dict(mask=True, bias=True)),
    'alibi_causal': (19, 19, 4, 2, (8, 8), dict(is_causal=True, alibi=True)),
    'relative_bidirectional': (15, 15, 2, 2, (4, 8), dict(relative=True)),
}


def _build(name):
  t, s, n, kh, block, spec = CASES[name]
  q, k, v = _qkv(2, t, s, n, kh, 8)
  kwargs, params = dict(spec), {}
  rng = np.random.default_rng(1)
  if kwargs.pop('segments', False):
    ids = jnp.asarray(np.sort(rng.integers(1, 4, size=(2, t)), axis=1))
    kwargs['segment_ids'] = ids
  if kwargs.pop('mask', False):
    kwargs['mask'] = jnp.asarray(rng.random((2, 1, t, s)) > 0.3)
  if kwargs.pop('bias', False):
    params['bias'] = jnp.asarray(rng.normal(size=(1, n, t, s)), jnp.float32)
  if kwargs.pop('alibi', False):
    kwargs['bias_fn'] = ops.alibi_bias
    params['bias_params'] = ops.alibi_slopes(n)
  if kwargs.pop('relative', False):
    kwargs['bias_fn'], params['bias_params'] = _relative(n)
  return (q, k, v), params, kwargs, block


@pytest.mark.parametrize('name', sorted(CASES))
def test_blockwise_equals_dense(name):
  (q, k, v), params, kwargs, block = _build(name)

  def loss(impl, q, k, v, params):
    out = ops.dot_product_attention(q, k, v, implementation=impl, block_size=block, **params,
                                    **kwargs)
    return jnp.sum(out * jnp.cos(out)), out  # a non-linear loss: cotangents vary per element

  def value_and_grad(impl):
    return jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3),
                                      has_aux=True))(q, k, v, params)
  (_, dense), dense_grads = value_and_grad('dense')
  (_, block_out), block_grads = value_and_grad('blockwise')
  np.testing.assert_allclose(block_out, dense, **FP32)
  for got, want in zip(jax.tree.leaves(block_grads), jax.tree.leaves(dense_grads), strict=True):
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(got / scale, want / scale, **FP32)


def test_blockwise_gradients_numerically_with_bias_params():
  (q, k, v), params, kwargs, block = _build('relative_bidirectional')

  @jax.jit
  def f(q, k, table):
    return ops.blockwise_attention(q, k, v, block_size=block, bias_params=table, **kwargs)
  check_grads(f, (q, k, params['bias_params']), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_traced_offset_under_jit():
  q, k, v = _qkv(1, 1, 12, 2, 2, 8)

  @jax.jit
  def step(index):
    return ops.blockwise_attention(q, k, v, is_causal=True, q_offset=index, block_size=4)
  for index in (0, 5, 11):
    want = ops.dot_product_attention(q, k[:, :index + 1], v[:, :index + 1],
                                     implementation='dense')
    np.testing.assert_allclose(step(index), want, **FP32)


def test_dropout_is_deterministic_unbiased_and_differentiable():
  q, k, v = _qkv(1, 9, 9, 2, 2, 4)
  rng = jax.random.key(3)
  drop = jax.jit(functools.partial(ops.blockwise_attention, dropout_rate=0.3, block_size=4,
                                   is_causal=True))
  out = drop(q, k, v, dropout_rng=rng)
  np.testing.assert_array_equal(out, drop(q, k, v, dropout_rng=rng))
  assert not np.allclose(out, drop(q, k, v, dropout_rng=jax.random.key(4)))
  # The custom VJP regenerates the forward's mask: gradients match finite differences.
  check_grads(lambda q, k, v: drop(q, k, v, dropout_rng=rng), (q, k, v), order=1,
              modes=['rev'], atol=1e-2, rtol=1e-2)
  mean = jnp.mean(jax.vmap(lambda r: drop(q, k, v, dropout_rng=r))(
      jax.random.split(jax.random.key(0), 256)), axis=0)
  clean = ops.blockwise_attention(q, k, v, block_size=4, is_causal=True)
  np.testing.assert_allclose(mean, clean, atol=0.2)


def test_memory_is_linear_in_length():
  """Compiled temp memory of forward+backward stays far below one [q_len, kv_len] array."""
  length, heads = 2048, 2
  q = k = v = jax.ShapeDtypeStruct((1, length, heads, 16), jnp.float32)

  def temp_bytes(impl):
    grad = jax.jit(jax.grad(lambda q, k, v: ops.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl, block_size=128).sum(), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  scores_bytes = heads * length * length * 4
  assert temp_bytes('dense') >= scores_bytes  # the check can see a materialized score tensor
  assert temp_bytes('blockwise') < scores_bytes / 8


@settings(max_examples=12, deadline=None, derandomize=True)
@given(t=st.integers(1, 20), s=st.integers(1, 20), kh=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2]), bq=st.sampled_from([1, 3, 8]),
       bk=st.sampled_from([2, 5, 16]), causal=st.booleans(),
       window=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 6))),
       offset=st.integers(0, 5), mask_p=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 99))
def test_property_blockwise_equals_dense(t, s, kh, groups, bq, bk, causal, window, offset,
                                         mask_p, seed):
  q, k, v = _qkv(1, t, s, kh * groups, kh, 4, seed=seed)
  mask = None
  if mask_p:
    mask = jnp.asarray(np.random.default_rng(seed).random((1, 1, t, s)) > mask_p)
  kwargs = dict(is_causal=causal, local_window=window, q_offset=offset, mask=mask)
  dense = jax.jit(functools.partial(ops.dot_product_attention, implementation='dense',
                                    **kwargs))(q, k, v)
  block = jax.jit(functools.partial(ops.dot_product_attention, implementation='blockwise',
                                    block_size=(bq, bk), **kwargs))(q, k, v)
  np.testing.assert_allclose(block, dense, **FP32)
  assert np.all(np.isfinite(block))


def test_saved_stats_give_each_key_parts_share_of_the_gradients():
  # Ring attention's backward: with the whole attention's (out, lse) saved, the VJP of a call
  # over a subset of the keys is that subset's share; the shares of a partition add up to the
  # whole attention's gradients (q, k, v and a T5 table), lse cotangent included.
  q, k, v = _qkv(2, 13, 20, 4, 2, 8)
  table = jnp.asarray(np.random.default_rng(2).normal(size=(16, 4)), jnp.float32)
  doc = jnp.asarray(np.repeat([[0, 1, 2, 3]], 5, axis=1).repeat(2, axis=0))  # [2, 20]
  split = 9

  def part(q, k, v, table, lo, hi, saved):
    # Queries are positions 3..15 of the 20 keys; this call sees keys lo..hi-1 from 0, so
    # its queries sit at q_offset 3 - lo and the document ids are read `lo` further on.
    score = ops.score_mods.t5_bias(table, max_distance=32)
    mask = lambda b, h, q_idx, kv_idx: doc[b, q_idx + lo] == doc[b, kv_idx + lo]  # noqa: E731
    return ops.blockwise_attention(q, k[:, lo:hi], v[:, lo:hi], mask_mod=mask,
                                   score_mod=score, q_offset=3 - lo, return_lse=True,
                                   block_size=(4, 4), saved=saved)

  def loss(out, lse):
    return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.cos(lse), 0.0))

  @jax.jit
  def whole_and_shares(q, k, v, table):
    (out, lse), vjp = jax.vjp(functools.partial(part, lo=0, hi=20, saved=None), q, k, v, table)
    d_out, d_lse = jax.grad(loss, argnums=(0, 1))(out, lse)
    shares = []
    for lo, hi in ((0, split), (split, 20)):
      saved_out, saved_vjp = jax.vjp(functools.partial(part, lo=lo, hi=hi, saved=(out, lse)),
                                     q, k, v, table)
      shares.append((saved_out, saved_vjp((d_out, d_lse))))
    return out, vjp((d_out, d_lse)), shares

  out, want, shares = whole_and_shares(q, k, v, table)
  for saved_out, _ in shares:
    np.testing.assert_array_equal(saved_out[0], out)  # the forward only hands them back
  for i, name in enumerate(('q', 'k', 'v', 'table')):
    got = shares[0][1][i] + shares[1][1][i]
    np.testing.assert_allclose(got, want[i], atol=1e-5, rtol=1e-5, err_msg=name)
