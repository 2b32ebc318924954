"""Mask and score functions inside a kernel: what is computed outside, what is evaluated inside.

A `Mod` (ops/mods.py) is the jaxpr of a user's scalar function of `(score,) b, h, q_idx,
kv_idx` and of the arrays it closed over (`consts`). Outside a kernel `Mod.grid` vmaps it,
but inside a Pallas kernel a vmapped read of a closed-over array is a gather, which neither
Triton nor Mosaic lowers, and a `pallas_call` cannot capture arrays at all. So the jaxpr is
split by what each value depends on (`deps`: the score, b, h, q, kv and the consts):

* **pure index code** (no const): evaluated in the kernel on the tile's index arrays, with
  scalars `b, h` (program ids) and `q_idx`/`kv_idx` broadcasting to the tile (`causal`,
  `sliding_window`, `chunked`, `dilated`, soft-capping, ALiBi's `|q - kv|`);
* **the frontier**: the values that read consts and at most one of `q_idx`/`kv_idx` (and no
  score), and feed the kernel-side code. They are computed outside with XLA (a vmap, gathers
  allowed) and enter the kernel as inputs, by kind:
    - 'scalar': per (b, h) `[B|1, H|1]` (a prefix length `prefix[b]`, ALiBi's `slopes[h]`);
    - 'q' / 'kv': per query / key `[B|1, H|1, len]` (document ids, a padding mask);
* **lookups** (`table[bucket(kv - q), h]`, T5): a point read of a const-derived table at an
  index that depends on both positions (or the score). The table `[B|1, H|1, *shape]` enters
  the kernel ('table'); along the one axis indexed by the positions (at most `LOOKUP_MAX`
  entries; the other axes are indexed by scalars) Triton gathers, Mosaic (no vector gather)
  sums a one-hot select per entry.

Anything else (a value depending on a const and on both positions that is not such a lookup,
a non-elementwise primitive in the kernel-side code) is unsupported: `KernelMod.of` returns a
sentence saying why, and the attention op runs the blockwise path instead (see flash.py).

Frontier values are stored as float32 or int32 (bools as int32) and converted back to their
dtype in the kernel, so the kernel computes exactly what the function computes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from attn_jax.ops.mods import Mod

LOOKUP_MAX = 128  # entries of a one-hot lookup axis (a select per entry and logit)
TABLE_MAX = 4096  # elements of a lookup table per (b, h) (TPU: it lives in scalar memory)

# Primitives that act elementwise on same-shaped operands: the kernel-side code may use them.
ELEMENTWISE = frozenset("""
    abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow
    is_finite le log log1p logistic lt max min mul ne neg nextafter not or population_count pow
    reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square sub tan tanh xor
""".split())
# Shape-only primitives, identities on one element (a size-1 read squeezed to a scalar).
RESHAPES = frozenset({'squeeze', 'reshape', 'broadcast_in_dim', 'expand_dims'})
# Call-like primitives whose body is inlined.
CALLS = frozenset({'jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
                   'custom_vjp_call', 'custom_vjp_call_jaxpr', 'checkpoint', 'remat'})


@dataclasses.dataclass(frozen=True)
class Input:
  """One array the kernel receives for a mod (see the module docstring for the kinds)."""
  kind: str  # 'scalar' | 'q' | 'kv' | 'table'
  dtype: Any  # the value's dtype in the function (storage: float32 / int32)
  reads_b: bool
  reads_h: bool
  shape: tuple[int, ...] = ()  # a table's shape

  @property
  def storage(self):
    return jnp.float32 if jnp.issubdtype(self.dtype, jnp.floating) else jnp.int32


class _Node:
  """A value of the flattened program: its abstract value and what it depends on."""
  __slots__ = ('aval', 'deps')

  def __init__(self, aval, deps: frozenset):
    self.aval, self.deps = aval, deps


@dataclasses.dataclass(frozen=True)
class _Lit:
  value: Any
  dtype: Any


@dataclasses.dataclass
class _Eqn:
  prim: Any
  params: dict
  ins: list  # _Node | _Lit
  outs: list  # _Node
  lookup: tuple | None = None  # (one-hot axis, its size) of a point read in the kernel


class _Unsupported(Exception):
  pass


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]]:
  for name in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(name)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jcore.Jaxpr):
      return sub, ()
  raise _Unsupported(f'{eqn.primitive.name} has no inlinable body')


def _flatten(jaxpr, env: dict, eqns: list, extra_consts: list) -> None:
  """Appends `jaxpr`'s equations to `eqns` with calls inlined; `env` maps its vars to values."""
  def read(v):
    return _Lit(v.val, v.aval.dtype) if isinstance(v, jcore.Literal) else env[v]

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive.name in CALLS:
      sub, consts = _sub_jaxpr(eqn)
      sub_env = {}
      for var, value in zip(sub.constvars, consts, strict=True):
        node = _Node(var.aval, frozenset({'c'}))
        extra_consts.append((node, value))
        sub_env[var] = node
      num_consts = eqn.params.get('num_consts', 0) if eqn.primitive.name.startswith(
          'custom') else 0
      sub_env.update(zip(sub.invars, ins[num_consts:] if len(sub.invars) < len(ins) else ins,
                         strict=True))
      _flatten(sub, sub_env, eqns, extra_consts)
      for out, var in zip(eqn.outvars, sub.outvars, strict=True):
        env[out] = read(var) if isinstance(var, jcore.Literal) else sub_env[var]
      continue
    deps = frozenset().union(*[x.deps for x in ins if isinstance(x, _Node)])
    outs = [_Node(v.aval, deps) for v in eqn.outvars]
    eqns.append(_Eqn(eqn.primitive, dict(eqn.params), ins, outs))
    env.update(zip(eqn.outvars, outs, strict=True))


