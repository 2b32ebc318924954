"""prefix_attention: attention to the first `length` slots of a buffer equals attention to the
truncated keys (NumPy float64 reference), whatever sits in the slots past `length`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import ops
from tests.ops import reference

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 inputs against the float64 reference
B, T, H, KH, D, SLOTS, CHUNK = 2, 3, 4, 2, 8, 24, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, H, D)).astype(np.float32)
  k = rng.normal(size=(B, SLOTS, KH, D)).astype(np.float32)
  v = rng.normal(size=(B, SLOTS, KH, D)).astype(np.float32)
  return q, k, v


@jax.jit
def _prefix_cases(q, k, v, length, keep, sinks):
  """Every option at one traced `length` (one compile for all cases and lengths)."""
  offset = length - T  # the queries are the last T filled slots, as when decoding
  mask_mod = lambda b, h, qi, ki: (qi - ki) % 3 != 1  # noqa: E731
  score_mod = lambda s, b, h, qi, ki: s + 0.1 * (qi - ki) * (h + 1)  # noqa: E731
  run = lambda **kw: ops.prefix_attention(q, k, v, length=length, chunk_size=CHUNK, **kw)  # noqa: E731
  return dict(
      plain=run(),
      causal=run(is_causal=True, q_offset=offset),
      mask=run(mask=keep),
      window=run(is_causal=True, q_offset=offset, local_window=(2, 0)),
      mods=run(is_causal=True, q_offset=offset, mask_mod=mask_mod, score_mod=score_mod),
      sinks=run(is_causal=True, q_offset=offset, sinks=sinks, scale=0.5),
  )


def _expected(q, k, v, length, keep, sinks):
  k, v = k[:, :length], v[:, :length]
  offset = length - T
  qi = np.arange(T)[:, None] + offset
  ki = np.arange(length)[None, :]
  causal = reference.causal(T, length, offset)
  mods_mask = causal & ((qi - ki) % 3 != 1)[None, None]
  mods_bias = (0.1 * (qi - ki))[None, None] * (np.arange(H) + 1)[None, :, None, None]
  # A sink is one more logit per head with no value: append it as a key of value zero.
  sink_k = np.zeros((B, 1, KH, D), np.float32)
  sink_bias = np.concatenate([np.zeros((1, H, T, length)),
                              np.broadcast_to(sinks[None, :, None, None], (1, H, T, 1))], -1)
  sink_mask = np.concatenate([np.broadcast_to(causal, (1, 1, T, length)),
                              np.ones((1, 1, T, 1), bool)], -1)
  # Sinks: logits q.k * 0.5 + 0 for real keys; the sink key's q.0 = 0 plus its bias.
  return dict(
      plain=reference.reference_attention(q, k, v),
      causal=reference.reference_attention(q, k, v, mask=causal),
      mask=reference.reference_attention(q, k, v, mask=keep[..., :length]),
      window=reference.reference_attention(
          q, k, v, mask=causal & reference.window(T, length, 2, 0, offset)),
      mods=reference.reference_attention(q, k, v, mask=mods_mask, bias=mods_bias),
      sinks=reference.reference_attention(
          q, np.concatenate([k, sink_k], 1), np.concatenate([v, sink_k], 1), scale=0.5,
          mask=sink_mask, bias=sink_bias),
  )


@pytest.mark.parametrize('length', [3, 8, 13, 24])  # inside one chunk, on a border, several
def test_prefix_attention_equals_attention_to_the_filled_slots(length):
  q, k, v = _inputs()
  rng = np.random.default_rng(1)
  keep = rng.random((B, 1, 1, SLOTS)) < 0.8
  sinks = np.array([0.5, -1.0, 0.0, 2.0], np.float32)
  # Garbage past `length` must not matter: the op never reads it.
  k[:, length:], v[:, length:] = 1e6, -1e6
  got = _prefix_cases(q, k, v, jnp.int32(length), keep, sinks)
  want = _expected(q, k, v, length, keep, sinks)
  for name, expected in want.items():
    np.testing.assert_allclose(np.asarray(got[name]), expected, **TOL, err_msg=name)


def test_prefix_attention_refuses_a_buffer_that_is_not_whole_chunks():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match='multiple of chunk_size'):
    ops.prefix_attention(q, k, v, length=4, chunk_size=5)
  with pytest.raises(ValueError, match='outside the buffer'):
    ops.prefix_attention(q, k, v, length=SLOTS + 1, chunk_size=CHUNK)
