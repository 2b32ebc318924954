"""Losses against naive numpy formulas; tolerances are for float32 (rtol 1e-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.train import losses

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 5, 7)).astype(np.float32)
TARGETS = RNG.integers(0, 7, size=(3, 5)).astype(np.int32)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _naive_ce(logits, targets, weights, smoothing):
  v = logits.shape[-1]
  q = np.full(logits.shape, smoothing / (v - 1))
  np.put_along_axis(q, targets[..., None], 1 - smoothing, axis=-1)
  lp = _log_softmax(logits.astype(np.float64))
  ent = -np.sum(np.where(q > 0, q * np.log(np.maximum(q, 1e-30)), 0), -1)
  per = -np.sum(q * lp, -1) - ent
  return float((per * weights).sum()), float(weights.sum())


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_matches_naive(smoothing):
  w = losses.token_weights(jnp.asarray(TARGETS))
  got = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), w,
                             label_smoothing=smoothing)
  want = _naive_ce(LOGITS, TARGETS, np.asarray(w), smoothing)
  np.testing.assert_allclose([float(got[0]), float(got[1])], want, rtol=1e-5)


def test_cross_entropy_gradient_is_softmax_minus_smoothed_target():
  s = 0.2
  w = jnp.asarray(RNG.uniform(size=TARGETS.shape).astype(np.float32))
  grad = jax.grad(lambda lg: losses.cross_entropy(lg, jnp.asarray(TARGETS), w,
                                                  label_smoothing=s)[0])(jnp.asarray(LOGITS))
  q = np.full(LOGITS.shape, s / 6)
  np.put_along_axis(q, TARGETS[..., None], 1 - s, axis=-1)
  want = (np.exp(_log_softmax(LOGITS)) - q) * np.asarray(w)[..., None]
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_bf16_logits_computed_in_float32():
  got, _ = losses.cross_entropy(jnp.asarray(LOGITS, jnp.bfloat16), jnp.asarray(TARGETS))
  want, _ = _naive_ce(np.asarray(jnp.asarray(LOGITS, jnp.bfloat16), np.float32), TARGETS,
                      np.ones(TARGETS.shape), 0.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_smoothed_loss_is_zero_at_smoothed_target():
  s, v = 0.1, 7
  q = np.full((1, v), s / (v - 1))
  q[0, 2] = 1 - s
  got, _ = losses.cross_entropy(jnp.log(jnp.asarray(q)), jnp.array([2]), label_smoothing=s)
  assert abs(float(got)) < 1e-5


def test_accuracy_and_sequence_accuracy():
  targets = np.array([[5, 6, 0], [5, 6, 7], [0, 0, 0], [4, 4, 0]], np.int32)
  preds = np.array([[5, 6, 9], [5, 1, 7], [1, 1, 1], [4, 4, 0]], np.int32)
  logits = jax.nn.one_hot(preds, 10)
  w = losses.token_weights(jnp.asarray(targets))
  c, n = losses.accuracy(logits, jnp.asarray(targets), w)
  assert (float(c), float(n)) == (6.0, 7.0)  # The padding mismatch (9 vs 0) is not counted.
  c, n = losses.sequence_accuracy(jnp.asarray(preds), jnp.asarray(targets), w)
  assert (float(c), float(n)) == (2.0, 3.0)  # All-padding row 2 excluded.
  c2, n2 = losses.sequence_accuracy(logits, jnp.asarray(targets), w)
  assert (float(c2), float(n2)) == (2.0, 3.0)


def test_perplexity_and_summarize():
  assert float(losses.perplexity(jnp.float32(2 * np.log(3.0)), 2.0)) == pytest.approx(3.0)
  assert np.isfinite(float(losses.perplexity(1e6, 1.0)))
  m = losses.add_metrics({'loss': (2.0, 4.0), 'accuracy': (1.0, 4.0)},
                         {'loss': (6.0, 4.0), 'empty': (0.0, 0.0)})
  s = losses.summarize(m)
  assert s == pytest.approx({'loss': 1.0, 'accuracy': 0.25, 'perplexity': np.e})


@pytest.mark.parametrize('fn', [losses.cross_entropy, losses.accuracy])
def test_shape_errors(fn):
  with pytest.raises(ValueError, match=r'logits shape \(3, 5, 7\) must be targets shape'):
    fn(jnp.asarray(LOGITS), jnp.zeros((3, 4), jnp.int32))
  with pytest.raises(ValueError, match=r'weights shape \(3,\) must equal targets shape'):
    fn(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.ones(3))


def test_bad_label_smoothing():
  with pytest.raises(ValueError, match='label_smoothing=1.0'):
    losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), label_smoothing=1.0)


def test_softmax_loss_and_metrics_reports_plain_loss_and_smoothed_objective():
  w = losses.token_weights(jnp.asarray(TARGETS))
  obj, m = losses.softmax_loss_and_metrics(jnp.asarray(LOGITS), jnp.asarray(TARGETS), w,
                                           label_smoothing=0.1)
  np.testing.assert_allclose(float(obj), _naive_ce(LOGITS, TARGETS, np.asarray(w), 0.1)[0],
                             rtol=1e-5)
  np.testing.assert_allclose([float(x) for x in m['loss']],
                             _naive_ce(LOGITS, TARGETS, np.asarray(w), 0.0), rtol=1e-5)
  assert set(m) == {'loss', 'accuracy'} and float(m['accuracy'][1]) == float(w.sum())