def _outer(node) -> bool:
  """Computed outside the kernel: reads consts, not the score, not both positions."""
  d = node.deps
  return 'c' in d and 's' not in d and not {'q', 'k'} <= d


def _size(aval) -> int:
  return int(np.prod(aval.shape, dtype=np.int64))


@dataclasses.dataclass(eq=False)
class KernelMod:
  """A mod split for a kernel: the `inputs` to compute outside (`prepare`) and the code to
  evaluate inside (`evaluate`). Build with `KernelMod.of(mod)`."""
  mod: Mod
  inputs: tuple[Input, ...]
  _args: list  # nodes of the program's arguments: [score], b, h, q_idx, kv_idx
  _consts: list  # nodes of the mod's consts (the arrays `prepare` gets)
  _extra: list  # (node, value) of constants closed over by inlined calls
  _eqns: list  # the whole flattened program (for `prepare`)
  _frontier: list  # nodes, aligned with `inputs`
  _kernel: list  # equations evaluated in the kernel, in order
  _out: Any

  @staticmethod
  @functools.lru_cache(maxsize=512)  # Mods compare by their jaxpr: one split per function
  def of(mod: Mod) -> KernelMod | str:
    """The split of `mod`, or a sentence saying why a kernel cannot evaluate it."""
    try:
      return _split(mod)
    except _Unsupported as e:
      kind = 'score_mod' if mod.is_score else 'mask_mod'
      name = getattr(mod.fn, '__qualname__', None) or repr(mod.fn)
      return f'{kind} {name}: {e}'

  # -- outside the kernel ------------------------------------------------------------------

  def prepare(self, consts: Sequence[Any], *, batch: int, heads: int, q_pos: jax.Array,
              kv_pos: jax.Array) -> tuple[jax.Array, ...]:
    """The kernel inputs, one per `inputs` entry, in storage dtype: scalars `[B|1, H|1]`,
    per-query `[B|1, H|1, len(q_pos)]`, per-key `[B|1, H|1, len(kv_pos)]`, tables
    `[B|1, H|1, *shape]`. `q_pos`/`kv_pos` are absolute positions (padding included)."""
    out = []
    for spec, node in zip(self.inputs, self._frontier, strict=True):
      fn = functools.partial(self._evaluate_outer, node, tuple(consts))
      axes = [jnp.arange(batch) if spec.reads_b else jnp.zeros((1,), jnp.int32),
              jnp.arange(heads) if spec.reads_h else jnp.zeros((1,), jnp.int32),
              q_pos if spec.kind == 'q' else None, kv_pos if spec.kind == 'kv' else None]
      for axis in reversed(range(4)):  # [B|1, H|1, (len)]
        if axes[axis] is not None:
          fn = jax.vmap(fn, in_axes=tuple(0 if i == axis else None for i in range(4)))
      out.append(jnp.asarray(fn(*axes)).astype(spec.storage))
    return tuple(out)

  def _evaluate_outer(self, node, consts, b, h, q, kv):
    """`node` from scalar indices (q or kv None when it reads neither), with XLA."""
    zero = jnp.int32(0)
    env = dict(zip(self._args[-4:], (b, h, zero if q is None else q, zero if kv is None else kv),
                   strict=True))
    env.update(zip(self._consts, consts, strict=True))
    env.update(self._extra)
    for eqn in _slice(self._eqns, node):
      outs = eqn.prim.bind(*[_value(x, env) for x in eqn.ins], **eqn.params)
      env.update(zip(eqn.outs, outs if eqn.prim.multiple_results else [outs], strict=True))
    return env[node]

  # -- inside the kernel -------------------------------------------------------------------

  def evaluate(self, read: Callable[[int], Any], table: Callable[[int, tuple], Any], b, h,
               q_idx, kv_idx, score=None, *, gather: bool = False):
    """The function on a tile, inside a kernel.

    Args:
      read: `read(i)` -> input `i` (a scalar or a vector) as an array broadcasting with the
        tile, in storage dtype.
      table: `table(i, index)` -> elements of table input `i`; `index` holds Python ints and
        int32 scalars, and with `gather` one int32 array (the position-dependent index).
      gather: the kernel reads a table at an array of indices in one load (Triton can);
        else (Mosaic) a lookup is a one-hot sum of scalar reads.
      b, h: int32 scalars (the batch row and query head).
      q_idx, kv_idx: int32 absolute positions broadcasting to the tile (e.g. `[tq, 1]`,
        `[1, tk]`).
      score: float32 `[tile]` logits, for a score mod.

    Returns:
      The mask (bool) or score (float32) broadcasting to the tile.
    """
    env = dict(zip(self._args, ([score] if self.mod.is_score else []) + [b, h, q_idx, kv_idx],
                   strict=True))
    for i, (spec, node) in enumerate(zip(self.inputs, self._frontier, strict=True)):
      if spec.kind != 'table':
        env[node] = _from_storage(read(i), spec.dtype)
    tables = {id(node): i for i, node in enumerate(self._frontier)}
    for eqn in self._kernel:
      if eqn.lookup is not None:
        env[eqn.outs[0]] = self._lookup(eqn, env, tables, table, gather)
      elif eqn.prim.name in RESHAPES:
        env[eqn.outs[0]] = _value(eqn.ins[0], env)
      elif eqn.prim.name == 'sign' and jnp.issubdtype(eqn.outs[0].aval.dtype, jnp.integer):
        # Mosaic lowers `sign` (which jnp's floor division uses) only with a TPU attached;
        # the same integers from comparisons lower everywhere.
        x = _value(eqn.ins[0], env)
        env[eqn.outs[0]] = (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)
      else:
        args = [jnp.asarray(_value(x, env)) for x in eqn.ins]
        shape = jnp.broadcast_shapes(*[a.shape for a in args])
        outs = eqn.prim.bind(*[jnp.broadcast_to(a, shape) for a in args], **eqn.params)
        outs = outs if eqn.prim.multiple_results else [outs]
        env.update(zip(eqn.outs, outs, strict=True))
    return _value(self._out, env)

  def _lookup(self, eqn, env, tables, table, gather: bool):
    """`operand[i0, i1, ...]` (a point `dynamic_slice`): one gather, or a one-hot sum over the
    axis whose index depends on the positions; the other indices are scalars. Indices are
    clamped into range, as `dynamic_slice` does."""
    operand, *indices = eqn.ins
    axis, size = eqn.lookup
    spec = self.inputs[tables[id(operand)]]
    dims = operand.aval.shape
    scalars = [jnp.clip(_value(x, env), 0, n - 1) if i != axis else None
               for i, (x, n) in enumerate(zip(indices, dims, strict=True))]
    position = jnp.clip(_value(indices[axis], env), 0, size - 1)
    if gather:
      index = tuple(position if i == axis else s for i, s in enumerate(scalars))
      return _from_storage(table(tables[id(operand)], index), spec.dtype)
    out = None
    for j in range(size):
      index = tuple(j if i == axis else s for i, s in enumerate(scalars))
      entry = _from_storage(table(tables[id(operand)], index), spec.dtype)
      out = entry if out is None else jnp.where(position == j, entry, out)
    return jnp.broadcast_to(out, jnp.shape(position))


