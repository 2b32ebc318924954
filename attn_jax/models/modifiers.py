"""Attention options chosen by name in a config: mask and score functions, learned modifiers.

    AttentionConfig(mask_mod='dilated_2')                                   # a registry key
    AttentionConfig(mask_mod='attn_jax.ops.mask_mods:chunked(128)')         # a factory call
    AttentionConfig(score_mod='my_project.scores:my_score')                 # an import path
    AttentionConfig(modifiers='temperature')                                # learned

- `MASK_MODS` / `SCORE_MODS`: ready-made `mask_mod(b, h, q_idx, kv_idx)` /
  `score_mod(score, b, h, q_idx, kv_idx)` functions (see `attn_jax.ops.mods`).
- `MODIFIERS`: learned modifiers. A `Modifier` declares the parameters it owns (shape, init,
  logical axes, from the layer's sizes) and builds, from their values, the score function
  that reads them; `MultiHeadAttention` creates the parameters and chains the functions. A
  new idea is one entry here (and `--config.model.attention.modifiers=<name>`).
- `POSITION_BIASES`: the modifiers behind `positional='alibi'` and `'t5'`: position biases take
  the same path as every other score function, in training and in cached decoding alike.

`resolve_mod` / `resolve_modifier` turn a config's name into the object, and reject what
cannot work (an unknown name, a factory given where its product is due) with a message that
says what to write instead.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax import ops
from attn_jax.models.configs import AttentionConfig

# Named mask / score functions a config can pick; a research script may add its own entries.
MASK_MODS: dict[str, Any] = {
    'chunked_64': ops.mask_mods.chunked(64),  # Llama 4's chunked local attention, CPU size
    'dilated_2': ops.mask_mods.dilated(2),
    'global_1': ops.mask_mods.global_tokens(1),
}
SCORE_MODS: dict[str, Any] = {
    'soft_cap_5': ops.score_mods.soft_cap(5.0),
}
_ARGUMENTS = {'mask_mod': ('b', 'h', 'q_idx', 'kv_idx'),
              'score_mod': ('score', 'b', 'h', 'q_idx', 'kv_idx')}


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What a modifier may size its parameters and function by: one attention layer."""
  config: AttentionConfig
  num_heads: int
  num_kv_heads: int
  head_dim: int
  is_causal: bool


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter of a modifier: its shape, initializer `init(rng, shape, dtype)` and the
  logical axis names the mesh shards it by (see `attn_jax.train.config.DEFAULT_RULES`)."""
  shape: tuple[int, ...]
  init: Callable[..., jax.Array]
  axes: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Modifier:
  """A learned attention modifier.

  Attributes:
    params: `LayerInfo -> {name: ParamSpec}`: the parameters the layer creates for it, under
      these names in the layer's parameter tree (names must not clash with the layer's own or
      another modifier's).
    score_mod: `(params {name: array}, LayerInfo) -> score_mod(score, b, h, q_idx, kv_idx)`.
      The arrays it closes over receive gradients through every attention path.
  """
  params: Callable[[LayerInfo], Mapping[str, ParamSpec]]
  score_mod: Callable[[Mapping[str, jax.Array], LayerInfo], Any]


def _no_params(layer: LayerInfo) -> dict[str, ParamSpec]:
  del layer
  return {}


def _t5_params(layer: LayerInfo) -> dict[str, ParamSpec]:
  return {'relpos_bias': ParamSpec((layer.config.t5_num_buckets, layer.num_heads),
                                   nn.initializers.normal(0.1), ('relpos_buckets', 'heads'))}


POSITION_BIASES: dict[str, Modifier] = {
    # Press et al. 2022: fixed per-head slopes, no parameters.
    'alibi': Modifier(_no_params, lambda p, layer: ops.score_mods.alibi(
        ops.alibi_slopes(layer.num_heads))),
    # Raffel et al. 2020: a learned [buckets, heads] table, directional buckets in encoders.
    't5': Modifier(_t5_params, lambda p, layer: ops.score_mods.t5_bias(
        p['relpos_bias'], bidirectional=not layer.is_causal,
        max_distance=layer.config.t5_max_distance)),
}


def _temperature_params(layer: LayerInfo) -> dict[str, ParamSpec]:
  # The log of each head's logit scale: 0 at init, the usual 1/sqrt(head_dim) scaling.
  return {'log_temperature': ParamSpec((layer.num_heads,), nn.initializers.zeros, ('heads',))}


def _temperature(params: Mapping[str, jax.Array], layer: LayerInfo) -> Any:
  del layer
  log_temperature = params['log_temperature']

  def scaled(score, b, h, q_idx, kv_idx):
    del b, q_idx, kv_idx
    return score * jnp.exp(log_temperature[h].astype(jnp.float32))

  return scaled


MODIFIERS: dict[str, Modifier] = {
    # A learned per-head temperature: head h's logits times exp(t_h) (t = 0 at init), so each
    # head learns how sharp its attention is.
    'temperature': Modifier(_temperature_params, _temperature),
}


def _call_spec(spec: str, kind: str) -> tuple[str, tuple, dict]:
  """`'factory(1, x=2)'` -> ('factory', (1,), {'x': 2}); literal arguments only."""
  try:
    node = ast.parse(spec, mode='eval').body
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      raise ValueError('not a call')
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"{kind}: cannot read {spec!r} as 'factory(literal arguments)': {e}"
                     ) from None
  return node.func.id, args, kwargs


def _import(name: str, kind: str) -> Any:
  """`'package.module:attribute'` or `'package.module:factory(args)'` -> the object."""
  module_name, _, attribute = name.partition(':')
  call = '(' in attribute
  attribute, args, kwargs = (_call_spec(attribute, kind) if call else (attribute, (), {}))
  try:
    obj = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'{kind}={name!r} cannot be imported: {e}') from None
  if call:
    try:
      obj = obj(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  the factory's own complaint, with the name
      raise ValueError(f'{kind}={name!r}: the factory call failed: {e}') from None
  return obj


def _check_function(fn: Any, name: str, kind: str) -> None:
  """A mask_mod / score_mod must take its index arguments; a factory (which takes its own
  options and returns one) is refused with a message that says how to call it."""
  if not callable(fn):
    raise ValueError(f'{kind}={name!r} is not callable')
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # builtins and C functions: the op's tracing checks them
  want = _ARGUMENTS[kind]
  try:
    signature.bind(*want)
    return
  except TypeError:
    pass
  takes = ', '.join(signature.parameters)
  module = getattr(fn, '__module__', 'module')
  qualname = getattr(fn, '__qualname__', 'factory')
  raise ValueError(
      f'{kind}={name!r} takes ({takes}), not ({", ".join(want)}): it looks like a factory '
      f'that builds a {kind}. Pass its product: in a config '
      f"'{module}:{qualname}(<arguments>)', e.g. 'attn_jax.ops.mask_mods:chunked(128)'; in "
      f'Python, call it ({qualname}(...)) and pass the result')


def resolve_mod(name: Any, kind: str) -> Any:
  """The `kind` ('mask_mod' | 'score_mod') function a config names: a registry key,
  `'package.module:function'`, `'package.module:factory(literal args)'`, or the function
  itself; '' or None gives None. Raises ValueError naming what is wrong."""
  if kind not in _ARGUMENTS:
    raise ValueError(f'kind={kind!r} is not one of {tuple(_ARGUMENTS)}')
  if name is None or (isinstance(name, str) and not name):
    return None
  if callable(name):
    fn, label = name, getattr(name, '__qualname__', repr(name))
  else:
    registry = MASK_MODS if kind == 'mask_mod' else SCORE_MODS
    if name in registry:
      return registry[name]
    if ':' not in name:
      raise ValueError(f'{kind}={name!r} is not one of {sorted(registry)} nor '
                       "'package.module:function'")
    fn, label = _import(name, kind), name
  _check_function(fn, label, kind)
  return fn


def resolve_modifier(name: str) -> Modifier:
  """The learned modifier named `name`: a `MODIFIERS` key or `'package.module:attribute'`."""
  if name in MODIFIERS:
    return MODIFIERS[name]
  if ':' not in name:
    raise ValueError(f'modifier {name!r} is not one of {sorted(MODIFIERS)} nor '
                     "'package.module:attribute'")
  modifier = _import(name, 'modifier')
  if not isinstance(modifier, Modifier):
    raise ValueError(f'modifier {name!r} is a {type(modifier).__name__}, not a '
                     'attn_jax.models.modifiers.Modifier')
  return modifier


def check_names(config: AttentionConfig) -> None:
  """Resolves every name `config` holds, so a bad one fails before anything is traced."""
  resolve_mod(config.mask_mod, 'mask_mod')
  resolve_mod(config.score_mod, 'score_mod')
  for name in config.modifier_names:
    resolve_modifier(name)

