"""Losses and metrics as (sum, count) pairs, so they aggregate exactly across devices/batches.

A metric is a pair `(sum, count)` of float32 scalars; a metrics dict maps names to pairs.
Summing pairs over devices (`lax.psum`) or steps and dividing at the end gives the exact mean
over all tokens/examples, whatever the per-device padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax.tokens import PAD_ID

Metric = tuple[Any, Any]
# exp() overflows float32 above ~88; perplexities beyond exp(30) carry no information anyway.
MAX_LOG_PPL = 30.0
# The metrics `softmax_loss_and_metrics` and `summarize` produce, and which direction is better
# (declared, never guessed from a name: see `attn_jax.train.metrics.metric_direction`).
METRIC_DIRECTIONS = {'loss': 'min', 'accuracy': 'max', 'perplexity': 'min'}


def token_weights(targets: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
  """float32 weights `targets != pad_id`, same shape as `targets` (e.g. `[b, len]`)."""
  return (targets != pad_id).astype(jnp.float32)


def _check(logits: jax.Array, targets: jax.Array, weights: jax.Array | None) -> jax.Array:
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
        f'logits shape {logits.shape} must be targets shape {targets.shape} + [num_classes]')
  if weights is None:
    return jnp.ones(targets.shape, jnp.float32)
  if weights.shape != targets.shape:
    raise ValueError(f'weights shape {weights.shape} must equal targets shape {targets.shape}')
  return weights.astype(jnp.float32)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Weighted softmax cross-entropy, summed.

  With label smoothing `s` the target distribution puts `1 - s` on the label and
  `s / (V - 1)` on every other class; the entropy of that distribution is subtracted, so a
  perfect prediction of the smoothed targets has loss 0 (as in the flax WMT example).

  Args:
    logits: `[..., V]` any float dtype; computed in float32.
    targets: `[...]` int class ids in `[0, V)`.
    weights: `[...]` float weights, e.g. `token_weights(targets)`; None = all ones.
    label_smoothing: in `[0, 1)`.

  Returns:
    `(loss_sum, weight_sum)` float32 scalars.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing={label_smoothing} must be in [0, 1)')
  weights = _check(logits, targets, weights)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_token = token_cross_entropy(log_probs, targets, label_smoothing)
  return jnp.sum(per_token * weights), jnp.sum(weights)


def token_cross_entropy(log_probs: jax.Array, targets: jax.Array,
                        label_smoothing: float = 0.0) -> jax.Array:
  """float32 `[...]`: each token's (smoothed, as `cross_entropy`) cross-entropy, from float32
  `log_probs` `[..., V]` and int `targets` `[...]`."""
  vocab = log_probs.shape[-1]
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing <= 0.0 or vocab <= 1:
    return nll
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  # -sum_c q_c log p_c with q = low everywhere except `confidence` at the label.
  loss = confidence * nll - low * (jnp.sum(log_probs, axis=-1) + nll)
  entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low))
  return loss - entropy


def accuracy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Weighted top-1 accuracy: `(num_correct, weight_sum)` float32 scalars.

  Args:
    logits: `[..., V]`; targets: `[...]` int; weights: `[...]` or None (all ones).
  """
  weights = _check(logits, targets, weights)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)


def sequence_accuracy(
    predictions: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Exact-sequence accuracy: a sequence counts as correct iff every weighted token is.

  Args:
    predictions: `[b, len]` int token ids, or `[b, len, V]` logits (argmax is taken).
    targets: `[b, len]` int.
    weights: `[b, len]`, e.g. `token_weights(targets)`; None = all ones. Sequences whose
      weights are all zero (pure padding rows) are not counted.

  Returns:
    `(num_exact_sequences, num_sequences)` float32 scalars.
  """
  if predictions.ndim == targets.ndim + 1:
    predictions = jnp.argmax(predictions, axis=-1)
  if predictions.shape != targets.shape or targets.ndim < 2:
    raise ValueError(
        f'predictions shape {predictions.shape} must equal targets shape {targets.shape} '
        '(with a length axis)')
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
  if weights.shape != targets.shape:
    raise ValueError(f'weights shape {weights.shape} must equal targets shape {targets.shape}')
  axes = tuple(range(1, targets.ndim))
  wrong = jnp.sum((predictions != targets) * (weights > 0), axis=axes)
  present = (jnp.sum(weights, axis=axes) > 0).astype(jnp.float32)
  exact = (wrong == 0).astype(jnp.float32) * present
  return jnp.sum(exact), jnp.sum(present)


def softmax_loss_and_metrics(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, Metric]]:
  """The usual `loss_fn` body for token or class prediction.

  Args:
    logits: `[..., V]`; targets: `[...]` int; weights: `[...]` (e.g. `token_weights`) or None.
    label_smoothing: applied to the objective only; the reported 'loss' is the plain
      cross-entropy, so it stays comparable across smoothing settings (and its exp is the
      perplexity).

  Returns:
    `(objective_sum, {'loss': (ce_sum, weight_sum), 'accuracy': (correct, weight_sum)})`.
  """
  loss = cross_entropy(logits, targets, weights)
  if label_smoothing > 0.0:
    objective, _ = cross_entropy(logits, targets, weights, label_smoothing=label_smoothing)
  else:
    objective = loss[0]
  return objective, {'loss': loss, 'accuracy': accuracy(logits, targets, weights)}


def perplexity(loss_sum: Any, weight_sum: Any) -> Any:
  """`exp(loss_sum / weight_sum)` with the exponent clipped at `MAX_LOG_PPL`."""
  mean = loss_sum / jnp.maximum(weight_sum, 1e-8)
  return jnp.exp(jnp.minimum(mean, MAX_LOG_PPL))


def add_metrics(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> dict[str, Metric]:
  """Sums two metrics dicts pairwise; a name present in only one is kept as is."""
  out = dict(a)
  for name, (s, c) in b.items():
    if name in out:
      out[name] = (out[name][0] + s, out[name][1] + c)
    else:
      out[name] = (s, c)
  return out


def summarize(metrics: Mapping[str, Metric]) -> dict[str, float]:
  """Turns `{name: (sum, count)}` into `{name: sum / count}` Python floats (host side).

  A 'loss' entry also yields 'perplexity'. Names with a zero count are dropped.
  """
  metrics = jax.device_get(metrics)
  out = {}
  for name, (s, c) in metrics.items():
    s, c = float(np.sum(s)), float(np.sum(c))
    if c > 0:
      out[name] = s / c
  if 'loss' in metrics and 'loss' in out:
    s, c = (float(np.sum(x)) for x in metrics['loss'])
    out['perplexity'] = float(np.exp(min(s / c, MAX_LOG_PPL)))
  return out