def _slice(eqns: list, node) -> list:
  """The equations `node` depends on, in program order."""
  producer = {id(o): e for e in eqns for o in e.outs}
  needed, stack = set(), [node]
  while stack:
    x = stack.pop()
    eqn = producer.get(id(x)) if isinstance(x, _Node) else None
    if eqn is not None and id(eqn) not in needed:
      needed.add(id(eqn))
      stack.extend(eqn.ins)
  return [e for e in eqns if id(e) in needed]


def _value(x, env):
  if isinstance(x, _Lit):
    return jnp.asarray(x.value, x.dtype)
  return env[x]


def _from_storage(x, dtype):
  if dtype == jnp.bool_:
    return x != 0
  return x if x.dtype == dtype else x.astype(dtype)


def _split(mod: Mod) -> KernelMod:
  jaxpr = mod.jaxpr
  arg_deps = (['s'] if mod.is_score else []) + ['b', 'h', 'q', 'k']
  args = [_Node(v.aval, frozenset({d})) for v, d in zip(jaxpr.invars, arg_deps, strict=True)]
  consts = [_Node(v.aval, frozenset({'c'})) for v in jaxpr.constvars]
  env = dict(zip(jaxpr.invars, args, strict=True))
  env.update(zip(jaxpr.constvars, consts, strict=True))
  eqns, extra = [], []
  _flatten(jaxpr, env, eqns, extra)
  (out_var,) = jaxpr.outvars
  out = _Lit(out_var.val, out_var.aval.dtype) if isinstance(out_var, jcore.Literal) else env[
      out_var]
  producer = {id(o): e for e in eqns for o in e.outs}

  frontier, inputs, kernel, seen = [], [], [], set()

  def add_input(node, kind):
    if any(node is f for f in frontier):
      return
    if kind != 'table' and _size(node.aval) != 1:
      raise _Unsupported(f'the kernel would need a {node.aval.str_short()} array computed from '
                         'closed-over arrays; index them down to scalars first')
    frontier.append(node)
    inputs.append(Input(kind, node.aval.dtype, 'b' in node.deps, 'h' in node.deps,
                        tuple(node.aval.shape) if kind == 'table' else ()))

  def visit(x):
    if isinstance(x, _Lit) or id(x) in seen or any(x is a for a in args):
      return
    seen.add(id(x))
    if _outer(x):
      add_input(x, 'q' if 'q' in x.deps else 'kv' if 'k' in x.deps else 'scalar')
      return
    eqn = producer.get(id(x))
    if eqn is None:
      raise _Unsupported('reads a closed-over array in a way the kernel cannot')
    name = eqn.prim.name
    if name == 'dynamic_slice' and _outer_operand(eqn.ins[0]):
      eqn.lookup = _lookup_axis(eqn)
      table = eqn.ins[0]
      if _size(table.aval) > TABLE_MAX:
        raise _Unsupported(f'reads a {table.aval.str_short()} closed-over array at an index '
                           f'that depends on both positions (lookups take tables of at most '
                           f'{TABLE_MAX} elements)')
      add_input(table, 'table')
      for index in eqn.ins[1:]:
        visit(index)
    else:
      if name not in ELEMENTWISE and name not in RESHAPES:
        raise _Unsupported(f'the primitive {name!r} on values that depend on the positions is '
                           'not evaluated inside the kernel (elementwise code and point reads '
                           'of closed-over arrays are)')
      if any(_size(o.aval) != 1 for o in eqn.outs):
        raise _Unsupported(f'{name} makes a {eqn.outs[0].aval.str_short()} array from the '
                           'positions; the kernel evaluates scalar code')
      for v in eqn.ins:
        visit(v)
    kernel.append(eqn)

  visit(out)
  order = {id(e): i for i, e in enumerate(eqns)}
  kernel.sort(key=lambda e: order[id(e)])
  return KernelMod(mod, tuple(inputs), args, consts, extra, eqns, frontier, kernel, out)


def _outer_operand(x) -> bool:
  return isinstance(x, _Node) and 'c' in x.deps and not x.deps & {'s', 'q', 'k'}


def _lookup_axis(eqn) -> tuple[int, int]:
  """The (axis, size) of a point read's one position-dependent index."""
  operand, *indices = eqn.ins
  if any(s != 1 for s in eqn.params['slice_sizes']):
    raise _Unsupported('slices a closed-over array at positions; the kernel reads points')
  moving = [i for i, x in enumerate(indices)
            if isinstance(x, _Node) and x.deps & {'s', 'q', 'k'}]
  if len(moving) != 1:
    raise _Unsupported(f'reads a {operand.aval.str_short()} closed-over array with '
                       f'{len(moving)} indices that depend on the positions or the score '
                       '(the kernel looks up along one axis)')
  size = operand.aval.shape[moving[0]]
  if size > LOOKUP_MAX:
    raise _Unsupported(f'looks up a {operand.aval.str_short()} closed-over array along an axis '
                       f'of {size} entries at a position-dependent index (at most '
                       f'{LOOKUP_MAX}: a select per entry and logit)')
  return moving[0], size
