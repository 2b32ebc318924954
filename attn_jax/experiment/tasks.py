"""Tasks: a model kind by name + the data task -> model, `init_params` and `loss_fn`.

    task = make_task(config, meta)           # meta: DataBundle.meta (vocab sizes, classes...)
    train_loop(config, workdir, init_params=task.init_params, loss_fn=task.loss_fn, ...)

`config.model.kind` picks the module (`MODULES`, a plain dict, no registry); every other field
of `config.model` is a field of that kind's config dataclass (`TransformerConfig` or
`RNNConfig`), except the vocabulary sizes and number of classes, which come from the data.
Batches follow the data contract (see `attn_jax.data`): seq2seq `inputs`/`targets` (+ packed
segmentation/position), classification `inputs`/`label`, LM `inputs` (+ segmentation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from attn_jax import models, ops
from attn_jax.experiment.config import DATA_FIELDS, MODEL_KINDS, check_model_kind
from attn_jax.models import configs as model_configs
from attn_jax.models import modifiers
from attn_jax.models.attention import rope_scaling
from attn_jax.train import losses

# kind -> module class; the config dataclass and data task of each kind are in `config`.
MODULES: dict[str, Any] = {
    'encoder_decoder': models.EncoderDecoder,
    'rnn_seq2seq': models.RNNSeq2Seq,
    'encoder_classifier': models.EncoderClassifier,
    'decoder_lm': models.DecoderLM,
}
_INIT_LEN = 8  # Parameter shapes do not depend on the sequence length.


def build_model_config(model_config: Mapping[str, Any], meta: Mapping[str, Any]) -> Any:
  """The model's config dataclass from `config.model` and the data's vocab sizes/classes.

  `config.model` holds every field of the dataclass (see `config.model_section`), so the
  dataclass is built from those fields alone: no size variant fills anything in.

  Raises:
    ValueError: unknown kind, unknown or missing field, a kind that does not serve the data's
      task, or any invalid field value (checked by the dataclass).
  """
  fields = dict(model_config)
  kind = fields.pop('kind', None)
  check_model_kind(kind)
  cls, task = MODEL_KINDS[kind].config_class, MODEL_KINDS[kind].task
  if meta.get('task', task) != task:
    raise ValueError(f'config.model.kind={kind!r} serves {task!r} data but the dataset is '
                     f"{meta['task']!r}; use one of "
                     f"{[k for k, v in MODEL_KINDS.items() if v.task == meta['task']]}")
  bad = sorted(set(fields) & set(DATA_FIELDS))
  if bad:
    raise ValueError(f'config.model.{bad[0]} comes from the data (tokenizer/labels); remove it')
  _check_fields(fields, cls, kind, 'config.model')
  data = {'vocab_size': int(meta.get('input_vocab_size') or meta.get('vocab_size') or 1)}
  target_vocab = int(meta.get('target_vocab_size') or data['vocab_size'])
  if task == 'seq2seq' and target_vocab != data['vocab_size']:
    data['output_vocab_size'] = target_vocab
  if task == 'classification':
    data['num_classes'] = int(meta.get('num_classes') or 2)
  if kind != 'rnn_seq2seq':
    # Learned position tables (and decode caches) must cover the data's longest sequence.
    longest = max(int(meta.get('max_length', 0)), int(meta.get('max_target_length', 0))) + 2
    fields['max_len'] = max(int(fields.get('max_len', 0)), longest)
  model_config = cls(**fields, **data)
  if isinstance(model_config, model_configs.TransformerConfig):  # names resolve before compiles
    modifiers.check_names(model_config.attention)
    rope_scaling(model_config.attention)  # and the RoPE scaling's options fit
  return model_config


def _check_fields(fields: Mapping[str, Any], cls: type, kind: str, where: str) -> None:
  """`fields` has exactly the fields of `cls` (nested config sections recursively), bar the
  data-derived ones: a typo or a hand-built section fails here, naming the field."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{where} has unknown field(s) {unknown} for kind={kind!r}; known: '
                     f'{sorted(known - set(DATA_FIELDS))}')
  missing = sorted(known - set(DATA_FIELDS) - set(fields))
  if missing:
    raise ValueError(f'{where} lacks field(s) {missing}; build the section with '
                     'attn_jax.experiment.config.model_section')
  for f in dataclasses.fields(cls):
    nested = model_configs.nested_config_class(f)
    if nested is not None:
      if not isinstance(fields[f.name], Mapping):
        raise ValueError(f'{where}.{f.name} must be a section of fields, got '
                         f'{fields[f.name]!r}')
      _check_fields(fields[f.name], nested, kind, f'{where}.{f.name}')


