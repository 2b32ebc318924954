"""Autoregressive decoding: greedy, temperature/top-k/top-p sampling and beam search.

    tokens = generate(model, params, inputs=src, max_decode_len=64, method='beam',
                      beam_size=4, length_penalty=0.6)          # int32 [batch, 64]

Every model exposes `decoding_fns(params, inputs=, prompt=, max_decode_len=)` returning a
`DecodeFns` pair of pure functions:
  start() -> (logits [batch, vocab] for the first generated token, state)
  step(state, tokens [batch]) -> (logits [batch, vocab] for the next token, state)
The Transformers keep a KV cache in the state (a prompt prefills it in one call), the RNN
model its recurrent state. State leaves hold the batch on axis 0, except leaves under a
`layers` or `shared_layer` key (stacked by `nn.scan`) which hold it on axis 1; leaves with
no such axis (the cache index) are shared. Beam search repeats and reorders the state on
those axes, with two exceptions that keep its cost down:
  - the cross-attention keys/values of the source (`attention.CROSS_CACHE`) stay one per
    source row: the `beam_size` hypotheses of a row read the same copy;
  - the slots of a self-attention cache (`attention.SLOT_CACHE`) are reordered only up to
    the adapter's `filled_slots(state)`, chunk by chunk, as attention reads only those.

The loops are `lax.while_loop`s inside one `jax.jit` (keyed on the model, which is a
hashable flax module, and the static settings) and stop as soon as every sequence has
finished. Output: int32 `[batch, max_decode_len]`, each row the generated tokens up to and
including EOS, then pad (0). A row that has not produced EOS within `max_decode_len`
tokens is returned as it stands (no EOS).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from attn_jax.models.attention import slot_chunk
from attn_jax.models.names import CROSS_CACHE, SLOT_CACHE, STACKED
from attn_jax.tokens import BOS_ID, EOS_ID, PAD_ID

METHODS = ('greedy', 'sample', 'beam')


class DecodeFns(NamedTuple):
  start: Callable[[], tuple[jax.Array, Any]]
  step: Callable[[Any, jax.Array], tuple[jax.Array, Any]]
  # Slots written so far in the self-attention caches (int32 scalar); None: reorder all.
  filled_slots: Callable[[Any], jax.Array] | None = None


def _names(path) -> list[str]:
  return [getattr(k, 'key', None) for k in path]


def batch_axes(state: Any) -> Any:
  """Per-leaf batch axis of a decoding state (see the module docstring), or None for leaves
  every hypothesis shares."""
  def axis(path, leaf):
    names = _names(path)
    if names and names[-1] in CROSS_CACHE:
      return None
    a = 1 if any(n in STACKED for n in names) else 0
    return a if jnp.ndim(leaf) > a else None
  return jax.tree_util.tree_map_with_path(axis, state)


def _map_batch(fn, state: Any) -> Any:
  axes = batch_axes(state)
  return jax.tree.map(lambda x, a: x if a is None else fn(x, a), state, axes)


def _reorder_slots(x: jax.Array, source: jax.Array, axis: int, filled: jax.Array) -> jax.Array:
  """`take(x, source, axis)` on the first `filled` slots (axis `axis + 1`) only, chunk by
  chunk in place; the other slots are never read before being written again."""
  slots = x.shape[axis + 1]
  chunk = slot_chunk(slots)

  def one_chunk(c, x):
    block = jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis + 1)
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.take(block, source, axis=axis),
                                               c * chunk, axis + 1)

  count = (jnp.minimum(filled, slots) + chunk - 1) // chunk
  return jax.lax.fori_loop(0, count, one_chunk, x)


def reorder(state: Any, source: jax.Array, filled: jax.Array | None = None) -> Any:
  """The state of hypotheses `source` (int `[rows]`, indices into the batch axis); with
  `filled`, the self-attention caches' slots past it are left as they are."""
  axes = batch_axes(state)

  def one(path, x, a):
    if a is None:
      return x
    if filled is not None and _names(path)[-1] in SLOT_CACHE and x.ndim > a + 1:
      return _reorder_slots(x, source, a, filled)
    return jnp.take(x, source, axis=a)

  return jax.tree_util.tree_map_with_path(one, state, axes)


