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
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from attn_jax.data import config as data_config
from attn_jax.models.kinds import MODEL_KINDS, check_model_kind  # the table of model kinds
from attn_jax.train import config as train_config

SECTIONS = ('data', 'model', 'optim', 'train', 'parallel', 'loss', 'eval')

# Filled from the data, never from config.model.
DATA_FIELDS = ('vocab_size', 'output_vocab_size', 'num_classes')


# Model fields added after runs were saved, with the value that reproduces how those runs
# computed: a saved config.json without one gets it when the run is loaded (`saved_config`).
# Only options that change no result belong here.
ADDED_MODEL_FIELDS: dict[str, Any] = {'pad_skip_chunk': 512}


def saved_config(raw: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A run's saved config (config.json's dict) with the model fields added since it was
  written filled in from `ADDED_MODEL_FIELDS` (logged, by name)."""
  config = ml_collections.ConfigDict(raw)
  model = config.get('model')
  kind = model.get('kind') if model is not None else None
  if kind not in MODEL_KINDS:
    return config  # build_model_config names the problem
  known = {f.name for f in dataclasses.fields(MODEL_KINDS[kind].config_class)}
  filled = {name: value for name, value in ADDED_MODEL_FIELDS.items()
            if name in known and name not in model}
  if filled:
    logging.info('the saved config predates %d model field(s); filled in: %s', len(filled),
                 filled)
    with config.unlocked():
      for name, value in filled.items():
        config.model[name] = value
  return config


def model_section(kind: str, variant: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`config.model`: `kind` plus every field of its config dataclass at size `variant` with
  `overrides`, minus the data-derived ones, so any field can be overridden with
  `--config.model.<field>=`. None-valued fields become typed placeholders for the same reason.
  """
  check_model_kind(kind)
  model = MODEL_KINDS[kind].variant(variant, **overrides)
  types = {f.name: f.type for f in dataclasses.fields(model)}
  section = ml_collections.ConfigDict({'kind': kind})
  for name, value in dataclasses.asdict(model).items():
    if name in DATA_FIELDS:
      continue
    if value is None:
      value = config_dict.placeholder(_placeholder_type(str(types[name])))
    section[name] = value
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
