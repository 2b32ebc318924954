"""The token losses the text tasks share: softmax cross-entropy over a vocabulary, computing
logits only for real tokens when the model hands back its final hidden states.

    objective, metrics, predictions = token_loss(task, params, batch, rng, train, targets,
                                                 weights)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.train import losses


def softmax_loss_from_hidden(
    project: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    label_smoothing: float = 0.0,
    chunk: int = 512,
) -> tuple[jax.Array, dict[str, losses.Metric], jax.Array]:
  """`losses.softmax_loss_and_metrics(project(hidden), ...)` that computes no logits for
  padding.

  The tokens with non-zero weight are sorted first and projected `chunk` at a time; a chunk
  with no weighted token is skipped (`ops.map_valid_chunks`), in the backward pass too, and
  only a `[chunk, V]` block of logits exists at once. Up to float rounding the results equal
  the dense path's, which runs when `chunk` is 0 or covers every token.

  Args:
    project: hidden states `[n, d]` -> float32 logits `[n, V]` (e.g. a model's `project`).
    hidden: `[..., d]` final hidden states; targets: `[...]` int; weights: `[...]` float.
    label_smoothing: as in `losses.softmax_loss_and_metrics` (the objective only).
    chunk: tokens per projection, >= 0.

  Returns:
    `(objective_sum, {'loss': ..., 'accuracy': ...}, predictions)`: as
    `losses.softmax_loss_and_metrics`, plus the argmax predictions, int32 `[...]` (0 where skipped).
  """
  if hidden.shape[:-1] != targets.shape or weights.shape != targets.shape:
    raise ValueError(f'hidden {hidden.shape} must be targets {targets.shape} + [d], and '
                     f'weights {weights.shape} equal to targets')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing={label_smoothing} must be in [0, 1)')
  n = targets.size
  if chunk == 0 or n <= chunk:
    logits = project(hidden.reshape(n, -1)).reshape(*targets.shape, -1)
    objective, metrics = losses.softmax_loss_and_metrics(logits, targets, weights,
                                                         label_smoothing=label_smoothing)
    return objective, metrics, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def per_token(rows):
    h, t = rows
    log_probs = jax.nn.log_softmax(project(h).astype(jnp.float32), axis=-1)
    ce = losses.token_cross_entropy(log_probs, t)
    smoothed = (losses.token_cross_entropy(log_probs, t, label_smoothing)
                if label_smoothing > 0.0 else ce)
    return ce, smoothed, jnp.argmax(log_probs, axis=-1).astype(jnp.int32)

  def skipped(rows):
    zeros = jnp.zeros(rows[1].shape, jnp.float32)
    return zeros, zeros, jnp.zeros(rows[1].shape, jnp.int32)

  weights = weights.astype(jnp.float32)
  flat_weights = weights.reshape(n)
  ce, smoothed, predictions = ops.map_valid_chunks(
      lambda active, rows: jax.lax.cond(active, per_token, skipped, rows),
      (hidden.reshape(n, hidden.shape[-1]), targets.reshape(n)), flat_weights != 0,
      chunk=chunk)
  predictions = predictions.reshape(targets.shape)
  correct = (predictions == targets).astype(jnp.float32).reshape(n)
  weight_sum = jnp.sum(flat_weights)
  metrics = {'loss': (jnp.sum(ce * flat_weights), weight_sum),
             'accuracy': (jnp.sum(correct * flat_weights), weight_sum)}
  return jnp.sum(smoothed * flat_weights), metrics, predictions


def token_loss(task: Any, params: Any, batch: Any, rng: jax.Array, train: bool,
               targets: jax.Array, weights: jax.Array
               ) -> tuple[jax.Array, dict[str, losses.Metric], jax.Array]:
  """`(objective_sum, {'loss', 'accuracy'}, predictions)` of `task`'s model on `batch`.

  A model kind that returns its final hidden states (`ModelKind.returns_hidden`: the
  Transformers) is projected only at real tokens (`softmax_loss_from_hidden`, predictions are
  token ids); any other gives full logits (predictions are those logits).

  Args:
    targets: int `[b, L]` token ids to predict; weights: float `[b, L]`, 0 on padding.
  """
  if task.model_kind.returns_hidden:
    hidden = task.apply(params, batch, train=train, rng=rng, return_hidden=True)
    project = lambda h: task.model.apply({'params': params}, h, method='project')  # noqa: E731
    return softmax_loss_from_hidden(project, hidden, targets, weights,
                                    label_smoothing=task.label_smoothing,
                                    chunk=task.model_config.pad_skip_chunk)
  logits = task.apply(params, batch, train=train, rng=rng)
  objective, metrics = losses.softmax_loss_and_metrics(logits, targets, weights,
                                                       label_smoothing=task.label_smoothing)
  return objective, metrics, logits