# --- Model adapters ------------------------------------------------------------------------

def _empty_cache(model, *args, **kwargs) -> Any:
  """Zero cache of the right shapes, from an abstract init (no parameters computed)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@dataclasses.dataclass(frozen=True)
class RecomputedCrossDecoding:
  """`EncoderDecoder` decoding that projects the cross-attention keys/values from the encoder
  output again at every step instead of caching them once, a reference for tests and
  benchmarks: `generate(RecomputedCrossDecoding(model), params, ...)`.

  Nothing shared per source reaches the decode state, so beam search repeats and reorders
  every array of it (whole caches: no `filled_slots`). With a model built with
  `capture_attention=True` its self-attention also reads every cache slot: the decoding path
  as it was before beam search was made to scale.
  """
  model: Any  # An EncoderDecoder.

  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    del prompt
    batch, model = inputs.shape[0], self.model

    def step(state, tokens):
      logits, mutated = model.apply(
          {'params': params, 'cache': state['cache']}, state['encoded'], state['inputs'],
          tokens[:, None], targets_segmentation=jnp.ones((tokens.shape[0], 1), jnp.int32),
          targets_positions=state['position'][:, None], decode=True, method='decode',
          mutable=['cache'])
      # Drop the cross-attention keys/values: the next step projects them again.
      cache = {k: v for k, v in traverse_util.flatten_dict(mutated['cache']).items()
               if k[-1] not in CROSS_CACHE}
      return logits[:, 0], dict(state, cache=traverse_util.unflatten_dict(cache),
                                position=state['position'] + 1)

    def start():
      encoded = model.apply({'params': params}, inputs, method='encode')
      cache = _empty_cache(model, encoded, inputs,
                           jnp.ones((batch, max_decode_len + 1), jnp.int32),
                           decode=True, method='decode')
      state = dict(cache=cache, encoded=encoded, inputs=inputs,
                   position=jnp.zeros((batch,), jnp.int32))
      return step(state, jnp.full((batch,), BOS_ID, jnp.int32))

    return DecodeFns(start, step)


def _check_length(model, length: int) -> None:
  cfg = model.config
  if cfg.positional == 'learned' and length > cfg.max_len:
    raise ValueError(f'decoding needs {length} positions but the learned position table has '
                     f'max_len={cfg.max_len}')


def encoder_decoder_fns(model, params, inputs: jax.Array, max_decode_len: int) -> DecodeFns:
  """`EncoderDecoder`: encode `inputs` `[batch, Ls]` once, then decode with the cache.

  The first call caches the cross-attention keys/values of the encoder output besides the
  BOS step's self-attention keys/values; the steps reuse them. `inputs` (which only give
  the cross-attention padding mask) stay out of the state: beams share them.
  """
  if inputs is None or inputs.ndim != 2:
    raise ValueError('EncoderDecoder decoding needs inputs [batch, length]')
  batch = inputs.shape[0]
  cache_len = max_decode_len + 1  # the BOS step, and the step fed the last token
  _check_length(model, cache_len)
  variables = {'params': params}

  def call(state, tokens, encoded=None):
    # `encoded` only at the first call: it caches the cross-attention keys/values.
    logits, mutated = model.apply(
        {**variables, 'cache': state['cache']}, encoded, inputs,
        tokens[:, None], targets_segmentation=jnp.ones((tokens.shape[0], 1), jnp.int32),
        targets_positions=state['position'][:, None], decode=True, method='decode',
        mutable=['cache'])
    state = dict(state, cache=mutated['cache'], position=state['position'] + 1,
                 filled=state['filled'] + 1)
    return logits[:, 0], state

  def start():
    encoded = model.apply(variables, inputs, method='encode')
    cache = _empty_cache(model, encoded, inputs, jnp.ones((batch, cache_len), jnp.int32),
                         decode=True, method='decode')
    state = dict(cache=cache, position=jnp.zeros((batch,), jnp.int32), filled=jnp.int32(0))
    return call(state, jnp.full((batch,), BOS_ID, jnp.int32), encoded)

  def step(state, tokens):
    return call(state, tokens)

  return DecodeFns(start, step, lambda state: state['filled'])


def decoder_lm_fns(model, params, prompt: jax.Array | None, max_decode_len: int) -> DecodeFns:
  """`DecoderLM`: prefill `[BOS] + prompt` in one call, then one token per step.

  `prompt` is int `[batch, P]`, right-padded with 0 (ragged lengths are fine: padding slots
  are masked and positions continue from each row's true length); `[batch, 0]` generates
  unconditionally.
  """
  if prompt is None or prompt.ndim != 2:
    raise ValueError('DecoderLM decoding needs prompt [batch, length] (use [batch, 0] for none)')
  batch, prompt_len = prompt.shape
  cache_len = prompt_len + max_decode_len + 1
  _check_length(model, cache_len)
  variables = {'params': params}
  lengths = jnp.sum(prompt != PAD_ID, axis=1).astype(jnp.int32)

  def call(cache, tokens, segment_ids, positions):
    logits, mutated = model.apply({**variables, 'cache': cache}, tokens, segment_ids=segment_ids,
                                  positions=positions, decode=True, mutable=['cache'])
    return logits, mutated['cache']

  def step(state, tokens):
    logits, cache = call(state['cache'], tokens[:, None],
                         jnp.ones((tokens.shape[0], 1), jnp.int32),
                         state['position'][:, None])
    return logits[:, 0], dict(cache=cache, position=state['position'] + 1,
                              filled=state['filled'] + 1)

  def start():
    tokens = jnp.concatenate([jnp.full((batch, 1), BOS_ID, prompt.dtype), prompt], axis=1)
    segment_ids = (tokens != PAD_ID).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len + 1), (batch, prompt_len + 1))
    cache = _empty_cache(model, jnp.ones((batch, cache_len), jnp.int32), decode=True)
    logits, cache = call(cache, tokens, segment_ids, positions)
    # The last real prompt token (or BOS) sits at slot `lengths`; it predicts the next one.
    first = jnp.take_along_axis(logits, lengths[:, None, None], axis=1)[:, 0]
    return first, dict(cache=cache, position=lengths + 1, filled=jnp.int32(prompt_len + 1))

  return DecodeFns(start, step, lambda state: state['filled'])


# --- Search --------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Temperature, then top-k, then nucleus (top-p) filtering of float `[batch, vocab]`.

  Filtered entries become -inf; the most likely token always survives.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _sample_loop(fns: DecodeFns, max_decode_len: int, select, rng,
                 max_lengths: jax.Array) -> jax.Array:
  """Greedy/sampling loop; `select(logits [b, vocab], rng) -> int tokens [b]`; a row capped
  below `max_decode_len` ends with EOS as its `max_lengths[r]`-th token."""
  logits, state = fns.start()
  batch = logits.shape[0]

  def cond(carry):
    i, _, finished, *_ = carry
    return (i < max_decode_len) & ~jnp.all(finished)

  def body(carry):
    i, seqs, finished, logits, state, rng = carry
    rng, key = jax.random.split(rng)
    tokens = select(logits, key).astype(jnp.int32)
    tokens = jnp.where((i + 1 >= max_lengths) & (max_lengths < max_decode_len), EOS_ID, tokens)
    tokens = jnp.where(finished, PAD_ID, tokens)
    seqs = seqs.at[:, i].set(tokens)
    finished = finished | (tokens == EOS_ID)
    logits, state = fns.step(state, tokens)
    return i + 1, seqs, finished, logits, state, rng

  carry = (jnp.array(0), jnp.zeros((batch, max_decode_len), jnp.int32),
           jnp.zeros((batch,), bool), logits, state, rng)
  return jax.lax.while_loop(cond, body, carry)[1]


def max_lengths_for(source_lengths: Any, max_len_a: float, max_len_b: int,
                    max_decode_len: int) -> np.ndarray:
  """Per-row output caps `min(max_decode_len, floor(a * source_length + b))`, int32 `[batch]`
  (fairseq's `--max-len-a/--max-len-b`; Vaswani et al. 2017 decode to source length + 50).
  a = b = 0: no cap but `max_decode_len`."""
  lengths = np.asarray(source_lengths, np.float64)
  if max_len_a == 0 and max_len_b == 0:
    return np.full(lengths.shape, max_decode_len, np.int32)
  caps = np.floor(max_len_a * lengths + max_len_b).astype(np.int64)
  return np.clip(caps, 1, max_decode_len).astype(np.int32)


def _length_penalty(length, alpha: float) -> jax.Array:
  """GNMT length normalization `((5 + length) / 6) ** alpha` (Wu et al. 2016)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(fns: DecodeFns, *, beam_size: int, max_decode_len: int,
                length_penalty: float = 0.6, max_lengths: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """Beam search with length penalty; finished hypotheses leave the beam at EOS.

  Each step expands the `beam_size` alive hypotheses to their `2 * beam_size` best
  continuations; those ending in EOS within the best `beam_size` compete (score = log-prob
  / length penalty) for the `beam_size` finished slots, the best `beam_size` not ending in
  EOS become the new alive beam. The search stops once no alive hypothesis can beat the
  worst finished one (log-probs only fall, and the penalty is largest at the row's cap,
  `max_decode_len` without one). Rows with no finished hypothesis fall back to their alive
  ones. `max_lengths` (int `[batch]`, default `max_decode_len`) caps each row:
  below `max_decode_len`, its hypotheses must end (EOS) by that many tokens, as fairseq's
  `max_len_a/b` make them (at `max_decode_len` a row stops as it always has, finished or not).

  Returns:
    int32 sequences `[batch, beam_size, max_decode_len]`, best first, and float32 scores
    `[batch, beam_size]`.
  """
  k, t = beam_size, max_decode_len
  logits, state = fns.start()
  batch, vocab = logits.shape
  state = _map_batch(lambda x, a: jnp.repeat(x, k, axis=a), state)
  logits = jnp.repeat(logits, k, axis=0)
  neg_inf = jnp.float32(-jnp.inf)

  def gather(x, idx):  # x [batch, n, ...], idx [batch, m] -> [batch, m, ...]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  if max_lengths is None:
    max_lengths = jnp.full((batch,), t, jnp.int32)
  # The largest penalty a row's hypotheses can still get: at its cap, the longest they grow.
  max_penalty = _length_penalty(jnp.minimum(max_lengths, t), length_penalty)
  only_eos = jnp.where(jnp.arange(vocab) == EOS_ID, 0.0, neg_inf)  # [vocab]

  def cond(carry):
    i, _, alive_logp, _, fin_scores, *_ = carry
    best_alive = alive_logp[:, 0] / max_penalty
    done = jnp.all(jnp.min(fin_scores, axis=1) >= best_alive) | jnp.all(alive_logp == neg_inf)
    return (i < t) & ~done

  def body(carry):
    i, alive_seqs, alive_logp, fin_seqs, fin_scores, logits, state = carry
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    # A row at its cap may only end: every hypothesis takes EOS now.
    at_cap = (i + 1 >= max_lengths) & (max_lengths < t)
    logp = jnp.where(at_cap[:, None, None], logp + only_eos, logp)
    candidates = (alive_logp[:, :, None] + logp).reshape(batch, k * vocab)
    top_logp, top_idx = jax.lax.top_k(candidates, 2 * k)  # [batch, 2k]
    beam, tokens = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = gather(alive_seqs, beam).at[:, :, i].set(tokens)  # [batch, 2k, t]
    is_eos = tokens == EOS_ID

    alive_logp, alive_idx = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_logp), k)
    alive_seqs, alive_tokens = gather(seqs, alive_idx), gather(tokens, alive_idx)
    source = (jnp.arange(batch)[:, None] * k + gather(beam, alive_idx)).reshape(-1)

    # A hypothesis finishes only if its EOS ranks within the top `k` (as in fairseq), so
    # beam_size=1 is exactly greedy decoding.
    finishes = is_eos & (jnp.arange(2 * k) < k)[None]
    new_scores = jnp.where(finishes, top_logp / _length_penalty(i + 1, length_penalty), neg_inf)
    fin_scores, fin_idx = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = gather(jnp.concatenate([fin_seqs, seqs], axis=1), fin_idx)

    filled = None if fns.filled_slots is None else fns.filled_slots(state)
    state = reorder(state, source, filled)
    logits, state = fns.step(state, alive_tokens.reshape(-1))
    return i + 1, alive_seqs, alive_logp, fin_seqs, fin_scores, logits, state

  alive_logp = jnp.full((batch, k), neg_inf).at[:, 0].set(0.0)  # beams start identical
  carry = (jnp.array(0), jnp.zeros((batch, k, t), jnp.int32), alive_logp,
           jnp.zeros((batch, k, t), jnp.int32), jnp.full((batch, k), neg_inf), logits, state)
  i, alive_seqs, alive_logp, fin_seqs, fin_scores, _, _ = jax.lax.while_loop(cond, body, carry)
  none_finished = (fin_scores[:, 0] == neg_inf)[:, None]
  seqs = jnp.where(none_finished[:, :, None], alive_seqs, fin_seqs)
  scores = jnp.where(none_finished, alive_logp / _length_penalty(i, length_penalty), fin_scores)
  return seqs, scores


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_decode_len', 'method', 'beam_size', 'length_penalty', 'temperature', 'top_k',
    'top_p'))
