import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from tests.ops import reference


def test_causal_mask_matches_tril_and_offset():
  np.testing.assert_array_equal(ops.causal_mask(4)[0, 0], np.tril(np.ones((4, 4), bool)))
  # Decoding 2 new tokens after 3 cached ones: query i sits at position 3 + i.
  np.testing.assert_array_equal(ops.causal_mask(2, 5, q_offset=3), reference.causal(2, 5, 3))
  # q_offset may be traced (the cache index).
  np.testing.assert_array_equal(ops.causal_mask(2, 5, q_offset=jnp.int32(3)),
                                reference.causal(2, 5, 3))


def test_local_mask_left_right_and_symmetric():
  np.testing.assert_array_equal(ops.local_mask(6, 6, (2, 1)), reference.window(6, 6, 2, 1))
  np.testing.assert_array_equal(ops.local_mask(6, 6, 2), reference.window(6, 6, 2, 2))
  with pytest.raises(ValueError, match='local window'):
    ops.local_mask(4, 4, (-1, 0))


def test_padding_mask_from_lengths_and_tokens():
  lengths = jnp.array([2, 4])
  m = ops.padding_mask(lengths, length=4)
  assert m.shape == (2, 1, 1, 4)
  np.testing.assert_array_equal(m[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1]])
  tokens = jnp.array([[5, 6, 0, 0], [7, 0, 0, 0]])
  np.testing.assert_array_equal(ops.padding_mask(tokens=tokens)[:, 0, 0], tokens != 0)
  with pytest.raises(ValueError, match='exactly one'):
    ops.padding_mask(lengths, tokens=tokens)
  with pytest.raises(ValueError, match='padded length'):
    ops.padding_mask(lengths)


def test_query_key_and_segment_masks():
  q_valid = jnp.array([[True, False]])
  kv_valid = jnp.array([[True, True, False]])
  np.testing.assert_array_equal(ops.query_key_mask(q_valid, kv_valid)[0, 0],
                                [[1, 1, 0], [0, 0, 0]])
  ids = jnp.array([[1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(ops.segment_mask(ids), reference.segments(ids, ids))
  with pytest.raises(ValueError, match='segment ids'):
    ops.segment_mask(jnp.zeros((2, 3), int), jnp.zeros((3, 3), int))


def test_combine_masks_and_bias():
  a, b = ops.causal_mask(3), ops.local_mask(3, 3, (1, 1))
  np.testing.assert_array_equal(ops.combine_masks(a, None, b), np.logical_and(a, b))
  assert ops.combine_masks(None, None) is None
  bias = ops.mask_to_bias(a)
  assert bias.dtype == jnp.float32 and np.all(np.isfinite(bias))
  assert np.all(bias[a] == 0) and np.all(bias[~np.asarray(a)] < -1e30)
  # Two biases added still do not overflow to -inf.
  assert np.all(np.isfinite(bias + bias))
  with pytest.raises(ValueError, match='4-D'):
    ops.combine_masks(jnp.ones((3, 3), bool))


def test_split_merge_repeat_heads():
  x = jnp.arange(2 * 3 * 12, dtype=jnp.float32).reshape(2, 3, 12)
  heads = ops.split_heads(x, 4)
  assert heads.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(ops.merge_heads(heads), x)
  with pytest.raises(ValueError, match='not divisible'):
    ops.split_heads(x, 5)
  kv = heads[:, :, :2]  # 2 kv heads
  rep = ops.repeat_kv(kv, 6)
  for h in range(6):  # query head h reads kv head h // 3
    np.testing.assert_array_equal(rep[:, :, h], kv[:, :, h // 3])
  with pytest.raises(ValueError, match='multiple'):
    ops.repeat_kv(kv, 5)
