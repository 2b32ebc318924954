"""What an experiment config holds: every section with its defaults, built without JAX.

    c = base_config('reverse', 'encoder_decoder', 'tiny', norm_position='pre')
    c.optim.learning_rate = 2e-3
    c.lock()

Sections, each defined by the layer that reads it (this module only assembles them):

    optim, train, parallel   attn_jax.train.config
    data                     attn_jax.data.config
    model                    `kind` + every field of that kind's config dataclass
                             (attn_jax.models.configs) except the data-derived sizes
    loss                     label smoothing
    eval                     `default_eval()` below: decoding, scoring and plots

Importing this module and calling `base_config` loads no JAX, Flax, optax, orbax, grain or TFDS
(tests/configs/test_configs.py checks it), so config files stay light. Validation, which needs
those libraries, is `attn_jax.experiment.run.validate_config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from attn_jax.data import config as data_config
from attn_jax.models import configs as model_configs
from attn_jax.models.kinds import MODEL_KINDS, check_model_kind  # the table of model kinds
from attn_jax.train import config as train_config

SECTIONS = ('data', 'model', 'optim', 'train', 'parallel', 'loss', 'eval')

# Filled from the data, never from config.model (the task's `data_fields(meta)`).
DATA_FIELDS = ('vocab_size', 'output_vocab_size', 'num_classes', 'image_size', 'channels')


# The attention options that model configs held flat before they moved into
# `TransformerConfig.attention` (old name -> field of `AttentionConfig`): runs saved in the old
# layout are read into the new one (`saved_config`).
FLAT_ATTENTION_FIELDS: dict[str, str] = {
    'num_heads': 'num_heads', 'num_kv_heads': 'num_kv_heads', 'attention_kind': 'kind',
    'sliding_window': 'sliding_window', 'attn_logit_softcap': 'logit_softcap',
    'attention_sinks': 'sinks', 'qk_norm': 'qk_norm', 'mask_mod': 'mask_mod',
    'score_mod': 'score_mod', 'attention_dropout_rate': 'dropout_rate',
    'rope_base': 'rope_base', 't5_num_buckets': 't5_num_buckets',
    't5_max_distance': 't5_max_distance', 'performer_features': 'performer_features',
    'performer_seed': 'performer_seed', 'shared_qk': 'shared_qk',
    'value_projection': 'value_projection', 'key_projection': 'key_projection',
    'share_head_projections': 'share_head_projections', 'encoder_aggregation': 'aggregation',
    'implementation': 'implementation',
}


def _nested_attention(model: dict[str, Any]) -> list[str]:
  """Moves the flat attention fields of an old-layout model section into `attention`, in
  place; returns the names moved."""
  flat = [name for name in FLAT_ATTENTION_FIELDS if name in model]
  if not flat or isinstance(model.get('attention'), dict):
    return []
  model['attention'] = {FLAT_ATTENTION_FIELDS[name]: model.pop(name) for name in flat}
  return flat


def _fill_defaults(section: dict[str, Any], cls: type, prefix: str = '') -> dict[str, Any]:
  """Adds, in place, every field of dataclass `cls` (recursively for nested config
  dataclasses) that `section` lacks, with its default; returns `{dotted name: default}`."""
  filled = {}
  defaults = model_configs.field_defaults(cls)
  for f in dataclasses.fields(cls):
    if f.name in DATA_FIELDS:
      continue
    nested = model_configs.nested_config_class(f)
    if nested is not None:
      section.setdefault(f.name, {})
      filled.update(_fill_defaults(section[f.name], nested, f'{prefix}{f.name}.'))
    elif f.name not in section:
      section[f.name] = defaults[f.name]
      filled[prefix + f.name] = defaults[f.name]
  return filled


def saved_config(raw: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A run's saved config (config.json's dict) read into today's layout: attention options
  saved flat move into `model.attention`, and every model field added since the run was
  written takes its default (logged by name).

  A field added to a model config must default to the old behaviour, so that this filling
  reproduces how the saved run computed; `tests/experiment/test_saved_runs.py` checks it on
  configs saved by earlier code.
  """
  raw = json.loads(json.dumps(raw))  # a deep copy of plain values
  model = raw.get('model')
  kind = model.get('kind') if isinstance(model, dict) else None
  if kind not in MODEL_KINDS:
    return ml_collections.ConfigDict(raw)  # build_model_config names the problem
  cls = MODEL_KINDS[kind].config_class
  moved = _nested_attention(model) if cls is model_configs.TransformerConfig else []
  if moved:
    logging.info('the saved config holds the attention options flat (the old layout); read '
                 '%s into model.attention', moved)
  filled = _fill_defaults(model, cls)
  if filled:
    logging.info('the saved config predates %d model field(s); filled in their defaults: %s',
                 len(filled), filled)
  config = ml_collections.ConfigDict(raw)
  _typed_placeholders(config.model, cls)
  return config


