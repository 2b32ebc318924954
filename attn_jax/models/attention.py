"""Attention modules: multi-head (with an autoregressive KV cache) and RNN-style attention.

The maths lives in `attn_jax.ops`; these modules own the parameters, the cache and the
bookkeeping of positions. Parameters carry logical axis names (`embed`, `heads`, `kv_heads`,
`kv`, `relpos_buckets`) so training code can shard them with `nn.logical_to_mesh_sharding`;
`init` therefore returns `nn.Partitioned` boxes (`nn.unbox` gives plain arrays, and
`apply` accepts either).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import ops
from attn_jax.models import (
  differential,
  gating,
  latent,
  memory,
  modifiers,
  names,
  talking_heads,
  value_residual,
)
from attn_jax.models import (
  sequence_parallel as sp,
)
from attn_jax.models.configs import AttentionConfig
from attn_jax.models.modifiers import LayerInfo
from attn_jax.models.names import CROSS_CACHE, SLOT_CACHE  # noqa: F401  (re-exported)
from attn_jax.models.projection import (  # noqa: F401  (re-exported)
  Projection,
  default_kernel_init,
  partitioned,
)

POSITIONAL = ('none', 'rope', 'alibi', 't5', 'rope_2d')

# Slots per chunk of the decoding loop over the filled cache. Small enough that a short
# sequence reads little past its end, big enough that the loop's per-chunk overhead stays
# small against the chunk's attention (`experiments/bench_decode.py --beam`).
DECODE_CHUNK = 64


def slot_chunk(slots: int) -> int:
  """Chunk size of a cache with `slots` slots (see `cache_slots`)."""
  return DECODE_CHUNK if slots % DECODE_CHUNK == 0 else slots


def cache_slots(max_len: int) -> int:
  """Slots of a decoding cache asked to hold `max_len` tokens: up to `DECODE_CHUNK` as
  asked (one chunk), beyond that rounded up to whole chunks."""
  return max_len if max_len <= DECODE_CHUNK else -(-max_len // DECODE_CHUNK) * DECODE_CHUNK


class MultiHeadAttention(nn.Module):
  """Multi-head attention (Vaswani et al. 2017) with GQA/MQA, position options and a cache.

  Parameter names and shapes match `flax.linen.MultiHeadDotProductAttention` (`query`,
  `key`, `value` kernels `[features, heads, head_dim]`, `out` `[heads, head_dim, features]`)
  except that `key`/`value` have `num_kv_heads` heads.

  Every option is in `config` (an `AttentionConfig`, validated when it is built; see its
  fields); what the attributes below add is where this layer sits in a model. Score
  functions run in one chain, in this order: the position bias (`positional` 'alibi'/'t5'),
  the learned `modifiers`, the config's `score_mod`, the soft-cap, and (shared-QK) the
  penalty on a token's own key. Masks and score functions see absolute positions: sequence
  indices, and when decoding the tokens' stored positions.

  Attributes:
    config: the attention options (heads, kind, window, functions, modifiers, ...).
    is_causal: mask future keys (decoder self-attention). Needed for self-attention with
      `decode=True`.
    cross_attention: attend from `inputs_q` to another sequence, `inputs_kv` (encoder-decoder
      attention); False (self-attention) refuses `inputs_kv`. Says which cache a
      `decode=True` call uses. Its config must leave the self-attention options off
      (`AttentionConfig.for_cross()`).
    positional: what this layer puts inside attention: 'none', 'rope' (rotate q, k), 'alibi'
      or 't5' (position biases: `modifiers.POSITION_BIASES`), 'rope_2d' (rotate q, k by the
      (row, column) `positions` `[batch, len, 2]` of image patches; no decoding).
    head_dim: per-head size; None = features // num_heads.
    out_features: output size; None = the query's feature size.
    use_bias: biases in the projections.
    capture_attention: sow float32 weights `[batch, heads, q, kv]` into 'intermediates'
      as `attention_weights` (also settable per call).

  With `config.kind='performer'` the FAVOR+ projection is no parameter: it is drawn at trace
  time from `config.performer_seed` folded with this module's path, so it is fixed during
  training and the same at decoding (layers under `nn.scan` share one path, hence one).
  `config.shared_qk`: the keys are the L2-normalized queries, logits unscaled, and each
  position's own key gets `-1e5` (Reformer); there is no `key` projection.
  `config.value_projection`/`key_projection` False take the values (keys) from the input
  itself, split into heads (He & Hofmann 2024). `config.share_head_projections`: one
  `[features, head_dim]` projection for all heads (Michel et al. 2019). `config.aggregation=
  'backward'`: `sum_i alpha_ij v_i` per key (`ops.backward_aggregation`), bidirectional
  self-attention only; a key padding mask then hides padding as queries too.

  Variants, each in its own module, entered at one point (`_attend`, and the projections for
  MLA): `config.kind='latent'` (`latent.py`: compressed keys/values under `latent/`, the
  decode cache holds the latent and the shared RoPE key only), `kind='differential'`
  (`differential.py`: two maps per head, its depth from `stack`), `config.talking_heads`,
  `config.num_memory_kv` (`talking_heads.py`, `memory.py`), `config.output_gate`
  (`gating.py`: a `gate` projection) and `config.value_residual` (`value_residual.py`).
  """
  config: AttentionConfig
  is_causal: bool = False
  cross_attention: bool = False
  positional: str = 'none'
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  capture_attention: bool = False

  @property
  def num_heads(self) -> int:
    return self.config.num_heads

  def _performer_projection(self, head_dim: int) -> jax.Array:
    """The fixed FAVOR+ projection of this layer, computed while tracing (a constant)."""
    path = zlib.crc32('/'.join(self.scope.path).encode())
    with jax.ensure_compile_time_eval():
      rng = jax.random.fold_in(jax.random.key(self.config.performer_seed), np.uint32(path))
      return ops.performer_projection(rng, self.config.performer_features, head_dim)

  def _check(self, features: int) -> tuple[int, int]:
    """(kv heads, head dim); the rules for this layer's attributes with its config."""
    if not isinstance(self.config, AttentionConfig):
      raise ValueError(f'MultiHeadAttention needs config=AttentionConfig(...), got '
                       f'{type(self.config).__name__}')
    self.config.check_layer(positional=self.positional, is_causal=self.is_causal,
                            cross_attention=self.cross_attention)
    if self.head_dim is None and features % self.num_heads:
      raise ValueError(
          f'input features {features} are not divisible by num_heads={self.num_heads}')
    head_dim = self.head_dim or features // self.num_heads
    if self.config.kind == 'differential' and head_dim % 2:
      raise ValueError(f"kind='differential' splits each head in two: head_dim {head_dim} must "
                       'be even')
    return self.config.kv_heads, head_dim

  def _score_mod(self, kv_heads: int, head_dim: int):
    """The layer's score functions as one (see the class docstring for the order): each
    modifier's parameters are created here, under the names it declares."""
    cfg = self.config
    layer = LayerInfo(cfg, self.num_heads, kv_heads, head_dim, self.is_causal)
    chosen = [modifiers.POSITION_BIASES[self.positional]] if (
        self.positional in modifiers.POSITION_BIASES) else []
    chosen += [modifiers.resolve_modifier(name) for name in cfg.modifier_names]
    fns, owned = [], set()
    for modifier in chosen:
      specs = dict(modifier.params(layer))
      clash = sorted(owned & set(specs))
      if clash:
        raise ValueError(f'two attention modifiers both declare parameters {clash}')
      owned |= set(specs)
      values = {name: self.param(name, partitioned(spec.init, spec.axes), spec.shape,
                                 self.param_dtype) for name, spec in specs.items()}
      fns.append(modifier.score_mod(values, layer))
    cap = None if cfg.logit_softcap is None else ops.score_mods.soft_cap(cfg.logit_softcap)
    # The shared-QK self penalty comes last: a soft cap would bound it.
    own_key = ops.exclude_self() if cfg.shared_qk else None
    return ops.score_mods.chain(*fns, modifiers.resolve_mod(cfg.score_mod, 'score_mod'), cap,
                                own_key)

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
               mask: jax.Array | None = None, segment_ids=None,
               positions: jax.Array | None = None, block_mask: ops.BlockMask | None = None,
               deterministic: bool = True, decode: bool = False,
               capture_attention: bool | None = None,
               stack: value_residual.StackState | None = None):
    """Attends from `inputs_q` to itself, or to `inputs_kv` with `cross_attention=True`.

    Args:
      inputs_q: `[batch, q_len, features]`.
      inputs_kv: `[batch, kv_len, kv_features]`, only with `cross_attention=True`.
      mask: bool broadcasting to `[batch, heads, q_len, kv_len]`, True = attend.
      segment_ids: int `[batch, len]` (self-attention) or `(q_ids, kv_ids)`; attention
        stays within equal ids. In decode mode `[batch, q_len]`, 0 marking padding
        (e.g. the right padding of a ragged prompt), which the cache remembers.
      positions: int `[batch, q_len]` or `[q_len]` absolute positions for RoPE (and,
        in decode mode, ALiBi/T5); default `0..len-1`, or the cache index onwards. With
        `positional='rope_2d'`, `[batch, q_len, 2]` or `[q_len, 2]` (row, column), required.
      block_mask: the self-attention's whole mask, prebuilt (`ops.block_mask`) and shared by
        the layers of a stack (`transformer.shared_block_masks`): it then stands for `mask`,
        `segment_ids`, causality, the window and the config's `mask_mod`. Not with `decode`.
      deterministic: disables dropout.
      decode: use the 'cache' collection. Causal self-attention: the first (init) call
        sizes the cache from `inputs_q` `[batch, max_len, features]`; later calls append
        `q_len >= 1` tokens (a whole prompt prefills in one call) and attend causally
        to everything cached so far. Cross-attention (`cross_attention=True`): a call with
        `inputs_kv` projects and stores its keys/values; a call with `inputs_kv=None`
        attends to the stored ones, so a decoder projects the encoder output once.

    Returns:
      `[batch, q_len, out_features]` in `dtype`.
    """
    cfg = self.config
    features = inputs_q.shape[-1]
    kv_heads, head_dim = self._check(features)
    capture = self.capture_attention if capture_attention is None else capture_attention
    if inputs_q.ndim != 3:
      raise ValueError(f'inputs_q must be [batch, length, features], got {inputs_q.shape}')
    is_self = not self.cross_attention
    if is_self and inputs_kv is not None:
      raise ValueError('inputs_kv given to self-attention; set cross_attention=True to attend '
                       'to another sequence')
    if not is_self and inputs_kv is None and not decode:
      raise ValueError('cross_attention=True needs inputs_kv (or decode=True after a call '
                       'that cached its keys/values)')
    if decode and is_self and not self.is_causal:
      raise ValueError('self-attention with decode=True needs is_causal=True')
    cross_decode = decode and not is_self
    if cross_decode and self.positional != 'none':
      raise ValueError(f'cross-attention decoding takes no positional={self.positional!r}')
    if self.positional == 'rope_2d' and decode:
      raise ValueError("positional='rope_2d' (image patches) has no incremental decoding")
    if self.positional == 'rope_2d' and positions is None:
      raise ValueError("positional='rope_2d' needs positions [batch, len, 2] or [len, 2] "
                       '(row, column); got None')
    if decode and cfg.aggregation == 'backward':
      raise ValueError("aggregation='backward' has no incremental decoding")
    inputs_kv = inputs_q if is_self else inputs_kv

    dense = functools.partial(
        Projection, kernel_init=self.kernel_init, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype)
    mla = None
    if cfg.kind == 'latent':  # compressed keys/values; decoding caches the latent only
      mla = latent.LatentProjections(cfg, head_dim, use_bias=self.use_bias, dtype=self.dtype,
                                     param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                     name='latent')
      query, key, value = mla.absorbed(inputs_q) if decode else mla.naive(inputs_q)
    else:
      query, key, value = self._projections(dense, inputs_q, inputs_kv, kv_heads, head_dim,
                                            cross_decode)
    first_values = None
    if cfg.value_residual and is_self:
      value, first_values = value_residual.mix(self, value, stack, self.param_dtype)
    # Before `sinks`: a parameter's initial value depends on the order of creation.
    score_mod = self._score_mod(kv_heads, head_dim)
    sinks = None
    if cfg.sinks:
      sinks = self.param('sinks', partitioned(nn.initializers.zeros, ('heads',)),
                         (self.num_heads,), self.param_dtype)

    window = None
    if cfg.sliding_window is not None:
      window = (cfg.sliding_window, 0 if self.is_causal else cfg.sliding_window)
    kwargs: dict[str, Any] = dict(is_causal=self.is_causal, local_window=window, mask=mask,
                                  sinks=sinks)
    mask_mod = modifiers.resolve_mod(cfg.mask_mod, 'mask_mod')
    if cfg.shared_qk:
      kwargs['scale'] = 1.0
    if mla is not None:  # the absorbed form's queries are wider; the logits are the same
      kwargs['scale'] = mla.scale
    if decode and not cross_decode:
      windowed = cfg.sliding_window is not None
      cache = self._window_cache if windowed else self._decode_cache
      key, value, query, cache_kwargs = cache(query, key, value, segment_ids, positions)
      if windowed:
        # Causality and the window are counted in token positions: a ragged prompt's padding
        # slots must not take real keys' places in the window.
        kwargs.update(is_causal=False, local_window=None)
        mask_mod = ops.and_masks(ops.mask_mods.causal(),
                                 ops.mask_mods.sliding_window(cfg.sliding_window), mask_mod)
      cache_mask = cache_kwargs.pop('mask', None)
      q_positions, kv_positions = cache_kwargs.pop('positions')
      kwargs.update(cache_kwargs, mask=ops.combine_masks(mask, cache_mask))
      mask_mod, score_mod = _at_positions(mask_mod, score_mod, q_positions, kv_positions,
                                          cache_kwargs['q_offset'])
    else:
      if self.positional == 'rope':
        query = self._rope(query, positions)
        key = self._rope(key, positions if is_self else None)
      elif self.positional == 'rope_2d':  # self-attention only (AttentionConfig.check_layer)
        query = ops.rope_2d(query, positions, cfg.rope_base)
        key = ops.rope_2d(key, positions, cfg.rope_base)
      kwargs.update(segment_ids=segment_ids)
    if value is None:  # MLA's absorbed form: the values are the cached latent
      value = mla.latent_values(key)
    kwargs.update(mask_mod=mask_mod, score_mod=score_mod)
    if block_mask is not None and not decode and not capture:
      # The block mask already holds every mask of the call (built once for the stack).
      for name in ('mask', 'segment_ids', 'mask_mod', 'local_window'):
        kwargs.pop(name, None)
      kwargs.update(block_mask=block_mask, is_causal=False)

    dropout_rng = None
    if not deterministic and cfg.dropout_rate > 0.0:
      dropout_rng = self.make_rng('dropout')
    filled = kwargs.pop('length', None)
    beams = 1
    if cross_decode and query.shape[0] != key.shape[0]:
      query, kwargs, beams = _group_beams(query, key, kwargs)
    if cfg.aggregation == 'backward':
      result = self._backward_aggregation(query, key, value, kwargs, capture)
    else:
      context_parallel = is_self and not decode and not capture and (
          sp.sequence_devices() > 1)
      result = self._attend(query, key, value, kwargs, filled=filled, capture=capture,
                            head_dim=head_dim, dropout_rng=dropout_rng, beams=beams,
                            stack=stack, context_parallel=context_parallel)
    if beams > 1:
      result = result.reshape(result.shape[0] * beams, -1, *result.shape[2:])
    if mla is not None and decode:
      result = mla.output(result)
    if cfg.output_gate:
      result = gating.output_gate(dense, inputs_q, result)
    out = dense((self.out_features or features,), ('heads', 'kv', 'embed'), ('embed',),
                contract=2, name='out')(result)
    return out if first_values is None else (out, first_values)

  def _projections(self, dense, inputs_q, inputs_kv, kv_heads: int, head_dim: int,
                   cross_decode: bool):
    """Queries `[batch, q, heads, head_dim]`, keys and values `[batch, kv, kv_heads, ...]`
    from the layer's projections (or the input itself, the queries for shared-QK keys, the
    cross-attention cache)."""
    cfg = self.config

    def heads_projection(heads: int, axes: tuple[str, str, str], name: str):
      if not cfg.share_head_projections:
        return dense((heads, head_dim), axes, axes[1:], name=name)
      shared = dense((head_dim,), (axes[0], axes[2]), (axes[2],), name=name)
      return lambda x: jnp.broadcast_to(  # noqa: E731  one projection, every head
          shared(x)[..., None, :], (*x.shape[:-1], heads, head_dim))

    def split(x):  # the input itself as keys or values: [.., features] -> [.., kv_heads, f/h]
      return ops.split_heads(x.astype(self.dtype), kv_heads)

    query = heads_projection(self.num_heads, ('embed', 'heads', 'kv'), 'query')(inputs_q)
    key_dense = split if not cfg.key_projection else (
        None if cfg.shared_qk else heads_projection(kv_heads, ('embed', 'kv_heads', 'kv'),
                                                     'key'))
    value_proj = heads_projection(kv_heads, ('embed', 'kv_heads', 'kv'), 'value') if (
        cfg.value_projection) else split
    key_proj = key_dense
    if cfg.qk_norm:
      norm = functools.partial(nn.RMSNorm, epsilon=1e-6, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               scale_init=partitioned(nn.initializers.ones, ('kv',)))
      query = norm(name='query_norm')(query)
      if not cfg.shared_qk:
        key_norm = norm(name='key_norm')
        key_proj = lambda x: key_norm(key_dense(x))  # noqa: E731
    if cfg.shared_qk:
      # Reformer: the keys are the (normed) queries, of unit length; self-attention only.
      return query, ops.l2_normalize(query), value_proj(inputs_kv)
    if cross_decode:
      return query, *self._cross_cache(inputs_kv, key_proj, value_proj)
    return query, key_proj(inputs_kv), value_proj(inputs_kv)

  def _attend(self, query, key, value, kwargs, *, filled, capture, head_dim, dropout_rng,
              beams, stack, context_parallel=False):
    """The attention of the layer's kind and options (the dispatch point of the variants):
    `[batch, q, heads, v_dim]`; sows the weights when capturing."""
    cfg = self.config
    core = self._core(kwargs, filled=filled, capture=capture, head_dim=head_dim,
                      dropout_rng=dropout_rng, context_parallel=context_parallel)
    if cfg.kind == 'differential':
      result, weights = differential.attend(
          self, core, query, key, value, layer_index=0 if stack is None else stack.index,
          dtype=self.dtype, param_dtype=self.param_dtype)
    elif cfg.num_memory_kv:
      result, weights = memory.attend(
          self, core, query, key, value, config=cfg, scale=kwargs.get('scale'),
          dropout_rate=cfg.dropout_rate, dropout_rng=dropout_rng, param_dtype=self.param_dtype)
    else:
      result, weights, _ = core(query, key, value)
    if capture:
      if beams > 1:  # [B, H, beams * q, S] -> [B * beams, H, q, S]
        b, h, _, s_len = weights.shape
        weights = jnp.swapaxes(weights.reshape(b, h, beams, -1, s_len), 1, 2)
        weights = weights.reshape(b * beams, h, -1, s_len)
      self.sow(names.INTERMEDIATES, names.ATTENTION_WEIGHTS, weights)
    return result

  def _core(self, kwargs, *, filled, capture, head_dim, dropout_rng, context_parallel=False):
    """The layer's attention over its keys as one function, `core(q, k, v, *, return_lse=False,
    part=0) -> (out, weights | None, lse | None)`: the kind's op (talking heads, kernelized,
    the decode cache's prefix walk, or `ops.dot_product_attention`) with the layer's masks and
    score functions; `part` > 0 draws another dropout mask (differential attention's maps)."""
    cfg = self.config
    rate = 0.0 if dropout_rng is None else cfg.dropout_rate
    mixes = talking_heads.mixes(self, self.num_heads, self.param_dtype) if (
        cfg.talking_heads) else None

    def core(q, k, v, *, return_lse=False, part=0):
      rng = dropout_rng if dropout_rng is None or not part else jax.random.fold_in(
          dropout_rng, part)
      common = dict(dropout_rate=rate, dropout_rng=rng, **kwargs)
      if mixes is not None:
        common.pop('sinks')  # None: the config refuses sinks with talking heads
        out = ops.talking_heads_attention(q, k, v, pre_softmax=mixes[0], post_softmax=mixes[1],
                                          return_weights=capture, **common)
        return (*out, None) if capture else (out, None, None)
      attend, options = ops.dot_product_attention, dict(return_weights=capture)
      if cfg.kind == 'linear':
        attend = ops.linear_attention
      elif cfg.kind == 'performer':
        attend = functools.partial(ops.performer_attention,
                                   projection=self._performer_projection(head_dim))
      elif filled is not None and not capture:
        # Decoding: read the cache's filled slots only, chunk by chunk.
        attend, options = ops.prefix_attention, dict(
            length=filled, chunk_size=slot_chunk(k.shape[1]))
      elif context_parallel:
        attend, options = self._context_parallel(dropout_rng is not None), {}
      if return_lse:
        options['return_lse'] = True
      result = attend(q, k, v, implementation='dense' if capture else cfg.implementation,
                      **options, **common)
      result = result if isinstance(result, tuple) else (result,)
      return (result[0], result[1] if capture else None,
              result[-1] if return_lse else None)

    return core

  def _context_parallel(self, dropout: bool):
    """Self-attention over a sequence split on the mesh's `sequence` axis (ring attention,
    `models.sequence_parallel`), with the call's masks, score functions and sinks."""
    reason = sp.supported(self.config, dropout=dropout)
    if reason is not None:
      raise ValueError(f'context parallelism (config.parallel.mesh.sequence > 1) does not '
                       f'take {reason}')

    def attend(query, key, value, *, is_causal, local_window, mask, segment_ids, mask_mod,
               score_mod, sinks, implementation, scale=None, dropout_rate=0.0,
               dropout_rng=None):
      del dropout_rate, dropout_rng  # refused above when set
      return sp.attention(query, key, value, causal=is_causal, mask=mask,
                          segment_ids=segment_ids, local_window=local_window,
                          mask_mod=mask_mod, score_mod=score_mod, sinks=sinks, scale=scale,
                          implementation=implementation)

    return attend

  def _backward_aggregation(self, query, key, value, kwargs, capture):
    """`sum_i alpha_ij v_i` at each key position j (one value per query position, per query
    head); a key padding mask `[.., 1, kv]` hides padding as queries too, so padding sends
    nothing to real tokens."""
    mask = kwargs['mask']
    if mask is not None and mask.shape[-2] == 1:
      kwargs = dict(kwargs, mask=mask & jnp.swapaxes(mask, -1, -2))
    if capture:  # The weights alpha are attention's; sow them from the dense path.
      _, weights = ops.dot_product_attention(query, key, value, return_weights=True,
                                             implementation='dense', **kwargs)
      self.sow(names.INTERMEDIATES, names.ATTENTION_WEIGHTS, weights)
    return ops.backward_aggregation(query, key, ops.repeat_kv(value, self.num_heads),
                                    implementation=self.config.implementation, **kwargs)

  def _cross_cache(self, inputs_kv, key_proj, value_proj):
    """Cross-attention keys/values: projected from `inputs_kv` and stored, or read back.

    The cache holds `cross_key`/`cross_value` `[batch, kv_len, kv_heads, head_dim]`. The
    encoder output is the same at every decoding step, so projecting it once (at prefill)
    saves two `[batch, kv_len, features]` matmuls per layer and step.
    """
    if inputs_kv is not None:
      key, value = key_proj(inputs_kv), value_proj(inputs_kv)
      cached_key = self.variable('cache', 'cross_key', jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable('cache', 'cross_value', jnp.zeros, value.shape, value.dtype)
      cached_key.value, cached_value.value = key, value
      return key, value
    if not self.has_variable('cache', 'cross_key'):
      raise ValueError('cross-attention decoding without inputs_kv needs keys/values cached '
                       'by an earlier call with inputs_kv')
    return self.get_variable('cache', 'cross_key'), self.get_variable('cache', 'cross_value')

  def _decode_cache(self, query, key, value, segment_ids, positions):
    """Writes this call's keys/values into the cache and returns what to attend to.

    The init call sizes the cache for its `max_len` tokens (`cache_slots`: whole chunks of
    `DECODE_CHUNK` slots beyond one chunk). It holds `cached_key`/`cached_value`
    `[batch, slots, kv_heads, head_dim]`, `cached_segment` `[batch, slots]` (0 = padding or
    not yet written), `cached_position` `[batch, slots]` and the write index `cache_index`;
    a call attends to the `cache_index` filled slots only. `value=None` (MLA, whose values
    are part of its cached keys) caches no values and returns None for them.
    """
    batch, q_len = query.shape[:2]
    initialized = self.has_variable('cache', 'cached_key')
    slots = (batch, cache_slots(key.shape[1]))
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, slots + key.shape[2:],
                               key.dtype)
    cached_value = None if value is None else self.variable(
        'cache', 'cached_value', jnp.zeros, slots + value.shape[2:], value.dtype)
    cached_segment = self.variable('cache', 'cached_segment', jnp.zeros, slots, jnp.int32)
    cached_position = self.variable('cache', 'cached_position', jnp.zeros, slots, jnp.int32)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    index = cache_index.value
    query, key, positions, segment_ids = self._decode_inputs(query, key, index, positions,
                                                             segment_ids)
    if not initialized:
      # The init call only creates the (max_len-sized) cache; attend within the input.
      return key, value, query, dict(q_offset=0, segment_ids=segment_ids,
                                     positions=(positions, positions))
    max_len = cached_key.value.shape[1]
    if q_len > max_len:
      raise ValueError(f'{q_len} tokens do not fit a cache of {max_len}')

    def update(cache, x):
      return jax.lax.dynamic_update_slice_in_dim(cache, x, index, axis=1)

    cached_key.value = update(cached_key.value, key.astype(cached_key.value.dtype))
    if cached_value is not None:
      cached_value.value = update(cached_value.value, value.astype(cached_value.value.dtype))
    cached_segment.value = update(cached_segment.value, segment_ids)
    cached_position.value = update(cached_position.value, positions)
    cache_index.value = index + q_len
    # Causal masking against the cache: slot j is visible to query i iff j <= index + i;
    # unwritten slots lie in the future, padding slots carry segment 0.
    valid = (cached_segment.value != 0)[:, None, None, :]
    # Score functions (position biases included) read the stored positions rather than cache
    # slots: a ragged prompt leaves padding slots between the prompt and generated tokens.
    kwargs: dict[str, Any] = dict(q_offset=index, mask=valid, length=index + q_len,
                                  positions=(positions, cached_position.value))
    return (cached_key.value, None if cached_value is None else cached_value.value, query,
            kwargs)

  def _decode_inputs(self, query, key, index, positions, segment_ids):
    """A decoding call's positions `[batch, q_len]` (default: from the cache index on) and
    segment ids (default all 1; 0 marks padding), checked, and RoPE applied by them."""
    batch, q_len = query.shape[:2]
    if positions is None:
      positions = index + jnp.arange(q_len)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, q_len))
    if segment_ids is None:
      segment_ids = jnp.ones((batch, q_len), jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if segment_ids.shape != (batch, q_len):
      raise ValueError(f'decode segment_ids must be [batch, q_len] = {(batch, q_len)}, '
                       f'got {segment_ids.shape}')
    if self.positional == 'rope':
      query, key = self._rope(query, positions), self._rope(key, positions)
    return query, key, positions, segment_ids

  def _rope(self, x: jax.Array, positions: jax.Array | None) -> jax.Array:
    """RoPE with the config's base, rotated share, layout and scaling; MLA rotates only its
    decoupled part (the last channels), differential attention each half of a head."""
    cfg = self.config

    def rotate(y):
      return ops.rope(y, positions, cfg.rope_base, fraction=cfg.rope_fraction,
                      interleaved=cfg.rope_interleaved, scaling=rope_scaling(cfg))

    if cfg.kind == 'latent':
      return latent.rotate_tail(rotate, x, cfg.qk_rope_head_dim)
    if cfg.kind == 'differential':
      return differential.per_half(rotate, x)
    return rotate(x)

  def _window_cache(self, query, key, value, segment_ids, positions):
    """The cache of a sliding-window layer: only the window, so a step costs O(window).

    It holds `window_key`/`window_value` `[batch, window + 1, kv_heads, head_dim]` and
    `window_segment`/`window_position` `[batch, window + 1]` (segment 0: empty or padding):
    a real token at position p lives in slot `p % (window + 1)` until position
    `p + window + 1`, which no query that can see p reaches, overwrites it. Padding tokens are
    not written, so each row's ring follows its own positions. A call attends to the ring as
    it was plus its own keys (a prefill longer than the window sees all of its tokens), then
    writes its newest `window + 1` real tokens; the caller masks causality and the window by
    position (`cache_index` counts calls' tokens, for default positions).
    """
    batch, q_len = query.shape[:2]
    size = self.config.sliding_window + 1
    initialized = self.has_variable('cache', 'window_key')
    ring = (batch, size)
    window_key = self.variable('cache', 'window_key', jnp.zeros, ring + key.shape[2:],
                               key.dtype)
    window_value = self.variable('cache', 'window_value', jnp.zeros, ring + value.shape[2:],
                                 value.dtype)
    window_segment = self.variable('cache', 'window_segment', jnp.zeros, ring, jnp.int32)
    window_position = self.variable('cache', 'window_position', jnp.zeros, ring, jnp.int32)
    cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    query, key, positions, segment_ids = self._decode_inputs(query, key, cache_index.value,
                                                             positions, segment_ids)
    if not initialized:
      return key, value, query, dict(q_offset=0, segment_ids=segment_ids,
                                     positions=(positions, positions))
    keys = jnp.concatenate([window_key.value, key.astype(window_key.value.dtype)], axis=1)
    values = jnp.concatenate([window_value.value, value.astype(window_value.value.dtype)],
                             axis=1)
    kv_positions = jnp.concatenate([window_position.value, positions], axis=1)
    kv_segments = jnp.concatenate([window_segment.value, segment_ids], axis=1)
    # The newest `size` real tokens of each row go to distinct slots; the rest are dropped
    # (slot `size` is out of range), so no two writes of a row meet in one slot.
    real = segment_ids != 0
    newest = jnp.max(jnp.where(real, positions, -1), axis=1, keepdims=True)
    slot = jnp.where(real & (positions > newest - size), positions % size, size)
    rows = jnp.arange(batch)[:, None]

    def write(ring_value, x):
      return ring_value.at[rows, slot].set(x.astype(ring_value.dtype), mode='drop')

    window_key.value = write(window_key.value, key)
    window_value.value = write(window_value.value, value)
    window_segment.value = write(window_segment.value, segment_ids)
    window_position.value = write(window_position.value, positions)
    cache_index.value = cache_index.value + q_len
    valid = (kv_segments != 0)[:, None, None, :]
    return keys, values, query, dict(q_offset=0, mask=valid,
                                     positions=(positions, kv_positions))


def rope_scaling(config: AttentionConfig) -> ops.RopeScaling | None:
  """The config's RoPE frequency scaling (None: plain RoPE); raises ValueError naming the
  field when the options do not fit (e.g. 'yarn' without `rope_original_length`)."""
  if config.rope_scaling == 'none':
    if config.rope_scaling_factor != 1.0:
      raise ValueError(f'rope_scaling_factor={config.rope_scaling_factor} needs a rope_scaling '
                       f"kind; rope_scaling is 'none'")
    return None
  try:
    return ops.RopeScaling(config.rope_scaling, factor=config.rope_scaling_factor,
                           original_max_position=config.rope_original_length)
  except ValueError as e:
    raise ValueError(f'attention rope_scaling={config.rope_scaling!r}: {e} (the training '
                     'context is rope_original_length)') from None


def _group_beams(query: jax.Array, key: jax.Array, kwargs: dict[str, Any]):
  """Cross-attention of `beams` hypotheses per source row to that row's cached keys: query
  rows `r * beams ... r * beams + beams - 1` (beam search's layout) become `beams * q_len`
  queries of row `r`, so every beam reads the one copy of the row's keys/values."""
  rows, sources = query.shape[0], key.shape[0]
  mask = kwargs.get('mask')
  if rows % sources or (mask is not None and (mask.shape[0] not in (1, sources)
                                              or mask.shape[2] != 1)):
    raise ValueError(f'cross-attention decoding of {rows} query rows against keys cached for '
                     f'{sources} sources needs a whole number of beams per source and a mask '
                     f'[sources|1, heads|1, 1, kv_len], got mask '
                     f'{None if mask is None else mask.shape}')
  beams = rows // sources
  return query.reshape(sources, -1, *query.shape[2:]), kwargs, beams


def _at_positions(mask_mod, score_mod, q_positions, kv_positions, q_offset):
  """User mask/score functions for a decoding call: the op indexes queries from the cache
  index and keys by cache slot; the functions see the tokens' positions (`[batch, q]` and
  `[batch, slots]`), which differ from slots after a ragged prompt's padding."""
  def mask(b, h, q_idx, kv_idx):
    return mask_mod(b, h, q_positions[b, q_idx - q_offset], kv_positions[b, kv_idx])

  def score(s, b, h, q_idx, kv_idx):
    return score_mod(s, b, h, q_positions[b, q_idx - q_offset], kv_positions[b, kv_idx])

  return (None if mask_mod is None else mask), (None if score_mod is None else score)


def _context(weights: jax.Array, values: jax.Array) -> jax.Array:
  """`weights [batch, kv]`, `values [batch, kv, d]` -> `[batch, d]`."""
  return jnp.einsum('bk,bkd->bd', weights, values.astype(jnp.float32))


class AdditiveAttention(nn.Module):
  """Bahdanau attention: `score(s, h_j) = v^T tanh(W_s s + W_h h_j)`.

  Attributes:
    attention_dim: size of the tanh layer.
  """
  attention_dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, keys: jax.Array, mask: jax.Array | None = None,
               values: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One query against a memory.

    Args:
      query: decoder state `[batch, d_q]`.
      keys: encoder states `[batch, kv_len, d_k]`.
      mask: bool `[batch, kv_len]`, True = real token.
      values: `[batch, kv_len, d_v]`; defaults to `keys`.

    Returns:
      context float32 `[batch, d_v]` and weights float32 `[batch, kv_len]` (zeros for
      padding; all zeros if a row has no real token).
    """
    init = nn.initializers.lecun_normal()
    w_q = self.param('w_query', partitioned(init, ('embed', 'attn')),
                     (query.shape[-1], self.attention_dim), self.param_dtype)
    w_k = self.param('w_key', partitioned(init, ('embed', 'attn')),
                     (keys.shape[-1], self.attention_dim), self.param_dtype)
    v = self.param('v', partitioned(nn.initializers.normal(1.0 / self.attention_dim ** 0.5),
                                    ('attn',)), (self.attention_dim,), self.param_dtype)
    scores = ops.additive_scores(query[:, None, None, :], keys[:, :, None, :], w_q, w_k, v)
    weights = ops.masked_softmax(scores[:, 0, 0], mask)  # [batch, kv]
    return _context(weights, keys if values is None else values), weights


class LuongAttention(nn.Module):
  """Luong et al. 2015 multiplicative attention: 'dot' `s . h_j` or 'general' `s W h_j`."""
  score: str = 'general'
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, keys: jax.Array, mask: jax.Array | None = None,
               values: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Same arguments and returns as `AdditiveAttention`; 'dot' needs `d_q == d_k`."""
    q, k = query[:, None, None, :], keys[:, :, None, :]
    if self.score == 'dot':
      if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"score='dot' needs equal sizes, got query {query.shape} and keys "
                         f'{keys.shape}')
      scores = ops.dot_scores(q, k)
    elif self.score == 'general':
      w = self.param('w', partitioned(nn.initializers.lecun_normal(), ('embed', 'embed_kv')),
                     (query.shape[-1], keys.shape[-1]), self.param_dtype)
      scores = ops.general_scores(q, k, w)
    else:
      raise ValueError(f"score must be 'dot' or 'general', got {self.score!r}")
    weights = ops.masked_softmax(scores[:, 0, 0], mask)
    return _context(weights, keys if values is None else values), weights
