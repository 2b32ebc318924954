"""Open attention: user mask and score functions, and the machinery that runs them.

A researcher's idea is two small functions, written for scalars (FlexAttention's contract):

    mask_mod(b, h, q_idx, kv_idx) -> bool           # True = query q_idx may see key kv_idx
    score_mod(score, b, h, q_idx, kv_idx) -> score  # on the scaled logit q.k * scale

`b` is the batch row, `h` the query head, `q_idx`/`kv_idx` absolute positions (a query at row
`i` of the call sits at `i + q_offset`). Both may close over arrays: document ids, lengths, a
learned bias table. Floating-point arrays a `score_mod` closes over receive gradients; the
rest is data. `ops.dot_product_attention(q, k, v, mask_mod=..., score_mod=...)` evaluates
them on whole blocks at once, vectorised over exactly the arguments each function reads
(`causal` reads neither `b` nor `h`, so its mask is one `[q, kv]` plane shared by every row).

This module holds the machinery (`Mod`: checking, hoisting closed-over arrays, finding which
arguments a function reads, evaluating it on a grid) and the combinators `and_masks` and
`or_masks`. The libraries of ready-made functions are `mask_mods.py` and `score_mods.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

MaskMod = Callable[..., Any]
ScoreMod = Callable[..., Any]
INDEX_NAMES = ('b', 'h', 'q_idx', 'kv_idx')


def _name(fn: Any) -> str:
  return getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None) or repr(fn)


@dataclasses.dataclass(frozen=True)
class Band:
  """A mask that is a band on the diagonal: `lo <= kv_idx - q_idx <= hi` (None: unbounded).

  Causal masks and sliding windows are bands; a block of the attention matrix can then be
  classified as hidden, partly or fully visible from its corners, without evaluating the mask.
  """
  lo: int | None
  hi: int | None

  def __call__(self, b, h, q_idx, kv_idx):
    del b, h
    distance = kv_idx - q_idx
    visible = jnp.full(jnp.shape(distance), True)
    if self.lo is not None:
      visible = visible & (distance >= self.lo)
    if self.hi is not None:
      visible = visible & (distance <= self.hi)
    return visible

  def intersect(self, other: Band) -> Band:
    lows = [x for x in (self.lo, other.lo) if x is not None]
    highs = [x for x in (self.hi, other.hi) if x is not None]
    return Band(max(lows) if lows else None, min(highs) if highs else None)


@dataclasses.dataclass(frozen=True)
class _And:
  parts: tuple[MaskMod, ...]

  def __call__(self, b, h, q_idx, kv_idx):
    out = self.parts[0](b, h, q_idx, kv_idx)
    for part in self.parts[1:]:
      out = jnp.logical_and(out, part(b, h, q_idx, kv_idx))
    return out


@dataclasses.dataclass(frozen=True)
class _Or:
  parts: tuple[MaskMod, ...]

  def __call__(self, b, h, q_idx, kv_idx):
    out = self.parts[0](b, h, q_idx, kv_idx)
    for part in self.parts[1:]:
      out = jnp.logical_or(out, part(b, h, q_idx, kv_idx))
    return out


def _flatten(kind, mods: Sequence[MaskMod]) -> list[MaskMod]:
  out = []
  for m in mods:
    if m is None:
      continue
    out.extend(m.parts if isinstance(m, kind) else [m])
  return out


def and_masks(*mask_mods: MaskMod | None) -> MaskMod | None:
  """A key is visible iff every mask says so (None arguments are skipped). Bands intersect
  into one band, so `and_masks(causal(), sliding_window(w))` keeps its cheap block rule."""
  parts = _flatten(_And, mask_mods)
  bands = [m for m in parts if isinstance(m, Band)]
  others = [m for m in parts if not isinstance(m, Band)]
  if len(bands) > 1:
    band = bands[0]
    for other in bands[1:]:
      band = band.intersect(other)
    bands = [band]
  parts = bands + others
  if not parts:
    return None
  return parts[0] if len(parts) == 1 else _And(tuple(parts))


def or_masks(*mask_mods: MaskMod | None) -> MaskMod | None:
  """A key is visible iff some mask says so (None arguments are skipped)."""
  parts = _flatten(_Or, mask_mods)
  if not parts:
    return None
  return parts[0] if len(parts) == 1 else _Or(tuple(parts))


def band_of(mask_mod: MaskMod | None) -> Band | None:
  """The band that contains every visible pair of `mask_mod`, if one is known: the mask itself
  when it is a `Band`, the intersection of its bands when it is an AND. None: no bound."""
  if isinstance(mask_mod, Band):
    return mask_mod
  if isinstance(mask_mod, _And):
    bands = [p for p in mask_mod.parts if isinstance(p, Band)]
    if bands:
      out = bands[0]
      for other in bands[1:]:
        out = out.intersect(other)
      return out
  return None


def split_band(mask_mod: MaskMod | None) -> tuple[Band | None, MaskMod | None]:
  """`mask_mod` as `and_masks(band, rest)`: its band part (None: none) and the rest (None:
  nothing else). Code that moves positions (context parallelism shifts every index by a
  chunk's start) keeps the band as a `Band`, whose block rule needs only differences."""
  if isinstance(mask_mod, Band):
    return mask_mod, None
  if isinstance(mask_mod, _And):
    band = band_of(mask_mod)
    return band, and_masks(*(p for p in mask_mod.parts if not isinstance(p, Band)))
  return None, mask_mod


@dataclasses.dataclass(frozen=True, eq=False)
class Mod:
  """A mask or score function traced once: its jaxpr and which of `b, h, q_idx, kv_idx` it
  reads. The arrays it closed over are returned apart (`consts`), so that they travel as
  explicit arguments (floating ones can then get gradients) while the `Mod` itself is static.

  Build with `Mod.of_mask` / `Mod.of_score`. Equal Mods are the same computation (the
  jaxpr's text, which leaves the closed-over values out): two block masks built from
  `document(ids)` for different batches compare equal, so a jitted step taking a block mask
  as an argument is not retraced for each new batch.
  """
  fn: Any  # the user's function, for messages
  jaxpr: Any
  reads: tuple[bool, bool, bool, bool]
  is_score: bool

  @functools.cached_property
  def _key(self):
    return (str(self.jaxpr), self.reads, self.is_score)

  def __eq__(self, other):
    return isinstance(other, Mod) and self._key == other._key

  def __hash__(self):
    return hash(self._key)

  @staticmethod
  def _trace(fn, kind: str, args) -> tuple[Any, tuple[Any, ...]]:
    if not callable(fn):
      raise ValueError(f'{kind} must be callable, got {fn!r}')
    try:
      closed = jax.make_jaxpr(fn)(*args)
    except TypeError as e:
      want = 'score, b, h, q_idx, kv_idx' if kind == 'score_mod' else 'b, h, q_idx, kv_idx'
      raise ValueError(f'{kind} {_name(fn)} must take ({want}) as scalars: {e}') from None
    (out,) = closed.out_avals if len(closed.out_avals) == 1 else (None,)
    return closed, out

  @classmethod
  def of_mask(cls, mask_mod: MaskMod) -> tuple[Mod, tuple[Any, ...]]:
    """Traces `mask_mod(b, h, q_idx, kv_idx)` on int32 scalars (it must return a bool scalar);
    returns the `Mod` and the arrays it closed over."""
    closed, out = cls._trace(mask_mod, 'mask_mod', [jnp.int32(0)] * 4)
    if out is None or out.shape != () or out.dtype != jnp.bool_:
      got = closed.out_avals if out is None else f'{out.dtype}{list(out.shape)}'
      raise ValueError(f'mask_mod {_name(mask_mod)} must return a bool scalar for scalar '
                       f'(b, h, q_idx, kv_idx), returned {got}')
    return cls(mask_mod, closed.jaxpr, _reads(closed.jaxpr, 0), False), tuple(closed.consts)

  @classmethod
  def of_score(cls, score_mod: ScoreMod) -> tuple[Mod, tuple[Any, ...]]:
    """Traces `score_mod(score, b, h, q_idx, kv_idx)` (it must return a float scalar); returns
    the `Mod` and the arrays it closed over."""
    closed, out = cls._trace(score_mod, 'score_mod', [jnp.float32(0)] + [jnp.int32(0)] * 4)
    if out is None or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
      got = closed.out_avals if out is None else f'{out.dtype}{list(out.shape)}'
      raise ValueError(f'score_mod {_name(score_mod)} must return a float scalar for a scalar '
                       f'score and (b, h, q_idx, kv_idx), returned {got}')
    return cls(score_mod, closed.jaxpr, _reads(closed.jaxpr, 1), True), tuple(closed.consts)

  def __call__(self, consts, *args):
    """The function on scalars, with `consts` in place of the arrays it closed over."""
    (out,) = jax.core.eval_jaxpr(self.jaxpr, list(consts), *args)
    return out

  def grid(self, consts, b, h, q, kv, score=None, *, kv_major: bool = False):
    """Evaluates on the outer product of index vectors `b [B], h [H], q [T], kv [S]`.

    A mask comes back as `[B|1, H|1, T|1, S|1]`, size 1 on the arguments it does not read
    (so a causal mask is one `[T, S]` plane). A score mod takes `score [B, H, T, S]` and
    returns that shape. With `kv_major` the last two axes are `[S, T]` instead.
    """
    names = [b, h, kv, q] if kv_major else [b, h, q, kv]
    reads = list(self.reads)
    if kv_major:
      reads[2], reads[3] = reads[3], reads[2]
    mapped = [score is not None or r for r in reads]
    args = [vec if r else jnp.int32(0) for vec, r in zip(names, reads, strict=True)]

    def call(*xs):
      if self.is_score:
        s, *idx = xs
      else:
        s, idx = None, list(xs)
      if kv_major:
        idx[2], idx[3] = idx[3], idx[2]
      return self(consts, *([] if s is None else [s]), *idx)

    fn = call
    for axis in reversed(range(4)):
      if not mapped[axis]:
        continue
      in_axes = ([0] if score is not None else []) + [
          0 if (i == axis and reads[i]) else None for i in range(4)]
      fn = jax.vmap(fn, in_axes=tuple(in_axes))
    out = fn(*([] if score is None else [score]), *args)
    if score is not None:
      return out
    shape = [len(v) if m else 1 for v, m in zip(names, mapped, strict=True)]
    return jnp.reshape(out, shape)


def _reads(jaxpr, skip: int) -> tuple[bool, bool, bool, bool]:
  """Which of the four index arguments (after `skip` leading ones) the jaxpr uses."""
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  return tuple(id(v) in used for v in jaxpr.invars[skip:skip + 4])
