"""Decoding: greedy / sampling / beam search on a hand-built table model and on real models."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models
from attn_jax.models import attention, decoding
from attn_jax.models.decoding import BOS_ID, EOS_ID, DecodeFns, filter_logits

A, B_, C = 3, 4, 5  # token ids of the table model (0 pad, 1 BOS, 2 EOS)
STEPS: list[int] = []  # decoding steps taken by the table model (via a debug callback)


def _table() -> np.ndarray:
  """Next-token probabilities given the previous token. Greedy takes A (0.5), then C (0.4),
  then EOS: p = 0.2. The best sequence is B EOS: 0.4 * 0.9 = 0.36."""
  probs = np.full((6, 6), 0.0)
  probs[BOS_ID, [A, B_, C]] = [0.5, 0.4, 0.1]
  probs[A, [C, B_, EOS_ID]] = [0.4, 0.3, 0.3]
  probs[B_, [EOS_ID, A]] = [0.9, 0.1]
  probs[C, EOS_ID] = probs[EOS_ID, EOS_ID] = probs[0, EOS_ID] = 1.0
  return np.log(np.maximum(probs, 1e-12)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TableModel:
  """A decoder whose logits are `params[previous token]`; same interface as the models."""

  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    batch = inputs.shape[0]

    def step(state, tokens):
      jax.debug.callback(lambda: STEPS.append(1))
      return params[tokens], dict(previous=tokens)

    def start():
      return step(dict(previous=jnp.zeros((batch,), jnp.int32)),
                  jnp.full((batch,), BOS_ID, jnp.int32))
    return DecodeFns(start, step)


def _generate(method, batch=2, **kwargs):
  STEPS.clear()
  out = models.generate(TableModel(), jnp.asarray(_table()), inputs=jnp.zeros((batch, 1)),
                        max_decode_len=6, method=method, **kwargs)
  jax.effects_barrier()
  return np.asarray(out)


def test_greedy_follows_the_table_and_stops_once_every_row_has_finished():
  out = _generate('greedy')
  np.testing.assert_array_equal(out, [[A, C, EOS_ID, 0, 0, 0]] * 2)
  assert len(STEPS) == 1 + 3  # start, then one step per generated token; not 6


def test_beam_search_finds_the_sequence_greedy_misses():
  out = _generate('beam', beam_size=2, length_penalty=0.0)
  np.testing.assert_array_equal(out, [[B_, EOS_ID, 0, 0, 0, 0]] * 2)
  assert len(STEPS) < 1 + 6  # stopped early: no alive beam could beat the finished ones
  seqs, scores = models.beam_search(
      TableModel().decoding_fns(jnp.asarray(_table()), inputs=jnp.zeros((1, 1)),
                                max_decode_len=6), beam_size=2, max_decode_len=6,
      length_penalty=0.0)
  np.testing.assert_allclose(scores[0], np.log([0.36, 0.2]), rtol=1e-5)
  np.testing.assert_array_equal(seqs[0, 1, :3], [A, C, EOS_ID])


def test_beam_of_one_equals_greedy_on_the_table():
  np.testing.assert_array_equal(_generate('beam', beam_size=1, length_penalty=0.0),
                                _generate('greedy'))


def test_per_row_length_caps_end_each_row_with_eos_and_stop_the_loop_early():
  # Greedy: row 0 capped at 2 tokens takes A, then must end; row 1 runs as uncapped.
  out = _generate('greedy', max_lengths=np.array([2, 6]))
  np.testing.assert_array_equal(out, [[A, EOS_ID, 0, 0, 0, 0], [A, C, EOS_ID, 0, 0, 0]])
  out = _generate('greedy', max_lengths=np.array([2, 2]))
  np.testing.assert_array_equal(out, [[A, EOS_ID, 0, 0, 0, 0]] * 2)
  assert len(STEPS) == 1 + 2  # the loop ends with the last row's cap
  # Beam: at its cap a row's hypotheses can only end; EOS keeps the model's probability.
  fns = TableModel().decoding_fns(jnp.asarray(_table()), inputs=jnp.zeros((2, 1)),
                                  max_decode_len=6)
  seqs, scores = models.beam_search(fns, beam_size=2, max_decode_len=6, length_penalty=0.0,
                                    max_lengths=jnp.array([2, 1]))
  np.testing.assert_array_equal(seqs[0, :, :2], [[B_, EOS_ID], [A, EOS_ID]])
  np.testing.assert_allclose(scores[0], np.log([0.36, 0.5 * 0.3]), rtol=1e-5)
  np.testing.assert_array_equal(seqs[1, 0, :2], [EOS_ID, 0])  # cap 1: EOS at once
  with pytest.raises(ValueError, match=r'max_lengths has shape \(3,\); want \(2,\)'):
    _generate('greedy', max_lengths=np.array([1, 2, 3]))


def test_beam_search_stops_by_the_length_penalty_at_each_rows_cap():
  # After 3 steps the best alive hypothesis (A B A, log p -4.2) could score at best
  # -4.2 / lp(cap 5) = -2.5 < the 2nd finished (A C EOS, -1.2): the search ends there. Bounded
  # by lp(50) instead (-0.46) it would have run on until the cap forced EOS, 1 + 5 steps.
  STEPS.clear()
  out = models.generate(TableModel(), jnp.asarray(_table()), inputs=jnp.zeros((2, 1)),
                        max_decode_len=50, method='beam', beam_size=2, length_penalty=1.0,
                        max_lengths=np.array([5, 5]))
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(out)[:, :3], [[B_, EOS_ID, 0]] * 2)
  assert len(STEPS) == 1 + 3


def test_max_lengths_for_follows_source_length_and_the_limit():
  lengths = np.array([0, 3, 10, 100])
  np.testing.assert_array_equal(decoding.max_lengths_for(lengths, 1.0, 50, 64),
                                [50, 53, 60, 64])
  np.testing.assert_array_equal(decoding.max_lengths_for(lengths, 1.5, 1, 200),
                                [1, 5, 16, 151])
  np.testing.assert_array_equal(decoding.max_lengths_for(lengths, 0.0, 0, 64), [64] * 4)


def test_sampling_filters_and_frequencies():
  greedy = _generate('greedy')
  rng = jax.random.key(0)
  np.testing.assert_array_equal(_generate('sample', top_k=1, rng=rng), greedy)
  first = _generate('sample', batch=4000, rng=rng)[:, 0]
  freq = [np.mean(first == t) for t in (A, B_, C)]
  np.testing.assert_allclose(freq, [0.5, 0.4, 0.1], atol=0.03)
  # Temperature 0.5 squares the probabilities before renormalizing; top-k=2 drops C.
  first = _generate('sample', batch=4000, top_k=2, temperature=0.5, rng=rng)[:, 0]
  freq = [np.mean(first == t) for t in (A, B_, C)]
  np.testing.assert_allclose(freq, [0.25 / 0.41, 0.16 / 0.41, 0.0], atol=0.03)


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.7)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.81, top_k=2)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_bad_decoding_arguments_raise():
  with pytest.raises(ValueError, match='method'):
    _generate('nucleus')
  with pytest.raises(ValueError, match='rng'):
    models.generate(TableModel(), jnp.asarray(_table()), inputs=jnp.zeros((1, 1)),
                    max_decode_len=3, method='sample')


VOCAB = 11


def _tiny(**overrides):
  return models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0,
                                   num_encoder_layers=1, **overrides)


@pytest.mark.parametrize('kind', ['transformer_scan', 'rnn'])
def test_cached_greedy_decoding_agrees_with_the_full_forward(kind):
  inputs = jnp.array([[5, 6, 7, 2, 0], [4, 9, 8, 3, 2]], jnp.int32)
  if kind == 'rnn':
    model = models.RNNSeq2Seq(models.rnn_config('tiny', vocab_size=VOCAB, attention='general'))
  else:
    model = models.EncoderDecoder(_tiny(scan_layers=True, num_decoder_layers=1,
                                        attention=dict(num_kv_heads=2)))

  @jax.jit  # one program per case: compiling is what costs time here
  def decode(inputs):
    params = nn.unbox(model.init(jax.random.key(0), inputs, inputs))['params']
    out = models.generate(model, params, inputs=inputs, max_decode_len=6)
    # Teacher forcing the generated tokens must reproduce them as the argmax.
    logits = model.apply({'params': params}, inputs, out)
    beam = None
    if kind != 'rnn':  # beam search reorders the cache; scanned layers keep batch on axis 1
      beam = models.generate(model, params, inputs=inputs, max_decode_len=6, method='beam',
                             beam_size=1, length_penalty=0.0)
    return out, logits, beam

  out, logits, beam = decode(inputs)
  out = np.asarray(out)
  assert out.shape == (2, 6) and out.dtype == np.int32
  real = out != 0
  np.testing.assert_array_equal(np.argmax(logits, -1)[real], out[real])
  if beam is not None:
    np.testing.assert_array_equal(beam, out)


def test_decoder_lm_ragged_prompts_generate_as_if_alone():
  model = models.DecoderLM(_tiny(positional='alibi', num_decoder_layers=1))
  prompts = jnp.array([[5, 6, 7, 0, 0], [4, 9, 8, 3, 10]], jnp.int32)

  @jax.jit  # one program: compiling is what costs time here
  def decode(prompts):
    params = nn.unbox(model.init(jax.random.key(0), prompts))['params']
    both = models.generate(model, params, prompt=prompts, max_decode_len=4)
    alone = models.generate(model, params, prompt=prompts[:1, :3], max_decode_len=4)
    # The continuation is what the full forward pass predicts after the prompt.
    logits = model.apply({'params': params}, jnp.concatenate([prompts[:1, :3], alone], axis=1))
    return both, alone, logits

  both, alone, logits = decode(prompts)
  np.testing.assert_array_equal(both[0], alone[0])
  real = np.asarray(alone[0]) != 0
  np.testing.assert_array_equal(np.argmax(logits[0, 3:], -1)[real], np.asarray(alone[0])[real])


def test_beam_search_with_shared_cross_keys_and_filled_slots_equals_the_full_cache_path(
    monkeypatch):
  """Beam 4 over a cache of several chunks: the same hypotheses and scores as attending to
  (and reordering) every slot with per-beam cross-attention keys/values. (Greedy decoding
  takes the same attention path with one hypothesis per row.)"""
  monkeypatch.setattr(attention, 'DECODE_CHUNK', 4)  # 13 slots -> 16: four chunks
  cfg = _tiny(num_decoder_layers=2, positional='rope', d_ff=24, tie_output=False,
              attention=dict(num_kv_heads=1))
  model = models.EncoderDecoder(cfg)
  # Every slot attended (capture_attention's dense path), whole caches reordered, cross
  # keys/values projected per hypothesis: the path before beam search was made to scale.
  reference = decoding.RecomputedCrossDecoding(models.EncoderDecoder(dataclasses.replace(
      cfg, capture_attention=True)))
  inputs = jnp.array([[5, 6, 7, 2, 0, 0], [4, 9, 8, 3, 10, 2], [3, 2, 0, 0, 0, 0]], jnp.int32)

  @jax.jit  # one program: compiling is what costs time here
  def decode(inputs):
    params = nn.unbox(model.init(jax.random.key(3), inputs, inputs))['params']
    # Make EOS unlikely early, so hypotheses run long and fill several chunks.
    kernel = params['decoder']['logits']['kernel']
    params['decoder']['logits']['bias'] = jnp.zeros(kernel.shape[-1]).at[EOS_ID].set(-2.0)
    out = {}
    for name, m in [('new', model), ('reference', reference)]:
      fns = m.decoding_fns(params, inputs=inputs, max_decode_len=12)
      out[name] = decoding.beam_search(fns, beam_size=4, max_decode_len=12, length_penalty=0.6)
    return out

  out = decode(inputs)
  (seqs, scores), (ref_seqs, ref_scores) = out['new'], out['reference']
  np.testing.assert_array_equal(seqs, ref_seqs)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
  assert np.mean(np.asarray(seqs) != 0) > 0.5  # long hypotheses: most slots were filled


def test_beam_search_over_a_shared_layer_stack():
  """ALBERT-style sharing stacks the cache under `shared_layer` (layers on axis 0): beam
  search must repeat and reorder the batch axis (1), or the stack's shapes break."""
  model = models.EncoderDecoder(_tiny(share_layers=True, num_decoder_layers=2, d_ff=20))
  inputs = jnp.array([[5, 6, 7, 2], [4, 9, 2, 0]], jnp.int32)

  @jax.jit
  def decode(inputs):
    params = nn.unbox(model.init(jax.random.key(0), inputs, inputs))['params']
    return decoding.beam_search(model.decoding_fns(params, inputs=inputs, max_decode_len=5),
                                beam_size=3, max_decode_len=5)

  seqs, scores = decode(inputs)
  scores = np.asarray(scores)
  assert seqs.shape == (2, 3, 5) and np.all(np.isfinite(scores[:, 0]))
  assert np.all(scores[:, :1] >= scores)  # best first