def _typed_placeholders(section: ml_collections.ConfigDict, cls: type) -> None:
  """None-valued fields of `section` become placeholders typed by `cls`'s annotation (as
  `model_section` makes them), so that `--config.model.<field>=` parses them."""
  for f in dataclasses.fields(cls):
    if f.name not in section:
      continue
    nested = model_configs.nested_config_class(f)
    if nested is not None:
      _typed_placeholders(section[f.name], nested)
    elif section[f.name] is None:
      with section.unlocked():
        section[f.name] = config_dict.placeholder(_placeholder_type(str(f.type)))


def _section(instance: Any) -> ml_collections.ConfigDict:
  """A config dataclass as a ConfigDict: nested config dataclasses as sections, None-valued
  fields as typed placeholders (so `--config.model.<field>=` can set them)."""
  section = ml_collections.ConfigDict()
  for f in dataclasses.fields(instance):
    if f.name in DATA_FIELDS:
      continue
    value = getattr(instance, f.name)
    if model_configs.nested_config_class(f) is not None:
      value = _section(value)
    elif value is None:
      value = config_dict.placeholder(_placeholder_type(str(f.type)))
    section[f.name] = value
  return section


def model_section(kind: str, variant: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`config.model`: `kind` plus every field of its config dataclass at size `variant` with
  `overrides` (attention options in `attention=dict(...)`), minus the data-derived ones, so
  any field can be overridden with `--config.model.<field>=` (`--config.model.attention.
  <field>=` for the attention's).
  """
  check_model_kind(kind)
  section = ml_collections.ConfigDict({'kind': kind})
  section.update(_section(MODEL_KINDS[kind].variant(variant, **overrides)))
  return section


def _placeholder_type(annotation: str) -> type:
  """The type an optional field takes from the command line: `int | None` -> int, etc."""
  for name, kind in (('float', float), ('int', int), ('bool', bool)):
    if name in annotation:
      return kind
  return str


def default_eval() -> ml_collections.ConfigDict:
  """`config.eval`: what the eval hooks (`attn_jax.experiment.evaluation`) decode, score and
  plot."""
  c = ml_collections.ConfigDict()
  c.decode_splits = ''  # comma-separated eval splits to decode; '' = all of them.
  c.decode_method = 'greedy'  # 'greedy' | 'sample' | 'beam'
  c.beam_size = 4
  c.length_penalty = 0.6
  c.temperature = 1.0
  c.top_k = 0  # 0 = off
  c.top_p = 1.0  # 1.0 = off
  c.max_decode_batches = 0  # per split and eval; 0 = the whole split.
  # seq2seq: each output ends by floor(max_len_a * source tokens + max_len_b) tokens (fairseq's
  # --max-len-a/b; Vaswani et al. 2017 use 1 and 50), so one runaway hypothesis cannot keep
  # its whole batch decoding to the target length limit. Both 0 = that limit only.
  c.max_len_a = 0.0
  c.max_len_b = 0
  c.exact_match = True  # exact-sequence accuracy of decoded outputs (seq2seq).
  c.bleu = False  # sacrebleu corpus BLEU of detokenized outputs (translation).
  c.num_samples = 4  # LM: continuations sampled per eval.
  c.prompt_length = 8  # LM: tokens of each validation row used as the prompt.
  c.sample_length = 64  # LM: generated tokens per sample.
  c.attention_examples = 2  # validation examples plotted at the final step; 0 = none.
  return c


def base_config(dataset: str, model_kind: str, variant: str,
                **model_overrides: Any) -> ml_collections.ConfigDict:
  """Every section with defaults: `data` for `dataset`, `model` of `model_kind` at size
  `variant` (+ overrides), `optim`/`train`/`parallel`, `loss`, `eval`. Unlocked: config files
  set what their experiment needs, then `lock()`.
  """
  c = train_config.full_config()
  c.arg = ''  # The `:key=value` string the config was built from (recorded, not read).
  c.data_dir = ''  # TFDS/tokenizer cache; '' = ~/tensorflow_datasets.
  c.data = data_config.default_config(dataset)
  c.model = model_section(model_kind, variant, **model_overrides)
  c.loss = ml_collections.ConfigDict({'label_smoothing': 0.0})
  c.eval = default_eval()
  return c
