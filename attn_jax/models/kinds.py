"""The model kinds `config.model.kind` names: one table, one row per kind.

    kind = model_kind('encoder_decoder')
    cfg = kind.variant('tiny', positional='rope')   # a TransformerConfig
    model = kind.module_class()(cfg)                # imports attn_jax.models.transformer now

Each row says what the rest of the code needs to know about a kind: its config dataclass and
the function that builds it at a named size, the Flax module (an import path, resolved only
when a model is built, so this table stays JAX-free for config files), which batch fields the
module takes positionally and which as keywords, and whether it can hand back its final hidden
states (`return_hidden=True` + `project`) for a loss that projects only real tokens.

Which data task a kind serves is not said here: a task object (attn_jax.experiment.tasks)
lists the kinds it serves. A new model kind is one row here plus that task's list.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from attn_jax.models import configs as model_configs


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """What `config.model.kind` names.

  Attributes:
    config_class: the frozen dataclass the module takes.
    variant: `(size, **overrides) -> config_class` instance (e.g. `transformer_config`).
    module: 'package.module:ClassName' of the flax module, imported by `module_class()`.
    positional: batch fields passed positionally, in order (e.g. ('inputs', 'targets')).
    keywords: packed-batch field (data contract name) -> the module's keyword argument; a
      field absent from a batch is not passed. A kind without segmentation here cannot train
      on packed batches.
    returns_hidden: the module takes `return_hidden=True` and has a `project` method.
  """

  config_class: type
  variant: Callable[..., Any]
  module: str
  positional: tuple[str, ...]
  keywords: Mapping[str, str] = dataclasses.field(default_factory=dict)
  returns_hidden: bool = False

  def module_class(self) -> type:
    """The flax module class (imports its module, and so JAX and Flax, on first call)."""
    path, name = self.module.split(':')
    return getattr(importlib.import_module(path), name)

  @property
  def packs(self) -> bool:
    """Whether the module takes segment ids, so packed batches keep examples apart."""
    return 'inputs_segmentation' in self.keywords


_TRANSFORMER = 'attn_jax.models.transformer'
MODEL_KINDS: dict[str, ModelKind] = {
    'encoder_decoder': ModelKind(
        model_configs.TransformerConfig, model_configs.transformer_config,
        f'{_TRANSFORMER}:EncoderDecoder', ('inputs', 'targets'),
        {'inputs_segmentation': 'inputs_segmentation',
         'targets_segmentation': 'targets_segmentation',
         'inputs_position': 'inputs_positions', 'targets_position': 'targets_positions'},
        returns_hidden=True),
    'rnn_seq2seq': ModelKind(
        model_configs.RNNConfig, model_configs.rnn_config, 'attn_jax.models.rnn:RNNSeq2Seq',
        ('inputs', 'targets')),
    'encoder_classifier': ModelKind(
        model_configs.TransformerConfig, model_configs.transformer_config,
        f'{_TRANSFORMER}:EncoderClassifier', ('inputs',),
        {'inputs_segmentation': 'segment_ids'}),
    'decoder_lm': ModelKind(
        model_configs.TransformerConfig, model_configs.transformer_config,
        f'{_TRANSFORMER}:DecoderLM', ('inputs',),
        {'inputs_segmentation': 'segment_ids', 'inputs_position': 'positions'},
        returns_hidden=True),
    'vision_transformer': ModelKind(
        model_configs.ViTConfig, model_configs.vit_config, 'attn_jax.models.vit:ViT',
        ('image',)),
}


def check_model_kind(kind: Any) -> None:
  """Raises ValueError naming `config.model.kind` unless it is a row of MODEL_KINDS."""
  if kind not in MODEL_KINDS:
    raise ValueError(f'config.model.kind={kind!r} is not one of {tuple(MODEL_KINDS)}')


def model_kind(kind: Any) -> ModelKind:
  """The row of `kind` (ValueError naming the field for an unknown one)."""
  check_model_kind(kind)
  return MODEL_KINDS[kind]
