"""Transformer blocks and models (Vaswani et al. 2017): encoder-decoder, decoder-only LM,
encoder classifier. All take int32 tokens (pad 0, BOS 1, EOS 2) and return float32 logits.

Layers stack either in a Python loop (`layer_0`, `layer_1`, ...) or, with
`config.scan_layers`, as one `nn.scan` over a module named `layers` whose parameters (and
cache, and sown attention weights) carry a leading `[num_layers]` axis with logical name
`layers`. `config.remat` wraps each layer in `nn.remat`. With `config.share_layers` (ALBERT,
Lan et al. 2020) the stack is an `nn.scan` whose parameters are broadcast, one layer's weights
applied `num_layers` times, while its cache and sown weights keep one entry per application.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models import decoding, modifiers, names, value_residual
from attn_jax.models import sequence_parallel as sp
from attn_jax.models.attention import MultiHeadAttention, partitioned
from attn_jax.models.configs import LAYER_POSITIONALS, AttentionConfig, TransformerConfig
from attn_jax.models.layers import Dropout, Embedder, FeedForward, make_norm, shift_right
from attn_jax.ops import keywords
from attn_jax.ops.block_mask import DEFAULT_BLOCK
from attn_jax.ops.kernels.blocks import VISIT_BLOCK
from attn_jax.ops.shapes import Dims
from attn_jax.tokens import BOS_ID, PAD_ID


def layer_attention(cfg: TransformerConfig, *, causal: bool, self_attention: bool,
                    kind: str = 'G') -> tuple[AttentionConfig, str]:
  """The attention config and in-attention positions of one layer: the one place where a
  layer's role narrows the model's `cfg.attention`.

  `kind` ('G', 'L', 'N': see `layer_pattern`) says whether self-attention keeps the sliding
  window ('L') and the positions ('N' drops them); cross-attention gets neither, nor the
  other self-attention-only options; only bidirectional self-attention aggregates backward.
  `cfg` may also be a `ViTConfig`, whose in-attention positions are 'rope_2d'.
  """
  attn = cfg.attention
  if not self_attention:
    return attn.for_cross(), 'none'
  changes: dict[str, Any] = {}
  if kind != 'L':
    changes['sliding_window'] = None
  if causal:
    changes['aggregation'] = 'forward'
  in_attention = cfg.positional != 'none' and cfg.positional in LAYER_POSITIONALS and kind != 'N'
  return (dataclasses.replace(attn, **changes) if changes else attn,
          cfg.positional if in_attention else 'none')


def _attention(cfg: TransformerConfig, *, causal: bool, self_attention: bool, name: str,
               capture: bool, kind: str = 'G') -> MultiHeadAttention:
  config, positional = layer_attention(cfg, causal=causal, self_attention=self_attention,
                                       kind=kind)
  return MultiHeadAttention(config, is_causal=causal, cross_attention=not self_attention,
                            positional=positional, use_bias=cfg.use_bias,
                            dtype=cfg.compute_dtype, capture_attention=capture, name=name)


def shared_block_masks(cfg: Any, *, causal: bool, shape: tuple[int, int], dtype: Any,
                       mask: jax.Array | None, segment_ids: jax.Array | None, num_layers: int,
                       train: bool) -> dict[str, ops.BlockMask] | None:
  """The block masks a stack's self-attention layers share, one per layer kind, built once per
  step (a layer that built its own would classify the same blocks again in every layer).

  None where the layers' attention would not use one: a kernelized kind, backward aggregation,
  talking heads, memory slots (keys the mask does not cover), context parallelism, or an
  implementation (given, or the dispatcher's choice for these shapes) that is neither the
  blockwise loop nor the fused kernels.
  """
  attn = cfg.attention
  if (not num_layers or attn.kind != 'softmax' or (attn.aggregation != 'forward' and not causal)
      or attn.talking_heads or attn.num_memory_kv or sp.sequence_devices() > 1):
    return None
  batch, length = shape
  backend = jax.default_backend()
  implementation = attn.implementation
  if implementation is None:
    query = jax.ShapeDtypeStruct((batch, length, attn.num_heads, cfg.head_dim), dtype)
    implementation = ops.choose_implementation(
        query, query, return_weights=False, dropout_rate=attn.dropout_rate if train else 0.0,
        bias_fn=None, q_offset=0, open_attention=True, backend=backend,
        pallas_ok=backend in ('gpu', 'tpu'))
  if implementation not in ('blockwise', 'pallas'):
    return None
  block = VISIT_BLOCK if implementation == 'pallas' else DEFAULT_BLOCK
  dims = Dims(batch, length, length, attn.num_heads, attn.kv_heads, cfg.head_dim, cfg.head_dim)
  masks = {}
  for kind in sorted({cfg.layer_kind(i) for i in range(num_layers)}):
    layer, _ = layer_attention(cfg, causal=causal, self_attention=True, kind=kind)
    window = None
    if layer.sliding_window is not None:
      window = (layer.sliding_window, 0 if causal else layer.sliding_window)
    mask_mod = keywords.keyword_mask_mod(
        dims=dims, mask=mask, is_causal=causal, local_window=window, segment_ids=segment_ids,
        mask_mod=modifiers.resolve_mod(layer.mask_mod, 'mask_mod'))
    masks[kind] = ops.block_mask(mask_mod, batch=batch, heads=attn.num_heads, q_len=length,
                                 block_size=block)
  return masks


class _Block(nn.Module):
  """Shared residual wiring of encoder and decoder layers; `kind` is the layer's
  self-attention kind ('G', 'L', 'N': see `TransformerConfig.layer_pattern`)."""
  config: TransformerConfig
  deterministic: bool = True
  decode: bool = False
  capture: bool = False
  kind: str = 'G'

  def residual(self, x: jax.Array, fn, name: str) -> jax.Array:
    """Pre-LN `x + drop(fn(norm(x)))` or the paper's post-LN `norm(x + drop(fn(x)))`."""
    cfg = self.config
    drop = Dropout(cfg.dropout_rate)
    if cfg.norm_position == 'pre':
      return x + drop(fn(make_norm(cfg, f'norm_{name}')(x)), deterministic=self.deterministic)
    return make_norm(cfg, f'norm_{name}')(x + drop(fn(x), deterministic=self.deterministic))

  def ffn(self, x: jax.Array, needed: jax.Array | None) -> jax.Array:
    """The FFN sublayer; bool `needed` `[batch, length]` marks the tokens whose outputs can
    reach a real token (None = all): the others are skipped by chunk and come back as 0."""
    cfg = self.config

    def feed_forward(h):
      mlp = FeedForward(cfg, name='mlp')
      run = lambda m, h: m(h, deterministic=self.deterministic)  # noqa: E731
      chunk = cfg.pad_skip_chunk
      if (needed is None or chunk == 0 or self.decode or self.capture
          or self.is_initializing() or h.shape[0] * h.shape[1] <= chunk):
        return run(mlp, h)

      def run_chunk(active, rows):
        return nn.cond(active, lambda m, r: run(m, r).astype(r.dtype),
                       lambda m, r: jnp.zeros_like(r), mlp, rows)

      flat = ops.map_valid_chunks(run_chunk, h.reshape(-1, h.shape[-1]), needed.reshape(-1),
                                  chunk=chunk)
      return flat.reshape(h.shape)

    return self.residual(x, feed_forward, 'mlp')

  def self_attention(self, carry, attn, **kwargs):
    """The self-attention sublayer on `carry`: the hidden states, or `(hidden, StackState)`
    when a variant needs the layer's depth or the first layer's values (see
    `value_residual`); returns the same structure, the state advanced past this layer."""
    x, stack = carry if isinstance(carry, tuple) else (carry, None)
    first = []

    def sublayer(h):
      if stack is None:
        return attn(h, **kwargs)
      out = attn(h, stack=stack, **kwargs)
      if isinstance(out, tuple):  # value residual: the first layer's values come back
        out, values = out
        first.append(values)
      return out

    x = self.residual(x, sublayer, 'self')
    if stack is None:
      return x
    return x, value_residual.advance(stack, first[0] if first else None)


def _hidden(carry):
  return carry[0] if isinstance(carry, tuple) else carry


def _with_hidden(carry, x):
  return (x, carry[1]) if isinstance(carry, tuple) else x


class EncoderLayer(_Block):
  """Bidirectional self-attention + FFN. `carry`: `x` `[batch, length, d_model]` (or `(x,
  StackState)`, see `_Block.self_attention`) -> the same structure."""

  @nn.compact
  def __call__(self, carry, mask, segment_ids, positions, needed=None, block_masks=None):
    attn = _attention(self.config, causal=False, self_attention=True, name=names.ENCODER_SELF,
                      capture=self.capture, kind=self.kind)
    block_mask = None if block_masks is None else block_masks[self.kind]
    carry = self.self_attention(carry, attn, mask=mask, segment_ids=segment_ids,
                                positions=positions, block_mask=block_mask,
                                deterministic=self.deterministic)
    return _with_hidden(carry, self.ffn(_hidden(carry), needed)), None


class DecoderLayer(_Block):
  """Causal self-attention, cross-attention to `encoded` (if `cross`), FFN.

  With `decode`, the cross-attention keys/values of `encoded` are cached by the call that
  passes `encoded` (the prefill); later steps pass `encoded=None` and reuse them.
  """
  cross: bool = False

  @nn.compact
  def __call__(self, carry, encoded, cross_mask, segment_ids, cross_segment_ids, positions,
               needed=None, block_masks=None):
    cfg = self.config
    if encoded is not None and not self.cross:
      raise ValueError('encoded given to a decoder layer without cross-attention (cross=False)')
    if self.cross and encoded is None and not self.decode:
      raise ValueError('a decoder layer with cross-attention needs encoded (or decode=True '
                       'after a prefill with encoded)')
    attn = _attention(cfg, causal=True, self_attention=True, name=names.DECODER_SELF,
                      capture=self.capture, kind=self.kind)
    block_mask = None if block_masks is None else block_masks[self.kind]
    carry = self.self_attention(carry, attn, segment_ids=segment_ids, positions=positions,
                                block_mask=block_mask, deterministic=self.deterministic,
                                decode=self.decode)
    y = _hidden(carry)
    if self.cross:
      cross = _attention(cfg, causal=False, self_attention=False, name=names.CROSS,
                         capture=self.capture)
      y = self.residual(y, lambda h: cross(h, encoded, mask=cross_mask,
                                           segment_ids=cross_segment_ids,
                                           deterministic=self.deterministic,
                                           decode=self.decode), 'cross')
    return _with_hidden(carry, self.ffn(y, needed)), None


def stack_layers(cfg: TransformerConfig, layer_cls, num_layers: int, x: jax.Array,
                 *args: Any, **attrs: Any) -> jax.Array:
  """Applies `num_layers` layers, unrolled or under `nn.scan`; call from a compact method.

  `cfg` is a `TransformerConfig` or a `ViTConfig` (the fields `configs._LayerStack` lists).
  What flows from layer to layer is the hidden states, or `(hidden, StackState)` when the
  attention needs each layer's depth or the first layer's values (`value_residual`): under
  `nn.scan` the state is part of the scan carry (an int32 depth, the values from zeros).
  """
  stacked = cfg.scan_layers or cfg.share_layers
  if value_residual.needs_stack_state(cfg.attention):
    x = (x, value_residual.initial_state(cfg.attention, x, cfg.head_dim, scanned=stacked))
  return _hidden(_stack(cfg, layer_cls, num_layers, x, *args, **attrs))


def _stack(cfg: TransformerConfig, layer_cls, num_layers: int, x, *args: Any, **attrs: Any):
  cls = layer_cls
  if cfg.remat:
    # Under scan, CSE across iterations cannot happen, so skip the barrier (faster).
    cls = nn.remat(cls, prevent_cse=not (cfg.scan_layers or cfg.share_layers))
  if cfg.share_layers:
    # ALBERT: the parameters are broadcast (created once, read by every iteration), the
    # cache and the sown weights stacked, one per application of the shared layer.
    shared = nn.scan(
        cls, variable_broadcast='params', variable_axes={'cache': 0, names.INTERMEDIATES: 0},
        split_rngs={'params': False, 'dropout': True}, in_axes=(nn.broadcast,) * len(args),
        length=num_layers)
    x, _ = shared(cfg, name=names.SHARED_LAYER, kind=cfg.layer_kind(0), **attrs)(x, *args)
    return x
  if cfg.scan_layers:
    scanned = nn.scan(
        cls, variable_axes={'params': 0, 'cache': 0, names.INTERMEDIATES: 0},
        split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,) * len(args),
        length=num_layers, metadata_params={nn.PARTITION_NAME: names.SCANNED_LAYERS})
    # The config forbids scan with layers of different kinds: every layer is layer 0's kind.
    x, _ = scanned(cfg, name=names.SCANNED_LAYERS, kind=cfg.layer_kind(0), **attrs)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = cls(cfg, name=names.layer_name(i), kind=cfg.layer_kind(i), **attrs)(x, *args)
  return x


