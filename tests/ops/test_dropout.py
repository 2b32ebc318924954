"""ops.dropout: the keep rate, independence, unbiasedness, determinism, gradients, sharding,
and the Flax module on top."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from attn_jax import ops
from attn_jax.models import layers

N = 1 << 20  # mask elements: the keep fraction's standard error is about 3e-4


def _sigmas(observed: float, p: float, n: int) -> float:
  return abs(observed - p) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize('rate', [0.1, 0.3, 0.5])
def test_keep_fraction_pairs_and_the_mean_match_the_stated_probability(rate):
  p = ops.keep_probability(rate)
  assert p == 1.0 - round(rate * 65536) / 65536 and abs(p - (1 - rate)) < 8e-6
  mask = np.asarray(ops.dropout_mask(jax.random.key(1), (256, N // 256), rate))
  assert _sigmas(mask.mean(), p, mask.size) < 5
  # The four elements decided by one threefry block, and neighbouring blocks, are
  # independent: both kept with probability p**2.
  for offset in (1, 2, 3, 4):
    both = (mask[:, :-offset] & mask[:, offset:]).mean()
    assert _sigmas(both, p * p, mask[:, offset:].size) < 5, offset
  out = np.asarray(ops.dropout(jnp.ones((256, N // 256)), rate, jax.random.key(1)))
  np.testing.assert_allclose(out[mask], 1.0 / p, rtol=1e-6)
  assert np.all(out[~mask] == 0.0)
  assert abs(out.mean() - 1.0) < 5 * np.sqrt((1 - p) / p / out.size)


def test_the_mask_is_a_function_of_key_and_shape_only():
  key = jax.random.key(7)
  a = ops.dropout_mask(key, (5, 7), 0.5)
  np.testing.assert_array_equal(a, ops.dropout_mask(key, (5, 7), 0.5))
  np.testing.assert_array_equal(a, jax.jit(ops.dropout_mask, static_argnums=(1, 2))(
      key, (5, 7), 0.5))
  # A raw threefry key (jax.random.PRNGKey) gives the mask of its typed twin.
  np.testing.assert_array_equal(a, ops.dropout_mask(jax.random.key_data(key), (5, 7), 0.5))
  assert not np.array_equal(a, ops.dropout_mask(jax.random.key(8), (5, 7), 0.5))
  for shape in [(), (3,), (2, 3, 5), (4, 1)]:  # last dims not a multiple of four
    assert ops.dropout_mask(key, shape, 0.5).shape == shape
  odd = np.asarray(ops.dropout_mask(key, (4096, 3), 0.5))
  assert _sigmas(odd.mean(), 0.5, odd.size) < 5


def test_another_prng_falls_back_to_bernoulli():
  key = jax.random.key(0, impl='rbg')
  mask = np.asarray(ops.dropout_mask(key, (512, 512), 0.25))
  np.testing.assert_array_equal(mask, jax.random.bernoulli(key, ops.keep_probability(0.25),
                                                           (512, 512)))


def test_gradient_is_the_mask_over_the_keep_probability():
  key, rate = jax.random.key(3), 0.2
  x = jax.random.normal(jax.random.key(4), (6, 10))
  grad = jax.grad(lambda x: jnp.sum(ops.dropout(x, rate, key) * jnp.arange(10.0)))(x)
  mask = np.asarray(ops.dropout_mask(key, x.shape, rate))
  np.testing.assert_allclose(grad, mask * np.arange(10.0) / ops.keep_probability(rate),
                             rtol=1e-6)


def test_identity_cases_dtype_and_bad_input():
  x = jnp.ones((4, 4), jnp.bfloat16)
  assert ops.dropout(x, 0.0) is x and ops.dropout(x, 0.5, deterministic=True) is x
  assert ops.dropout(x, 0.5, jax.random.key(0)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r'dropout rate must be in \[0, 1\), got 1.0'):
    ops.dropout(x, 1.0, jax.random.key(0))
  with pytest.raises(ValueError, match='needs rng'):
    ops.dropout(x, 0.5)


def test_sharded_mask_equals_the_unsharded_one():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  x = jax.device_put(jnp.ones((16, 6, 12)), sharding)
  key = jax.random.key(5)
  sharded = jax.jit(lambda x: ops.dropout(x, 0.3, key), out_shardings=sharding)(x)
  np.testing.assert_array_equal(sharded, ops.dropout(np.ones((16, 6, 12), np.float32), 0.3,
                                                     key))


def test_flax_module_draws_from_the_dropout_stream_per_instance():
  class TwoDropouts(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return (layers.Dropout(0.5)(x, deterministic=not train),
              layers.Dropout(0.5)(x, deterministic=not train))

  x = jnp.ones((64, 64))
  model = TwoDropouts()
  a, b = model.apply({}, x, True, rngs={'dropout': jax.random.key(0)})
  assert not np.array_equal(a, b)  # each instance folds its own path into the key
  again, _ = model.apply({}, x, True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_array_equal(a, again)
  assert set(np.unique(np.asarray(a))) == {0.0, np.float32(1 / ops.keep_probability(0.5))}
  same, _ = model.apply({}, x, False)  # no rng needed when not training
  np.testing.assert_array_equal(same, x)