@dataclasses.dataclass
class Task:
  """A model bound to a batch layout: what `train_loop` and the eval hooks need.

  Attributes:
    kind: `config.model.kind`; task: 'seq2seq' | 'classification' | 'lm'.
    model: the flax module; model_config: its dataclass.
    init_params: `rng -> params` (logically boxed).
    loss_fn: `(params, batch, rng, train) -> (objective_sum, {name: (sum, count)})`.
    apply: `(params, batch, *, train, rng, capture, return_hidden) -> logits` (or
      `(logits, intermediates)` with `capture=True`; the final hidden states instead of the
      logits with `return_hidden=True`, for the Transformer LM and encoder-decoder).
  """

  kind: str
  task: str
  model: Any
  model_config: Any
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[..., Any]
  apply: Callable[..., Any]


def _model_kwargs(kind: str, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Packed-batch fields (data contract names) -> the model's keyword arguments."""
  names = {
      'encoder_decoder': {'inputs_segmentation': 'inputs_segmentation',
                          'targets_segmentation': 'targets_segmentation',
                          'inputs_position': 'inputs_positions',
                          'targets_position': 'targets_positions'},
      'decoder_lm': {'inputs_segmentation': 'segment_ids', 'inputs_position': 'positions'},
      'encoder_classifier': {'inputs_segmentation': 'segment_ids'},
      'rnn_seq2seq': {},
  }[kind]
  return {arg: batch[key] for key, arg in names.items() if key in batch}


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


def make_task(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> Task:
  """Builds the model named by `config.model` for the data described by `meta`."""
  model_config = build_model_config(config.model.to_dict(), meta)
  kind = config.model.kind
  task = MODEL_KINDS[kind].task
  model = MODULES[kind](model_config)
  label_smoothing = float(config.loss.label_smoothing)

  def positional(batch):
    if task == 'seq2seq':
      return (batch['inputs'], batch['targets'])
    return (batch['inputs'],)

  def apply(params, batch, *, train=False, rng=None, capture=False, return_hidden=False):
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    args, kwargs = positional(batch), _model_kwargs(kind, batch)
    if return_hidden:
      kwargs['return_hidden'] = True
    if capture:
      logits, mutated = model.apply({'params': params}, *args, train=train, rngs=rngs,
                                    capture_attention=True, mutable=['intermediates'], **kwargs)
      return logits, mutated.get('intermediates', {})
    return model.apply({'params': params}, *args, train=train, rngs=rngs, **kwargs)

  # The Transformers hand back their final states, so the loss projects only real tokens.
  projects_hidden = kind in ('encoder_decoder', 'decoder_lm')

  def token_loss(params, batch, rng, train, targets, weights):
    """`(objective_sum, metrics, predictions)`; predictions are token ids or logits."""
    if projects_hidden:
      hidden = apply(params, batch, train=train, rng=rng, return_hidden=True)
      project = lambda h: model.apply({'params': params}, h, method='project')  # noqa: E731
      return softmax_loss_from_hidden(project, hidden, targets, weights,
                                      label_smoothing=label_smoothing,
                                      chunk=model_config.pad_skip_chunk)
    logits = apply(params, batch, train=train, rng=rng)
    objective, metrics = losses.softmax_loss_and_metrics(logits, targets, weights,
                                                         label_smoothing=label_smoothing)
    return objective, metrics, logits

  def loss_fn(params, batch, rng, train):
    if task == 'classification':
      logits = apply(params, batch, train=train, rng=rng)
      # Eval batches are padded with all-pad rows; they must not count.
      weights = jnp.any(batch['inputs'] != 0, axis=-1).astype(jnp.float32)
      return losses.softmax_loss_and_metrics(logits, batch['label'], weights,
                                             label_smoothing=label_smoothing)
    targets = batch['targets'] if task == 'seq2seq' else batch['inputs']
    weights = losses.token_weights(targets)
    objective, metrics, predictions = token_loss(params, batch, rng, train, targets, weights)
    if task == 'seq2seq':
      # Teacher-forced; the decoded exact-sequence accuracy comes from the eval hook.
      metrics['tf_sequence_accuracy'] = losses.sequence_accuracy(predictions, targets, weights)
    return objective, metrics

  def init_params(rng):
    dummy = {'inputs': jnp.ones((1, _INIT_LEN), jnp.int32),
             'targets': jnp.ones((1, _INIT_LEN), jnp.int32)}
    return model.init({'params': rng}, *positional(dummy))['params']

  return Task(kind=kind, task=task, model=model, model_config=model_config,
              init_params=init_params, loss_fn=loss_fn, apply=apply)