def _valid(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """bool `[batch, length]`: real tokens (non-pad, or non-zero segment when packed)."""
  return tokens != PAD_ID if segment_ids is None else segment_ids != 0


class Encoder(nn.Module):
  """Embedding + positions + `num_encoder_layers` encoder layers (+ final norm if pre-LN)."""
  config: TransformerConfig
  embedder: nn.Module
  cls_token: bool = False  # prepend a learned [CLS] vector (EncoderClassifier)

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, *, train: bool = False,
               capture: bool = False) -> jax.Array:
    """`tokens` int `[batch, L]` -> `[batch, L (+1 with cls_token), d_model]`."""
    cfg = self.config
    x = self.embedder(tokens, positions)
    valid = _valid(tokens, segment_ids)
    if self.cls_token:
      cls = self.param('cls', partitioned(nn.initializers.normal(0.02), ('embed',)),
                       (cfg.d_model,), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
      valid = jnp.pad(valid, ((0, 0), (1, 0)), constant_values=True)
      if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
      if positions is not None:
        positions = jnp.pad(positions + 1, ((0, 0), (1, 0)))
    x = Dropout(cfg.dropout_rate)(x, deterministic=not train)
    mask = valid[:, None, None, :]  # [batch, 1, 1, L]: no query attends to padding.
    # Padding is hidden from every query as a key, so only real tokens' outputs are needed
    # (skipped by sorting tokens: not across devices when the sequence is split over them).
    needed = valid if sp.sequence_devices() == 1 else None
    block_masks = None if capture else shared_block_masks(
        cfg, causal=False, shape=x.shape[:2], dtype=x.dtype, mask=mask, segment_ids=segment_ids,
        num_layers=cfg.num_encoder_layers, train=train)
    x = stack_layers(cfg, EncoderLayer, cfg.num_encoder_layers, x, mask, segment_ids, positions,
                     needed, block_masks, deterministic=not train, capture=capture)
    if cfg.norm_position == 'pre':
      x = make_norm(cfg, 'final_norm')(x)
    return x


class Decoder(nn.Module):
  """Embedding + positions + decoder layers (cross-attending to `encoded` if `cross`) +
  output logits (tied or separate)."""
  config: TransformerConfig
  embedder: nn.Module
  vocab_size: int
  cross: bool = False

  def setup(self):
    cfg = self.config
    if not cfg.tie_output:
      self.logits = nn.Dense(
          self.vocab_size, dtype=cfg.compute_dtype,
          kernel_init=partitioned(nn.initializers.lecun_normal(), ('embed', 'vocab')),
          bias_init=partitioned(nn.initializers.zeros, ('vocab',)))

  @nn.compact
  def __call__(self, decoder_inputs: jax.Array, encoded: jax.Array | None = None, *,
               cross_mask: jax.Array | None = None, segment_ids=None, cross_segment_ids=None,
               positions: jax.Array | None = None, train: bool = False, decode: bool = False,
               capture: bool = False, return_hidden: bool = False) -> jax.Array:
    """`decoder_inputs` int `[batch, T]` (already shifted) -> float32 `[batch, T, vocab]`, or
    with `return_hidden` the final hidden states `[batch, T, d_model]` (see `project`).

    `encoded` `[batch, Ls, d_model]`; with `decode`, only the prefill call passes it (its
    cross-attention keys/values are cached) and later calls pass None.
    """
    cfg = self.config
    if decode and positions is None:
      # Absolute positions continue from the tokens decoded so far.
      initialized = self.has_variable('cache', 'position_index')
      index = self.variable('cache', 'position_index', lambda: jnp.array(0, jnp.int32))
      positions = index.value + jnp.arange(decoder_inputs.shape[1])
      if initialized:
        index.value = index.value + decoder_inputs.shape[1]
    split = not decode and sp.sequence_devices() > 1
    if split:  # context parallelism: the causal stack runs in the zig-zag layout
      if positions is None:
        positions = jnp.arange(decoder_inputs.shape[1])
      positions = jnp.broadcast_to(positions, decoder_inputs.shape)
      decoder_inputs, positions, segment_ids = (
          sp.to_layout(x, causal=True) for x in (decoder_inputs, positions, segment_ids))
    y = self.embedder(decoder_inputs, positions)
    y = Dropout(cfg.dropout_rate)(y, deterministic=not train)
    cross_ids = None
    if cross_segment_ids is not None:
      # Packed sources with unpacked targets: every target token is in segment 1.
      q_ids = jnp.ones_like(decoder_inputs) if segment_ids is None else segment_ids
      cross_ids = (q_ids, cross_segment_ids)
    needed = None
    if not decode and not split:
      # A real token reads every earlier position (causal, and padding is not masked as a key
      # here), so everything up to a row's last real token is needed; trailing padding is not.
      valid = _valid(decoder_inputs, segment_ids)
      needed = jnp.flip(jnp.cumsum(jnp.flip(valid, axis=1), axis=1) > 0, axis=1)
    block_masks = None if decode or capture else shared_block_masks(
        cfg, causal=True, shape=y.shape[:2], dtype=y.dtype, mask=None, segment_ids=segment_ids,
        num_layers=cfg.num_decoder_layers, train=train)
    y = stack_layers(cfg, DecoderLayer, cfg.num_decoder_layers, y, encoded, cross_mask,
                     segment_ids, cross_ids, positions, needed, block_masks,
                     deterministic=not train, decode=decode, capture=capture, cross=self.cross)
    if cfg.norm_position == 'pre':
      y = make_norm(cfg, 'final_norm')(y)
    if split:
      y = sp.from_layout(y, causal=True)
    return y if return_hidden else self.project(y)

  def project(self, hidden: jax.Array) -> jax.Array:
    """Hidden states `[..., d_model]` -> float32 logits `[..., vocab]`."""
    if self.config.tie_output:
      return self.embedder.attend(hidden)
    return self.logits(hidden).astype(jnp.float32)


def _capture(config, capture_attention: bool | None) -> bool:
  return config.capture_attention if capture_attention is None else capture_attention


class EncoderDecoder(nn.Module):
  """Sequence-to-sequence Transformer (translation, algorithmic tasks)."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      self.embed = Embedder(cfg, cfg.vocab_size)
      source = target = self.embed
    else:
      self.source_embed = Embedder(cfg, cfg.vocab_size)
      self.target_embed = Embedder(cfg, cfg.target_vocab_size)
      source, target = self.source_embed, self.target_embed
    self.encoder = Encoder(cfg, source)
    self.decoder = Decoder(cfg, target, cfg.target_vocab_size, cross=True)

  def encode(self, inputs, *, inputs_segmentation=None, inputs_positions=None, train=False,
             capture_attention=None):
    """`inputs` int `[batch, Ls]` -> `[batch, Ls, d_model]`."""
    return self.encoder(inputs, inputs_segmentation, inputs_positions, train=train,
                        capture=_capture(self.config, capture_attention))

  def decode(self, encoded, inputs, decoder_inputs, *, inputs_segmentation=None,
             targets_segmentation=None, targets_positions=None, train=False, decode=False,
             capture_attention=None, return_hidden=False):
    """Decoder over already-shifted `decoder_inputs` `[batch, Lt]` -> `[batch, Lt, vocab]`.

    `inputs` (`[batch, Ls]`) only supply the cross-attention padding mask. With
    `decode=True`, `targets_segmentation` marks real (1) vs padding (0) decoder tokens, and
    `encoded` is needed only by the first (prefill) call, which caches its cross-attention
    keys/values; later steps pass `encoded=None`.
    """
    cross_mask = _valid(inputs, inputs_segmentation)[:, None, None, :]
    return self.decoder(
        decoder_inputs, encoded, cross_mask=cross_mask, segment_ids=targets_segmentation,
        cross_segment_ids=None if decode else inputs_segmentation,
        positions=targets_positions, train=train, decode=decode,
        capture=_capture(self.config, capture_attention), return_hidden=return_hidden)

  def project(self, hidden: jax.Array) -> jax.Array:
    """`__call__(..., return_hidden=True)`'s states `[..., d_model]` -> float32 logits."""
    return self.decoder.project(hidden)

  def __call__(self, inputs, targets, *, inputs_segmentation=None, targets_segmentation=None,
               inputs_positions=None, targets_positions=None, train=False,
               capture_attention=None, return_hidden=False):
    """Teacher-forced logits: float32 `[batch, Lt, vocab]`, `logits[:, i]` predicts
    `targets[:, i]`; with `return_hidden`, the decoder's final states `[batch, Lt, d_model]`
    instead (`project` maps them to logits, e.g. for a loss that skips padding)."""
    if inputs.ndim != 2 or targets.ndim != 2 or inputs.shape[0] != targets.shape[0]:
      raise ValueError(f'inputs and targets must be [batch, length] with equal batch, got '
                       f'{inputs.shape} and {targets.shape}')
    encoded = self.encode(inputs, inputs_segmentation=inputs_segmentation,
                          inputs_positions=inputs_positions, train=train,
                          capture_attention=capture_attention)
    decoder_inputs = shift_right(targets, targets_segmentation, targets_positions, BOS_ID)
    return self.decode(encoded, inputs, decoder_inputs, inputs_segmentation=inputs_segmentation,
                       targets_segmentation=targets_segmentation,
                       targets_positions=targets_positions, train=train,
                       capture_attention=capture_attention, return_hidden=return_hidden)

  @nn.nowrap
  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    return decoding.encoder_decoder_fns(self, params, inputs, max_decode_len)


class DecoderLM(nn.Module):
  """Decoder-only language model (no cross-attention)."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.attention.aggregation != 'forward':
      raise ValueError(f'attention.aggregation={cfg.attention.aggregation!r} applies to an '
                       "encoder's self-attention; DecoderLM has none (and summing a causal "
                       "decoder's weights over queries would leak the future)")
    self.embed = Embedder(cfg, cfg.vocab_size)
    self.decoder = Decoder(cfg, self.embed, cfg.vocab_size)

  def __call__(self, inputs, *, segment_ids=None, positions=None, train=False, decode=False,
               capture_attention=None, return_hidden=False):
    """`inputs` int `[batch, L]` -> float32 `[batch, L, vocab]` (with `return_hidden`, the
    final states `[batch, L, d_model]`; see `project`).

    Teacher forcing: the model shifts `inputs` right (BOS at each segment start), so
    `logits[:, i]` predicts `inputs[:, i]`. With `decode=True` the tokens are fed as
    they are (the caller starts with BOS) and appended to the cache; `segment_ids`
    then marks real (1) vs padding (0) tokens.
    """
    if inputs.ndim != 2:
      raise ValueError(f'inputs must be [batch, length], got {inputs.shape}')
    decoder_inputs = inputs if decode else shift_right(inputs, segment_ids, positions, BOS_ID)
    return self.decoder(decoder_inputs, segment_ids=segment_ids, positions=positions,
                        train=train, decode=decode,
                        capture=_capture(self.config, capture_attention),
                        return_hidden=return_hidden)

  def project(self, hidden: jax.Array) -> jax.Array:
    """`__call__(..., return_hidden=True)`'s states `[..., d_model]` -> float32 logits."""
    return self.decoder.project(hidden)

  @nn.nowrap
  def decoding_fns(self, params, *, inputs=None, prompt=None, max_decode_len):
    return decoding.decoder_lm_fns(self, params, prompt if prompt is not None else inputs,
                                   max_decode_len)


class EncoderClassifier(nn.Module):
  """Encoder + pooling + linear head: `inputs` `[batch, L]` -> float32 `[batch, classes]`.

  Pooling: 'cls' prepends a learned [CLS] vector and reads its output; 'mean' averages the
  outputs of non-pad tokens (non-zero segment ids when given).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, *, segment_ids=None, train=False, capture_attention=None):
    cfg = self.config
    if inputs.ndim != 2:
      raise ValueError(f'inputs must be [batch, length], got {inputs.shape}')
    embedder = Embedder(cfg, cfg.vocab_size, name='embed')
    x = Encoder(cfg, embedder, cls_token=cfg.pooling == 'cls', name='encoder')(
        inputs, segment_ids, train=train, capture=_capture(cfg, capture_attention))
    if cfg.pooling == 'cls':
      pooled = x[:, 0]
    else:
      valid = _valid(inputs, segment_ids).astype(jnp.float32)[..., None]
      pooled = jnp.sum(x.astype(jnp.float32) * valid, axis=1) / jnp.maximum(
          jnp.sum(valid, axis=1), 1.0)
    pooled = Dropout(cfg.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(cfg.num_classes, name='head',
                    kernel_init=partitioned(nn.initializers.lecun_normal(), ('embed', None)),
                    bias_init=partitioned(nn.initializers.zeros, (None,)))(pooled).astype(
                        jnp.float32)
