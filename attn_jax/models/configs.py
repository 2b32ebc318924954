"""Model configurations: frozen dataclasses, built from a named size plus overrides.

    cfg = transformer_config('base', vocab_size=37_000)          # the 2017 paper's base model
    cfg = transformer_config('tiny', positional='rope', attention=dict(num_kv_heads=1))
    rnn = rnn_config('small', cell='gru', attention='additive')
    vit = vit_config('tiny', positional='rope_2d', attention=dict(num_kv_heads=2))

Every field is checked in `__post_init__`, so a bad configuration raises a `ValueError`
naming the field before anything is traced or compiled. Unknown variants and unknown
override names raise too (a typo must never be silently ignored).

This module imports no JAX (only `compute_dtype` does, when called), so experiment config
files can build their `model` section from it without loading Flax.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ACTIVATIONS = ('relu', 'gelu', 'swiglu')
NORMS = ('layernorm', 'rmsnorm')
NORM_POSITIONS = ('pre', 'post')
# Added to the token embeddings: 'sinusoidal', 'learned'. Appended to them (and projected
# back to d_model): 'concat_geometric'. Inside attention: 'rope', 'alibi', 't5' (relative
# bias). 'none' for neither (e.g. a bag-of-words ablation).
POSITIONALS = ('sinusoidal', 'learned', 'concat_geometric', 'rope', 'alibi', 't5', 'none')
# Softmax attention; the linear-time kernelized baselines of the Long Range Arena (no logits);
# softmax attention with compressed keys/values (MLA) or the difference of two softmax maps.
KERNELIZED_KINDS = ('linear', 'performer')
ATTENTION_KINDS = ('softmax',) + KERNELIZED_KINDS + ('latent', 'differential')
# How the encoder's self-attention aggregates: over keys for each query (the usual), or over
# queries for each key (`ops.backward_aggregation`).
AGGREGATIONS = ('forward', 'backward')
POOLINGS = ('cls', 'mean')
IMPLEMENTATIONS = (None, 'dense', 'blockwise', 'cudnn', 'pallas')
# Per-layer self-attention kinds of `layer_pattern`: global, local (sliding_window), and
# global without position information (NoPE: no RoPE/ALiBi/T5 in that layer).
LAYER_KINDS = ('G', 'L', 'N')
IN_ATTENTION_POSITIONALS = ('rope', 'alibi', 't5')
# RoPE frequency scalings (`ops.rope.SCALING_KINDS`; a test keeps the two equal).
ROPE_SCALINGS = ('none', 'linear', 'ntk', 'yarn', 'llama3')
# Positions of a ViT's patches: added to the patch embeddings ('learned', a table over the
# patches; 'sinusoidal_2d', half the channels for the row, half for the column), or inside
# attention ('rope_2d': axial 2-D RoPE); 'none' for neither.
VIT_POSITIONALS = ('learned', 'sinusoidal_2d', 'rope_2d', 'none')
IN_ATTENTION_POSITIONALS_2D = ('rope_2d',)
# What a single attention layer puts inside attention (the model decides it per layer).
LAYER_POSITIONALS = ('none',) + IN_ATTENTION_POSITIONALS + IN_ATTENTION_POSITIONALS_2D
DTYPES = ('float32', 'bfloat16', 'float16')


def _check_choice(name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}')


def _check_positive(cfg: Any, *names: str) -> None:
  for name in names:
    if getattr(cfg, name) <= 0:
      raise ValueError(f'{name} must be positive, got {getattr(cfg, name)}')


def _check_rate(cfg: Any, *names: str) -> None:
  for name in names:
    if not 0.0 <= getattr(cfg, name) < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {getattr(cfg, name)}')


class _Dtype:
  """`compute_dtype`, from the `dtype` field of every model config."""

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # Here, not at the top: the dataclasses must stay JAX-free.

    return jnp.dtype(self.dtype)


class _VocabAndDtype(_Dtype):
  """Properties both text model configs derive from `vocab_size`/`output_vocab_size`/`dtype`."""

  @property
  def target_vocab_size(self) -> int:
    return self.vocab_size if self.output_vocab_size is None else self.output_vocab_size


class _LayerStack:
  """What the Transformer layer stack (`transformer.stack_layers`, `EncoderLayer`) reads from
  a config besides its plain fields (`d_model`, `d_ff`, `attention`, `activation`, `norm`,
  `norm_eps`, `norm_position`, `dropout_rate`, `use_bias`, `positional`, `layer_pattern`,
  `scan_layers`, `share_layers`, `remat`, `pad_skip_chunk`, `compute_dtype`): the text models'
  `TransformerConfig` and the `ViTConfig` both have them."""

  @property
  def num_heads(self) -> int:
    return self.attention.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.attention.num_heads

  @property
  def kv_heads(self) -> int:
    return self.attention.kv_heads

  @property
  def rotary_dim(self) -> int:
    """Channels of each (query/key) head that RoPE rotates: MLA rotates its decoupled part,
    differential attention each half of a head on its own."""
    attn = self.attention
    if attn.kind == 'latent':
      return attn.qk_rope_head_dim
    per_head = self.head_dim // 2 if attn.kind == 'differential' else self.head_dim
    return int(per_head * attn.rope_fraction)

  def layer_kind(self, index: int) -> str:
    """The self-attention kind of layer `index` of a stack: 'G', 'L' or 'N'."""
    if self.layer_pattern:
      return self.layer_pattern[index % len(self.layer_pattern)]
    return 'L' if self.attention.sliding_window is not None else 'G'


def _check_layer_pattern(cfg: Any, in_attention: tuple[str, ...]) -> None:
  """`cfg.layer_pattern` against its attention config, its positions (NoPE 'N' layers need
  `cfg.positional` in `in_attention`) and its stacking."""
  attn = cfg.attention
  bad = sorted(set(cfg.layer_pattern) - set(LAYER_KINDS))
  if bad:
    raise ValueError(f'layer_pattern={cfg.layer_pattern!r} has {bad}; use {LAYER_KINDS}')
  if 'L' in cfg.layer_pattern and attn.sliding_window is None:
    raise ValueError(f"layer_pattern={cfg.layer_pattern!r} has local 'L' layers but "
                     'attention.sliding_window is None')
  if 'N' in cfg.layer_pattern and cfg.positional not in in_attention:
    raise ValueError(f"layer_pattern={cfg.layer_pattern!r} has NoPE 'N' layers, which need "
                     f'positions inside attention, positional in {in_attention}; '
                     f'got {cfg.positional!r}')
  if len(set(cfg.layer_pattern)) > 1 and (cfg.scan_layers or cfg.share_layers):
    name = 'scan_layers' if cfg.scan_layers else 'share_layers'
    raise ValueError(f'layer_pattern={cfg.layer_pattern!r} makes layers differ, which '
                     f'{name}=True cannot stack (one set of layer code)')


def _check_optional_positive(cfg: Any, *names: str) -> None:
  for name in names:
    value = getattr(cfg, name)
    if value is not None and value <= 0:
      raise ValueError(f'{name} must be positive (or None), got {value}')


def split_names(value: str) -> tuple[str, ...]:
  """`'a, b'` -> `('a', 'b')`: the config's way of listing several names in one string field."""
  return tuple(name.strip() for name in value.split(',') if name.strip())


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Every option of a multi-head attention layer, validated once, here.

  `TransformerConfig.attention` holds one; `MultiHeadAttention(config)` takes it whole. What
  differs between the layers of a model (causal or not, self or cross, local or global, which
  positions) the model decides per layer (`transformer.layer_attention`); the options below
  are the same for every layer. Windows, mask and score functions, learned modifiers, shared-QK
  and backward aggregation apply to self-attention only (`for_cross()` drops them); soft-cap,
  sinks and QK-norm apply to cross-attention too.

  Mask and score functions and learned modifiers are chosen by name (see
  `attn_jax.models.modifiers`): a key of its registries, `'package.module:function'`, or
  `'package.module:factory(arguments)'`; in Python, the function itself.
  """
  num_heads: int = 8
  # Key/value heads for GQA (1 = MQA); None = num_heads (plain multi-head attention).
  num_kv_heads: int | None = None
  # 'softmax', the linear-time baselines 'linear' (Katharopoulos et al. 2020, elu + 1
  # features) and 'performer' (FAVOR+, Choromanski et al. 2021), 'latent' (DeepSeek-V2's
  # multi-head latent attention, `models/latent.py`) or 'differential' (Ye et al. 2024, the
  # difference of two softmax maps, `models/differential.py`).
  kind: str = 'softmax'
  # Self-attention sliding window (keys at most this far in the past, and in the future for
  # an encoder); None = full attention. The model's `layer_pattern` says which layers use it.
  sliding_window: int | None = None
  logit_softcap: float | None = None  # c * tanh(logit / c) on the logits (Gemma 2)
  sinks: bool = False  # a learned per-head logit in every softmax (gpt-oss)
  qk_norm: bool = False  # RMS-normalized query and key heads (OLMo 2, Gemma 3)
  # User functions of self-attention (see the class docstring); '' = none.
  mask_mod: Any = ''
  score_mod: Any = ''
  # Learned modifiers: comma-separated names of `modifiers.MODIFIERS` entries (or import
  # paths), each owning its parameters and the score function that reads them.
  modifiers: str = ''
  dropout_rate: float = 0.0  # on the attention weights
  # Parameters of the positions the model puts inside attention ('rope', 'alibi', 't5').
  rope_base: float = 10_000.0
  # RoPE for long context (`ops.rope`): the rotated share of each head's channels (GPT-NeoX's
  # rotary_pct), GPT-J's interleaved pairs instead of "rotate half", and a frequency scaling
  # to run past the training length: 'linear' (position interpolation), 'ntk', 'yarn',
  # 'llama3' by `rope_scaling_factor`, the last two from the training context
  # `rope_original_length`.
  rope_fraction: float = 1.0
  rope_interleaved: bool = False
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_original_length: int | None = None
  t5_num_buckets: int = 32
  t5_max_distance: int = 128
  # Performer: random features per head, and the seed of their fixed (non-trained) projection
  # (each layer folds its module path into it; a layer stack under nn.scan shares one).
  performer_features: int = 64
  performer_seed: int = 0
  # Self-attention keys are the L2-normalized queries (one projection) and a position attends
  # to itself only when it sees no other key (Reformer's shared-QK attention).
  shared_qk: bool = False
  # False: the input itself (split into heads) is the attention's value (and key).
  value_projection: bool = True
  key_projection: bool = True
  # One query/key/value projection for all heads of a layer (every head gets the same vectors).
  share_head_projections: bool = False
  # 'backward': bidirectional self-attention outputs sum_i alpha_ij v_i at each key position j
  # (`ops.backward_aggregation`); the model applies it to its encoder.
  aggregation: str = 'forward'
  implementation: str | None = None  # attention path, passed to ops.dot_product_attention.
  # kind='latent': the rank of the compressed key/value latent c_KV (what the decode cache
  # holds), the rank of the compressed query (0 = a full-rank query projection) and the
  # channels of the decoupled RoPE part of each query/key head (the key's shared by all
  # heads). DeepSeek-V2 uses 4 x and 1/2 x the head dim for the first and the last.
  kv_lora_rank: int = 0
  q_lora_rank: int = 0
  qk_rope_head_dim: int = 0
  # Talking-heads attention (Shazeer et al. 2020): learned [heads, heads] mixes of the logits
  # before the softmax and of the weights after it; the logits are materialized (the dense
  # path, `models/talking_heads.py`).
  talking_heads: bool = False
  # Learned key/value slots per key/value head that every query sees, never masked
  # (persistent memory, x-transformers' num_mem_kv; `models/memory.py`); 0 = none.
  num_memory_kv: int = 0
  # An elementwise sigmoid gate on each head's output, computed from the layer input (the
  # output gate of Qwen's gated attention; `models/gating.py`).
  output_gate: bool = False
  # ResFormer (Zhou et al. 2024): each self-attention layer's values mixed with the first
  # layer's values, by two learned scalars (`models/value_residual.py`; the model carries the
  # first layer's values through its stack).
  value_residual: bool = False

  def __post_init__(self):
    _check_positive(self, 'num_heads', 't5_num_buckets', 't5_max_distance',
                    'performer_features')
    for name in ('kv_lora_rank', 'q_lora_rank', 'qk_rope_head_dim', 'num_memory_kv'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if self.num_kv_heads is not None and (
        self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    _check_choice('kind', self.kind, ATTENTION_KINDS)
    _check_choice('aggregation', self.aggregation, AGGREGATIONS)
    _check_choice('implementation', self.implementation, IMPLEMENTATIONS)
    _check_choice('rope_scaling', self.rope_scaling, ROPE_SCALINGS)
    if not 0.0 < self.rope_fraction <= 1.0:
      raise ValueError(f'rope_fraction must be in (0, 1], got {self.rope_fraction}')
    _check_rate(self, 'dropout_rate')
    _check_optional_positive(self, 'logit_softcap')
    if self.sliding_window is not None and self.sliding_window < 0:
      raise ValueError(f'sliding_window must be >= 0, got {self.sliding_window}')
    if not isinstance(self.modifiers, str):
      raise ValueError(f'modifiers must be a comma-separated string of names, got '
                       f'{self.modifiers!r}')
    self._check_combinations()

  def _check_combinations(self) -> None:
    """The options that have no meaning together."""
    mha = self.kv_heads == self.num_heads
    self._check_variants()
    if not self.has_logits:
      # A kernelized similarity has no logits to cap, window, mask or modify per block.
      logits = {'sliding_window': self.sliding_window is not None,
                'logit_softcap': self.logit_softcap is not None, 'sinks': self.sinks,
                'mask_mod': bool(self.mask_mod), 'score_mod': bool(self.score_mod),
                'modifiers': bool(self.modifier_names), 'shared_qk': self.shared_qk,
                'dropout_rate': self.dropout_rate > 0.0,
                'aggregation': self.aggregation != 'forward'}
      bad = [name for name, used in logits.items() if used]
      if bad:
        raise ValueError(f'attention kind={self.kind!r} has no logits, so it cannot take {bad}')
    if self.shared_qk and not mha:
      raise ValueError(f'shared_qk=True makes the keys the queries, one per query head: '
                       f'num_kv_heads={self.num_kv_heads} must be None or num_heads')
    if self.shared_qk and not self.key_projection:
      raise ValueError('shared_qk=True takes the keys from the query projection; '
                       'key_projection=False would drop that projection too')
    if not self.key_projection and not mha:
      raise ValueError(f'key_projection=False splits the input into num_heads keys: '
                       f'num_kv_heads={self.num_kv_heads} must be None or num_heads')
    if self.aggregation == 'backward' and self.dropout_rate > 0.0:
      raise ValueError("aggregation='backward' takes no attention dropout_rate")

  def _check_variants(self) -> None:
    """The variants of issue #26 (latent, differential, talking heads, memory slots, value
    residual) against the options they cannot take."""
    latent = ('kv_lora_rank', 'q_lora_rank', 'qk_rope_head_dim')
    if self.kind != 'latent':
      set_ = [name for name in latent if getattr(self, name)]
      if set_:
        raise ValueError(f"{set_} apply to kind='latent', not kind={self.kind!r}")
    elif not (self.kv_lora_rank and self.qk_rope_head_dim) or self.qk_rope_head_dim % 2:
      raise ValueError(f"kind='latent' needs kv_lora_rank > 0 and an even qk_rope_head_dim > 0 "
                       f'(DeepSeek-V2: 4 x and 1/2 x the head dim), got kv_lora_rank='
                       f'{self.kv_lora_rank}, qk_rope_head_dim={self.qk_rope_head_dim}')
    refused = {
        # MLA has its own projections and norms and one (latent) key/value head for all.
        'latent': {'num_kv_heads': self.num_kv_heads is not None, 'qk_norm': self.qk_norm,
                   'shared_qk': self.shared_qk, 'key_projection': not self.key_projection,
                   'value_projection': not self.value_projection,
                   'share_head_projections': self.share_head_projections,
                   'rope_fraction': self.rope_fraction != 1.0,
                   'sliding_window': self.sliding_window is not None,
                   'aggregation': self.aggregation != 'forward',
                   'talking_heads': self.talking_heads, 'num_memory_kv': self.num_memory_kv > 0,
                   'value_residual': self.value_residual},
        # Two maps from the halves of each head: one softmax per half, no mixing across them.
        'differential': {'qk_norm': self.qk_norm, 'shared_qk': self.shared_qk,
                         'aggregation': self.aggregation != 'forward',
                         'talking_heads': self.talking_heads,
                         'num_memory_kv': self.num_memory_kv > 0},
    }.get(self.kind, {})
    if self.talking_heads:
      refused.update({'kind': self.kind != 'softmax', 'sinks': self.sinks,
                      'implementation': self.implementation not in (None, 'dense'),
                      'aggregation': self.aggregation != 'forward',
                      'num_memory_kv': self.num_memory_kv > 0})
    if self.num_memory_kv:
      # Memory joins the softmax by its log-sum-exp: kernelized kinds have none, and shared-QK
      # keys are normalized queries that learned slots would not be.
      refused.update({'kind': self.kind != 'softmax',
                      'shared_qk': self.shared_qk, 'aggregation': self.aggregation != 'forward'})
    bad = [name for name, used in refused.items() if used]
    if bad:
      chosen = [f'kind={self.kind!r}'] * (self.kind in ('latent', 'differential')) + [
          name for name in ('talking_heads', 'num_memory_kv') if getattr(self, name)]
      raise ValueError(f'attention {chosen} cannot take {bad}')

  @property
  def has_logits(self) -> bool:
    """Whether the attention computes softmax logits (masks, biases, caps apply to them)."""
    return self.kind not in KERNELIZED_KINDS

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def modifier_names(self) -> tuple[str, ...]:
    return split_names(self.modifiers)

  def check_layer(self, *, positional: str, is_causal: bool, cross_attention: bool) -> None:
    """The rules a layer's own choices must follow with this config (one home for them):
    `MultiHeadAttention` calls it with its attributes."""
    _check_choice('positional', positional, LAYER_POSITIONALS)
    if self.kind == 'latent' and (cross_attention or positional != 'rope'):
      raise ValueError(f"kind='latent' rotates its decoupled RoPE part: a self-attention layer "
                       f"with positional='rope' (got positional={positional!r}, cross_attention="
                       f'{cross_attention}; AttentionConfig.for_cross() gives cross-attention '
                       'plain heads)')
    if not self.has_logits and positional in ('alibi', 't5'):
      raise ValueError(f'attention kind={self.kind!r} has no logits, so it cannot take '
                       f'positional={positional!r} (a logit bias)')
    if cross_attention:
      self_only = {'mask_mod': bool(self.mask_mod), 'score_mod': bool(self.score_mod),
                   'modifiers': bool(self.modifier_names), 'shared_qk': self.shared_qk,
                   'aggregation': self.aggregation != 'forward',
                   'sliding_window': self.sliding_window is not None,
                   'positional': positional != 'none'}
      bad = [name for name, used in self_only.items() if used]
      if bad:
        raise ValueError(f'{bad} apply to self-attention; this layer is cross-attention '
                         '(derive its config with AttentionConfig.for_cross())')
    if self.aggregation == 'backward' and is_causal:
      raise ValueError("aggregation='backward' sums over queries, which would leak the future "
                       'into a causal decoder: it needs bidirectional self-attention')

  def for_cross(self) -> AttentionConfig:
    """This config for cross-attention: the self-attention-only options off. MLA becomes
    plain multi-head attention there: it compresses a decoder's growing self-attention cache,
    while cross-attention keys/values are projected once per source anyway."""
    latent = dict(kind='softmax', kv_lora_rank=0, q_lora_rank=0, qk_rope_head_dim=0) if (
        self.kind == 'latent') else {}
    return dataclasses.replace(self, mask_mod='', score_mod='', modifiers='', shared_qk=False,
                               aggregation='forward', sliding_window=None, num_memory_kv=0,
                               value_residual=False, **latent)


def _attention_config(value: Any) -> AttentionConfig:
  """An `AttentionConfig` from itself or a dict of its fields (unknown names raise)."""
  if isinstance(value, AttentionConfig):
    return value
  if not isinstance(value, dict):
    raise ValueError(f'attention must be an AttentionConfig or a dict of its fields, got '
                     f'{type(value).__name__}')
  known = {f.name for f in dataclasses.fields(AttentionConfig)}
  unknown = sorted(set(value) - known)
  if unknown:
    raise ValueError(f'unknown AttentionConfig field(s) {unknown}; known: {sorted(known)}')
  return AttentionConfig(**value)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(_VocabAndDtype, _LayerStack):
  """Hyper-parameters of the Transformer models (`EncoderDecoder`, `DecoderLM`,
  `EncoderClassifier`); the attention options are `attention` (an `AttentionConfig`, or a
  dict of its fields). Defaults are the 2017 paper's base model."""
  vocab_size: int = 32_000
  # Target vocabulary of EncoderDecoder; None = the same (shared) vocabulary.
  output_vocab_size: int | None = None
  num_classes: int = 2
  d_model: int = 512
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  activation: str = 'relu'
  norm: str = 'layernorm'
  norm_position: str = 'post'  # 'post' is the 2017 paper's; 'pre' trains deeper stacks.
  norm_eps: float = 1e-6
  positional: str = 'sinusoidal'
  max_len: int = 512  # learned position table size; also the default decode cache size.
  # Self-attention kind per layer, cycled over each stack: 'G' global, 'L' local (the
  # attention's sliding window), 'N' global with no position information (NoPE). '' = every
  # layer 'L' when attention.sliding_window is set, else 'G'. E.g. 'LLLLLG' is Gemma 3's.
  layer_pattern: str = ''
  # positional='concat_geometric': m, the (sin, cos) pairs appended to each token embedding.
  geometric_frequencies: int = 16
  dropout_rate: float = 0.1  # residual and embedding dropout
  # Source and target embeddings shared (EncoderDecoder, needs one vocabulary) and the
  # output projection tied to the target embedding.
  share_embeddings: bool = True
  tie_output: bool = True
  pooling: str = 'cls'  # EncoderClassifier: learned [CLS] vector or mean over non-pad tokens.
  use_bias: bool = True  # biases in attention / FFN projections
  scan_layers: bool = False  # stack layers with nn.scan (fast compiles) or a Python loop.
  # One layer's weights for every layer of a stack (ALBERT; the stack is then always an
  # nn.scan over the shared layer, whatever scan_layers says).
  share_layers: bool = False
  remat: bool = False  # rematerialize each layer in the backward pass (nn.remat).
  dtype: str = 'float32'  # compute dtype; parameters are always float32.
  capture_attention: bool = False  # sow attention weights into 'intermediates'.
  # Feed-forward and output-logit rows of padding are sorted to the end and skipped in
  # chunks of this many tokens (`ops.map_valid_chunks`; exact); 0 = compute every row.
  pad_skip_chunk: int = 512

  def __post_init__(self):
    object.__setattr__(self, 'attention', _attention_config(self.attention))
    _check_positive(self, 'vocab_size', 'num_classes', 'd_model', 'd_ff', 'max_len',
                    'geometric_frequencies')
    if self.num_encoder_layers < 0 or self.num_decoder_layers < 0:
      raise ValueError('num_encoder_layers and num_decoder_layers must be >= 0, got '
                       f'{self.num_encoder_layers} and {self.num_decoder_layers}')
    if self.output_vocab_size is not None and self.output_vocab_size <= 0:
      raise ValueError(f'output_vocab_size must be positive, got {self.output_vocab_size}')
    if self.d_model % self.num_heads:
      raise ValueError(f'd_model={self.d_model} is not divisible by num_heads={self.num_heads}')
    _check_choice('activation', self.activation, ACTIVATIONS)
    _check_choice('norm', self.norm, NORMS)
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('positional', self.positional, POSITIONALS)
    _check_choice('pooling', self.pooling, POOLINGS)
    _check_choice('dtype', self.dtype, DTYPES)
    _check_rate(self, 'dropout_rate')
    if self.positional == 'rope' and self.rotary_dim % 2:
      raise ValueError(f'positional=rope rotates channel pairs: head_dim {self.head_dim} x '
                       f'attention.rope_fraction {self.attention.rope_fraction} = '
                       f'{self.rotary_dim} channels must be even')
    if self.attention.kind == 'differential' and self.head_dim % 2:
      raise ValueError(f"attention kind='differential' splits each head in two: head_dim "
                       f'{self.head_dim} (d_model {self.d_model} / num_heads '
                       f'{self.num_heads}) must be even')
    if self.positional == 'sinusoidal' and self.d_model % 2:
      raise ValueError(f'positional=sinusoidal needs an even d_model, got {self.d_model}')
    if self.pad_skip_chunk < 0:
      raise ValueError(f'pad_skip_chunk must be >= 0 (0 = off), got {self.pad_skip_chunk}')
    self._check_layers()
    if (self.share_embeddings and self.output_vocab_size is not None
        and self.output_vocab_size != self.vocab_size):
      raise ValueError(
          f'share_embeddings needs one vocabulary, but vocab_size={self.vocab_size} and '
          f'output_vocab_size={self.output_vocab_size}')

  def _check_layers(self) -> None:
    """The layer pattern and what the model's layers need from the attention config."""
    attn = self.attention
    _check_layer_pattern(self, IN_ATTENTION_POSITIONALS)
    if not attn.has_logits and self.positional in ('alibi', 't5'):
      raise ValueError(f'attention kind={attn.kind!r} has no logits, so it cannot take '
                       f'positional={self.positional!r} (a logit bias)')
    if attn.kind == 'latent' and (self.positional != 'rope' or 'N' in self.layer_pattern):
      raise ValueError(f"attention kind='latent' rotates its decoupled RoPE part: it needs "
                       f"positional='rope' in every layer, got positional={self.positional!r}, "
                       f'layer_pattern={self.layer_pattern!r}')
    if attn.aggregation == 'backward' and self.num_encoder_layers == 0:
      raise ValueError("attention.aggregation='backward' applies to encoder self-attention, "
                       'but num_encoder_layers=0')