def _generate(model, params, inputs, prompt, rng, max_lengths, *, max_decode_len, method,
              beam_size, length_penalty, temperature, top_k, top_p):
  fns = model.decoding_fns(params, inputs=inputs, prompt=prompt, max_decode_len=max_decode_len)
  if method == 'beam':
    return beam_search(fns, beam_size=beam_size, max_decode_len=max_decode_len,
                       length_penalty=length_penalty, max_lengths=max_lengths)[0][:, 0]

  def select(logits, key):
    if method == 'greedy':
      return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(
        key, filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))

  return _sample_loop(fns, max_decode_len, select, rng, max_lengths)


def generate(model, params, inputs: jax.Array | None = None, prompt: jax.Array | None = None,
             *, max_decode_len: int, method: str = 'greedy', beam_size: int = 4,
             length_penalty: float = 0.6, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, rng: jax.Array | None = None,
             max_lengths: jax.Array | None = None) -> jax.Array:
  """Generates int32 `[batch, max_decode_len]` tokens (EOS, then pad) from `model`.

  Args:
    model: `EncoderDecoder` / `RNNSeq2Seq` (give `inputs` `[batch, Ls]`), `DecoderLM`
      (give `prompt` `[batch, P]`, right-padded), or any hashable object with the same
      `decoding_fns` method.
    params: the model's 'params' collection (boxed or plain).
    method: 'greedy', 'sample' (temperature / top_k / top_p, needs `rng`) or 'beam'
      (`beam_size`, `length_penalty` alpha; 0 = plain log-probability).
    max_lengths: int `[batch]`, each row's most tokens, EOS included (e.g. `max_lengths_for`
      the source lengths); a row capped below `max_decode_len` ends with EOS by then.
      Default: `max_decode_len` for all (outputs as without caps).
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}')
  if max_decode_len <= 0:
    raise ValueError(f'max_decode_len must be positive, got {max_decode_len}')
  if method == 'beam' and beam_size <= 0:
    raise ValueError(f'beam_size must be positive, got {beam_size}')
  if method == 'beam' and length_penalty < 0:
    raise ValueError(f'length_penalty must be >= 0 (early stopping assumes it), got '
                     f'{length_penalty}')
  if method == 'sample':
    if rng is None:
      raise ValueError("method='sample' needs rng")
    if temperature <= 0:
      raise ValueError(f'temperature must be positive, got {temperature}')
    if top_k is not None and top_k <= 0:
      raise ValueError(f'top_k must be positive, got {top_k}')
    if top_p is not None and not 0.0 < top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  if rng is None:
    rng = jax.random.key(0)
  batch = (inputs if inputs is not None else prompt).shape[0]
  if max_lengths is None:
    max_lengths = np.full((batch,), max_decode_len, np.int32)
  elif np.shape(max_lengths) != (batch,):
    raise ValueError(f'max_lengths has shape {np.shape(max_lengths)}; want ({batch},), one '
                     'per row')
  max_lengths = jnp.clip(jnp.asarray(max_lengths, jnp.int32), 1, max_decode_len)
  return _generate(model, params, inputs, prompt, rng, max_lengths,
                   max_decode_len=max_decode_len,
                   method=method, beam_size=beam_size, length_penalty=float(length_penalty),
                   temperature=float(temperature), top_k=top_k, top_p=top_p)