@pytest.mark.parametrize('positional, pattern', [('rope', 'L'), ('alibi', 'LG'),
                                                 ('sinusoidal', 'LLG')])
def test_ragged_prompts_with_sliding_window_layers_decode_as_if_alone(positional, pattern):
  """Each row of a batch of ragged prompts, fed the same continuation step by step, gets the
  logits it gets alone and that the full forward pass gives: the window counts token
  positions, not cache slots (a short prompt's padding slots must not take real keys' places
  in its window). Logits, not greedy tokens, so a context-blind model cannot pass."""
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0,
                                  num_encoder_layers=0, positional=positional,
                                  num_decoder_layers=len(pattern), layer_pattern=pattern,
                                  attention=dict(sliding_window=2))
  model = models.DecoderLM(cfg)
  prompts = jnp.array([[5, 6, 7, 8, 0, 0], [4, 9, 0, 0, 0, 0], [4, 9, 8, 3, 10, 6]], jnp.int32)
  lengths = [4, 2, 6]
  continuation = jnp.array([[7, 3, 9, 4, 6], [8, 8, 5, 10, 3], [5, 4, 6, 7, 9]], jnp.int32)

  def stepwise(params, prompt, tokens):
    fns = model.decoding_fns(params, prompt=prompt, max_decode_len=tokens.shape[1])
    first, state = fns.start()
    _, rest = jax.lax.scan(lambda state, t: fns.step(state, t)[::-1], state,
                           tokens[:, :-1].T)  # one compiled step, not one per token
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

  @jax.jit
  def run(prompts, continuation):
    params = nn.unbox(model.init(jax.random.key(0), prompts))['params']
    batched = stepwise(params, prompts, continuation)  # [rows, steps, vocab]
    full = [model.apply({'params': params}, jnp.concatenate(
        [prompts[r:r + 1, :n], continuation[r:r + 1]], axis=1))[0, n:]
            for r, n in enumerate(lengths)]
    # The shortest prompt (most padding in the batch) decoded alone as well.
    alone = stepwise(params, prompts[1:2, :lengths[1]], continuation[1:2])[0]
    return batched, alone, full

  batched, alone, full = run(prompts, continuation)
  for r in range(len(lengths)):
    np.testing.assert_allclose(batched[r], full[r], atol=1e-5, err_msg=f'row {r} vs forward')
  np.testing.assert_allclose(alone, batched[1], atol=1e-5, err_msg='row 1 alone vs batched')