# Config dataclasses held by a field of another (by the field's annotation).
NESTED_CONFIGS: dict[str, type] = {'AttentionConfig': AttentionConfig}


def nested_config_class(field: dataclasses.Field) -> type | None:
  """The config dataclass a field holds (`TransformerConfig.attention`), else None."""
  return NESTED_CONFIGS.get(str(field.type))


def field_defaults(cls: type) -> dict[str, Any]:
  """`{field: default}` of a config dataclass (nested configs as their default instance)."""
  return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
          for f in dataclasses.fields(cls)}


TRANSFORMER_VARIANTS: dict[str, dict[str, Any]] = {
    # Unit tests and CPU smoke runs.
    'tiny': dict(d_model=32, d_ff=64, num_encoder_layers=2, num_decoder_layers=2, max_len=128,
                 attention=dict(num_heads=4)),
    # Small-data experiments on one CPU/GPU (IWSLT-size translation, algorithmic tasks).
    'small': dict(d_model=256, d_ff=1024, num_encoder_layers=3, num_decoder_layers=3,
                  attention=dict(num_heads=4)),
    # Vaswani et al. 2017, Table 3 "base" and "big".
    'base': dict(d_model=512, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6,
                 attention=dict(num_heads=8)),
    'big': dict(d_model=1024, d_ff=4096, num_encoder_layers=6, num_decoder_layers=6,
                dropout_rate=0.3, attention=dict(num_heads=16)),
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  """`base` with `overrides`; dict values of nested configs (`attention`) merge field by field."""
  out = dict(base)
  for name, value in overrides.items():
    if isinstance(value, dict) and isinstance(out.get(name), dict):
      out[name] = {**out[name], **value}
    else:
      out[name] = value
  return out


def _build(cls, variants: dict[str, dict[str, Any]], variant: str, overrides: dict[str, Any]):
  if variant not in variants:
    raise ValueError(f'unknown variant {variant!r}; known: {sorted(variants)}')
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    nested = [n for n in unknown if n in {f.name for f in dataclasses.fields(AttentionConfig)}]
    hint = (f'; {nested} are attention options: pass attention=dict({nested[0]}=...)'
            if nested and cls in (TransformerConfig, ViTConfig) else '')
    raise ValueError(f'unknown {cls.__name__} field(s) {unknown}{hint}; known: {sorted(fields)}')
  return cls(**_merge(variants[variant], overrides))


def transformer_config(variant: str = 'base', **overrides: Any) -> TransformerConfig:
  """The named size (`tiny`, `small`, `base`, `big`) with `overrides` applied; attention
  options go in `attention=dict(...)`, merged with the size's own (its `num_heads`)."""
  return _build(TransformerConfig, TRANSFORMER_VARIANTS, variant, overrides)


@dataclasses.dataclass(frozen=True)
class RNNConfig(_VocabAndDtype):
  """Hyper-parameters of `RNNSeq2Seq` (Bahdanau et al. 2014; Luong et al. 2015)."""
  vocab_size: int = 32_000
  output_vocab_size: int | None = None  # None = the same vocabulary.
  embed_dim: int = 256
  hidden_dim: int = 512  # per direction in the encoder; the decoder's state size.
  cell: str = 'lstm'  # 'lstm' | 'gru'
  # 'additive' (Bahdanau: context from the previous decoder state, fed into the cell),
  # 'dot' / 'general' (Luong: context from the current state), 'none' (ablation: the
  # decoder sees only the final encoder state, through its initial state).
  attention: str = 'additive'
  attention_dim: int = 256  # additive scores' hidden size
  input_feeding: bool = True  # Luong: feed the previous attentional vector to the cell.
  dropout_rate: float = 0.1
  dtype: str = 'float32'
  capture_attention: bool = False

  def __post_init__(self):
    _check_positive(self, 'vocab_size', 'embed_dim', 'hidden_dim', 'attention_dim')
    if self.output_vocab_size is not None and self.output_vocab_size <= 0:
      raise ValueError(f'output_vocab_size must be positive, got {self.output_vocab_size}')
    _check_choice('cell', self.cell, ('lstm', 'gru'))
    _check_choice('attention', self.attention, ('additive', 'dot', 'general', 'none'))
    _check_choice('dtype', self.dtype, DTYPES)
    _check_rate(self, 'dropout_rate')


RNN_VARIANTS: dict[str, dict[str, Any]] = {
    'tiny': dict(embed_dim=16, hidden_dim=32, attention_dim=16),
    'small': dict(embed_dim=256, hidden_dim=256, attention_dim=256),
    # Bahdanau et al. 2014 (RNNsearch): 620-d embeddings, 1000 hidden units.
    'base': dict(embed_dim=620, hidden_dim=1000, attention_dim=1000),
    # Luong et al. 2015 scale: 1000-d everything.
    'big': dict(embed_dim=1000, hidden_dim=1000, attention_dim=1000),
}


def rnn_config(variant: str = 'small', **overrides: Any) -> RNNConfig:
  """The named RNN size (`tiny`, `small`, `base`, `big`) with `overrides` applied."""
  return _build(RNNConfig, RNN_VARIANTS, variant, overrides)


@dataclasses.dataclass(frozen=True)
class ViTConfig(_Dtype, _LayerStack):
  """Hyper-parameters of the Vision Transformer (`models.vit.ViT`; Dosovitskiy et al. 2021).

  An image is cut into `patch_size` squares, each projected to `d_model`; a class token is
  prepended (`pooling='cls'`) or the outputs are averaged (`'mean'`); the encoder layers are
  the text models' (`transformer.EncoderLayer`), so every `attention` option applies (a
  sliding window runs over the patches' raster order). Defaults are ViT-B/16 at 224x224.
  `image_size`, `channels` and `num_classes` describe the data.
  """
  image_size: tuple[int, int] = (224, 224)  # (height, width)
  channels: int = 3
  num_classes: int = 1000
  patch_size: int = 16
  d_model: int = 768
  d_ff: int = 3072
  num_layers: int = 12
  # Axial RoPE over patch grids uses a small base (Heo et al. 2024: 100).
  attention: AttentionConfig = dataclasses.field(
      default_factory=lambda: AttentionConfig(num_heads=12, rope_base=100.0))
  activation: str = 'gelu'
  norm: str = 'layernorm'
  norm_position: str = 'pre'
  norm_eps: float = 1e-6
  # VIT_POSITIONALS: 'learned' (a [patches, d_model] table), 'sinusoidal_2d', 'rope_2d' (in
  # attention; the class token is not rotated), 'none' (a bag of patches).
  positional: str = 'learned'
  pooling: str = 'cls'
  layer_pattern: str = ''  # as TransformerConfig.layer_pattern ('N' layers need 'rope_2d')
  dropout_rate: float = 0.0  # residual and embedding dropout
  use_bias: bool = True
  scan_layers: bool = False
  share_layers: bool = False
  remat: bool = False
  dtype: str = 'float32'
  capture_attention: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'attention', _attention_config(self.attention))
    size = tuple(self.image_size)
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
      raise ValueError(f'image_size must be (height, width) of positive ints, got '
                       f'{self.image_size!r}')
    object.__setattr__(self, 'image_size', size)
    _check_positive(self, 'channels', 'num_classes', 'patch_size', 'd_model', 'd_ff',
                    'num_layers')
    if size[0] % self.patch_size or size[1] % self.patch_size:
      raise ValueError(f'patch_size={self.patch_size} does not divide image_size={size}')
    if self.d_model % self.num_heads:
      raise ValueError(f'd_model={self.d_model} is not divisible by num_heads={self.num_heads}')
    _check_choice('activation', self.activation, ACTIVATIONS)
    _check_choice('norm', self.norm, NORMS)
    _check_choice('norm_position', self.norm_position, NORM_POSITIONS)
    _check_choice('positional', self.positional, VIT_POSITIONALS)
    _check_choice('pooling', self.pooling, POOLINGS)
    _check_choice('dtype', self.dtype, DTYPES)
    _check_rate(self, 'dropout_rate')
    if self.positional == 'sinusoidal_2d' and self.d_model % 4:
      raise ValueError(f'positional=sinusoidal_2d needs d_model divisible by 4, got '
                       f'{self.d_model}')
    if self.positional == 'rope_2d' and self.head_dim % 4:
      raise ValueError(f'positional=rope_2d needs head_dim divisible by 4, got {self.head_dim}')
    _check_layer_pattern(self, IN_ATTENTION_POSITIONALS_2D)

  @property
  def grid(self) -> tuple[int, int]:
    """(rows, columns) of the patch grid."""
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (*self.image_size, self.channels)

  @property
  def pad_skip_chunk(self) -> int:
    return 0  # Every patch is real: no padding rows to skip in the feed-forward layers.


_VIT_ATTENTION = dict(rope_base=100.0)
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    # CPU minutes on the 8x8 digits: 2x2 patches, 16 of them (+ the class token).
    'tiny': dict(image_size=(8, 8), channels=1, num_classes=10, patch_size=2, d_model=64,
                 d_ff=128, num_layers=4, attention=dict(_VIT_ATTENTION, num_heads=4)),
    # ViT-S/16 (Touvron et al. 2021, DeiT-S) and ViT-B/16 (Dosovitskiy et al. 2021), 224x224.
    'small': dict(d_model=384, d_ff=1536, num_layers=12,
                  attention=dict(_VIT_ATTENTION, num_heads=6)),
    'base': dict(d_model=768, d_ff=3072, num_layers=12,
                 attention=dict(_VIT_ATTENTION, num_heads=12)),
}


def vit_config(variant: str = 'base', **overrides: Any) -> ViTConfig:
  """The named ViT size (`tiny`, `small`, `base`) with `overrides` applied; attention options
  go in `attention=dict(...)`, merged with the size's own."""
  return _build(ViTConfig, VIT_VARIANTS, variant, overrides)
