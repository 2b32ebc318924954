"""What a task object is: a model kind bound to a batch layout, and everything the experiment
layer asks of a kind of task.

A task kind is one module in this package with a `Task` subclass, registered by the data task
name it trains on in `TASKS` (`attn_jax/experiment/tasks/__init__.py`). It declares

  class attributes
    name           the data task ('seq2seq', 'classification', 'lm', ...): its key in TASKS,
                   and the `task` of the data's meta
    model_kinds    the `config.model.kind`s it serves (rows of `attn_jax.models.kinds`)
    metrics        its loss-based eval metrics -> 'min' | 'max' | None (no best)
    evaluators     evaluator classes run after each eval (`attn_jax.experiment.evaluators`)
    token_fields   batch fields of token ids: the real-token count for throughput
  methods (the base implements the token-batch defaults)
    data_fields(meta)        classmethod: the model-config fields the data decides
    dummy_batch()            a batch for `init_params` (shapes only)
    loss_fn(...)             `(params, batch, rng, train) -> (objective_sum, {name: (sum, count)})`
    real_rows(batch)         bool `[b]`: rows that are examples, not padding
    count_tokens(batch)      the real tokens of a host batch
    attention_axes(...)      axis labels of a heatmap
    predict_batch(...), score(...)   what `inference` needs

`make_task(config, meta)` builds the model (`build_model_config`) and the task around it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from attn_jax.experiment.batches import rows_with_tokens, token_strings, until_eos
from attn_jax.experiment.evaluators.base import declared_directions
from attn_jax.models import names
from attn_jax.models.kinds import model_kind
from attn_jax.train import losses, throughput
from attn_jax.train.metrics import Direction

_INIT_LEN = 8  # Parameter shapes do not depend on the sequence length.


class Task:
  """A model bound to a batch layout: what `train_loop`, the evaluators and `inference` need.

  Attributes:
    kind: `config.model.kind`; model_kind: its row of `attn_jax.models.kinds`.
    model: the flax module; model_config: its dataclass (`build_model_config`).
    label_smoothing: `config.loss.label_smoothing` (the objective only, not the metrics).
  """

  name: ClassVar[str] = ''
  model_kinds: ClassVar[tuple[str, ...]] = ()
  metrics: ClassVar[Mapping[str, Direction]] = losses.METRIC_DIRECTIONS
  evaluators: ClassVar[tuple[type, ...]] = ()
  token_fields: ClassVar[tuple[str, ...]] = ('inputs',)

  def __init__(self, config: ml_collections.ConfigDict, model_config: Any):
    self.kind = config.model.kind
    self.model_kind = model_kind(self.kind)
    self.model_config = model_config
    self.model = self.model_kind.module_class()(model_config)
    self.label_smoothing = float(config.loss.label_smoothing)

  @property
  def task(self) -> str:
    """The data task name (`name`), as the earlier `Task` dataclass called it."""
    return self.name

  # --- Declarations about the data -------------------------------------------------------------

  @classmethod
  def data_fields(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The model-config fields that come from the data (`meta`): the vocabulary size here."""
    return {'vocab_size': int(meta.get('input_vocab_size') or meta.get('vocab_size') or 1)}

  @classmethod
  def metric_directions(cls) -> dict[str, Direction]:
    """Every eval metric this task writes (loss-based and its evaluators') -> its direction,
    keyed by the name within a split (`train.metrics.metric_direction` reads it)."""
    return {**cls.metrics, **declared_directions(cls.evaluators)}

  def dummy_batch(self) -> dict[str, np.ndarray]:
    """A batch of one row with the layout the model takes, for `init_params`."""
    return {'inputs': np.ones((1, _INIT_LEN), np.int32),
            'targets': np.ones((1, _INIT_LEN), np.int32)}

  def real_rows(self, batch: Mapping[str, Any]) -> Any:
    """bool `[b]`: the rows that are examples (eval batches are padded with all-pad rows)."""
    return rows_with_tokens(batch['inputs'])

  def count_tokens(self, batch: Mapping[str, Any]) -> int:
    """The real (non-pad) tokens of a host batch, for `train/tokens_per_second`."""
    return throughput.count_tokens(batch, self.token_fields)

  # --- The model ---------------------------------------------------------------------------

  def positional(self, batch: Mapping[str, Any]) -> tuple[Any, ...]:
    """The batch fields the module takes positionally (`ModelKind.positional`)."""
    return tuple(batch[field] for field in self.model_kind.positional)

  def model_kwargs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Packed-batch fields present in `batch` -> the module's keyword arguments."""
    return {arg: batch[key] for key, arg in self.model_kind.keywords.items() if key in batch}

  def init_params(self, rng: jax.Array) -> Any:
    """`rng -> params` (logically boxed), from `dummy_batch`."""
    return self.model.init({'params': rng}, *self.positional(self.dummy_batch()))['params']

  def apply(self, params, batch, *, train=False, rng=None, capture=False, return_hidden=False):
    """The model on `batch`: logits; `(logits, intermediates)` with `capture=True`; the final
    hidden states instead of logits with `return_hidden=True` (kinds that `returns_hidden`)."""
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    args, kwargs = self.positional(batch), self.model_kwargs(batch)
    if return_hidden:
      kwargs['return_hidden'] = True
    if capture:
      logits, mutated = self.model.apply({'params': params}, *args, train=train, rngs=rngs,
                                         capture_attention=True,
                                         mutable=[names.INTERMEDIATES], **kwargs)
      return logits, mutated.get(names.INTERMEDIATES, {})
    return self.model.apply({'params': params}, *args, train=train, rngs=rngs, **kwargs)

  def loss_fn(self, params, batch, rng, train):
    """`(objective_sum, {name: (sum, count)})` of `batch` (see `attn_jax.train.step`)."""
    raise NotImplementedError(f'{type(self).__name__} defines no loss_fn')

  # --- Heatmaps and inference ------------------------------------------------------------------

  def attention_axes(self, module: str, example: Mapping[str, np.ndarray], tokenizers
                     ) -> tuple[list[str], list[str]]:
    """(query labels, key labels) of `module`'s attention map for one example (a batch row).

    Encoder self-attention: source over source; decoder self-attention: target position i
    predicts target i from BOS + targets[:i]; cross and RNN attention: target over source. A
    task without targets (an LM) labels its inputs as the target."""
    if module == names.ENCODER_SELF:
      source = token_strings(tokenizers['inputs'], until_eos(example['inputs']))
      return source, source
    target = token_strings(tokenizers['targets'],
                           until_eos(example['targets' if 'targets' in example else 'inputs']))
    if module == names.DECODER_SELF:
      return target, ['<s>'] + target[:-1]
    return target, token_strings(tokenizers['inputs'], until_eos(example['inputs']))

  def predict_batch(self, params, ids: np.ndarray, *, eval_config, max_decode_len: int,
                    rng: jax.Array, tokenizers: Mapping[str, Any], meta: Mapping[str, Any]
                    ) -> list[str]:
    """Output texts for token rows `ids` int32 `[n, L]` (each ending in EOS): what
    `inference.predict` returns for them."""
    raise NotImplementedError(f'{type(self).__name__} cannot predict from text')

  def score(self, config: ml_collections.ConfigDict, predictions: Sequence[str],
            references: Sequence[str]) -> dict[str, float]:
    """Scores of predicted texts against references (`inference.score`); {} = none."""
    del config, predictions, references
    return {}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """`{'accuracy': fraction of predictions equal to their reference}` (stripped strings)."""
  correct = [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]
  return {'accuracy': float(np.mean(correct)) if correct else 0.0}

