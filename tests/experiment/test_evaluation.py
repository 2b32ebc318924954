"""Unit tests of the experiment plumbing: model building from config + data meta, task
losses against a naive formula, decoding metrics, attention-map extraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attn_jax import models
from attn_jax.experiment import evaluation, tasks
from attn_jax.experiment.config import default_eval, model_section


def test_until_eos_and_exact_match_by_length():
  assert evaluation.until_eos([5, 6, 2, 7, 0]) == [5, 6, 2]
  assert evaluation.until_eos([0, 5, 6]) == [5, 6]  # no EOS: everything but pad
  preds = [[4, 2], [5, 6, 2], [7, 7, 7, 7, 2], [4, 5, 6, 7, 8, 9, 10, 2]]
  tgts = [[4, 2], [5, 7, 2], [7, 7, 7, 7, 2], [4, 5, 6, 7, 8, 9, 10, 2]]
  out = evaluation.exact_match_by_length(preds, tgts, 'test/', max_length=8)
  assert out['test/sequence_accuracy'] == pytest.approx(0.75)
  # Bins split [1, 8] into [1,2], [3,4], [5,6], [7,8] whatever lengths occur.
  assert out['test/sequence_accuracy_len_1_2'] == 1.0
  assert out['test/sequence_accuracy_len_3_4'] == 0.0
  assert out['test/sequence_accuracy_len_5_6'] == 1.0
  assert out['test/sequence_accuracy_len_7_8'] == 1.0


def test_bleu_bounds():
  refs = ['the cat sat on the mat today', 'a dog ran in the park']
  assert evaluation.bleu(refs, refs) == pytest.approx(100.0)
  assert evaluation.bleu(['xx yy zz qq', 'uu vv ww rr'], refs) == pytest.approx(0.0)


def test_chrf_counts_character_ngrams_with_recall_weighted_twice():
  refs = ['the cat sat on the mat today', 'a dog ran in the park']
  assert evaluation.chrf(refs, refs) == pytest.approx(100.0)
  assert evaluation.chrf(['qqqq', 'zzzz'], refs) == pytest.approx(0.0)
  # By hand: chrF averages character n-gram precision and recall over the orders the
  # hypothesis has (up to 6; 'ab' has unigrams and one bigram) and weighs recall beta^2 = 4
  # times as much as precision.
  hyp, ref = 'ab', 'abcd'
  prec = (2 / 2 + 1 / 1) / 2  # every n-gram of 'ab' is in 'abcd'
  rec = (2 / 4 + 1 / 3) / 2  # of the 4 unigrams and 3 bigrams of 'abcd'
  want = 100 * 5 * prec * rec / (4 * prec + rec)
  assert evaluation.chrf([hyp], [ref]) == pytest.approx(want, rel=1e-6)


def test_attention_maps_unrolled_scanned_and_rnn():
  w = np.random.default_rng(0).random((2, 4, 3, 5)).astype(np.float32)  # [b, heads, q, kv]
  inter = {
      'encoder': {'layer_1': {'encoder_self': {'attention_weights': (w,)}}},
      'decoder': {'layers': {'cross': {'attention_weights': (np.stack([w, 2 * w]),)}}},
      'step': {'rnn_attention': (w[:, 0],)},
      'other': {'something': (w,)},
  }
  maps = {(k, layer): m for k, layer, m in evaluation.attention_maps(inter)}
  assert set(maps) == {('encoder_self', 1), ('cross', 0), ('cross', 1), ('rnn_attention', 0)}
  np.testing.assert_array_equal(maps['cross', 1], 2 * w)
  assert maps['rnn_attention', 0].shape == (2, 1, 3, 5)


def test_build_model_config_takes_sizes_from_data():
  fields = model_section('encoder_decoder', 'tiny', positional='learned').to_dict()
  del fields['kind']
  cfg = tasks.build_model_config({'kind': 'encoder_decoder', **fields},
                                 {'task': 'seq2seq', 'input_vocab_size': 30,
                                  'target_vocab_size': 30, 'max_length': 300})
  assert cfg.vocab_size == 30 and cfg.output_vocab_size is None and cfg.max_len >= 300
  with pytest.raises(ValueError, match='vocab_size comes from the data'):
    tasks.build_model_config({'kind': 'encoder_decoder', 'vocab_size': 3, **fields},
                             {'task': 'seq2seq'})
  with pytest.raises(ValueError, match="serves 'seq2seq' data but the dataset is 'lm'"):
    tasks.build_model_config({'kind': 'encoder_decoder', **fields}, {'task': 'lm'})
  with pytest.raises(ValueError, match=r"config.model has unknown field\(s\) \['colour'\]"):
    tasks.build_model_config({'kind': 'encoder_decoder', **fields, 'colour': 1},
                             {'task': 'seq2seq'})
  # Every field comes from the config: nothing is filled in from a size variant.
  partial = {k: v for k, v in fields.items() if k != 'd_model'}
  with pytest.raises(ValueError, match=r"config.model lacks field\(s\) \['d_model'\]"):
    tasks.build_model_config({'kind': 'encoder_decoder', **partial}, {'task': 'seq2seq'})


def test_classification_loss_ignores_padding_rows():
  model = model_section('encoder_classifier', 'tiny', d_model=16, d_ff=16, num_encoder_layers=1,
                        dropout_rate=0.0, attention=dict(num_heads=2))
  config = ml_collections.ConfigDict({'model': model,
                                      'loss': {'label_smoothing': 0.0}})
  task = tasks.make_task(config, {'task': 'classification', 'vocab_size': 12,
                                  'num_classes': 3, 'max_length': 8})
  params = task.init_params(jax.random.key(0))
  batch = {'inputs': jnp.array([[5, 6, 2, 0], [7, 2, 0, 0], [0, 0, 0, 0]], jnp.int32),
           'label': jnp.array([1, 2, 0], jnp.int32)}
  objective, metrics = task.loss_fn(params, batch, jax.random.key(1), False)
  logits = task.apply(params, batch)
  naive = optax.softmax_cross_entropy_with_integer_labels(logits[:2], batch['label'][:2]).sum()
  np.testing.assert_allclose(objective, naive, rtol=1e-5)  # float32
  assert float(metrics['loss'][1]) == 2.0  # the all-pad row does not count


class _CopyModel:
  """Decodes each input row back (up to its EOS); records the input shapes it is given."""
  shapes: list = []

  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    from attn_jax.models.decoding import DecodeFns
    _CopyModel.shapes.append(inputs.shape)
    vocab = 16

    def step(i, tokens):
      del tokens
      column = jnp.take(inputs, jnp.minimum(i, inputs.shape[1] - 1), axis=1)
      return jax.nn.one_hot(jnp.where(i < inputs.shape[1], column, 2), vocab) * 10, i + 1

    return DecodeFns(lambda: step(jnp.int32(0), None), step)


def test_decode_split_decodes_sorted_by_length_and_answers_in_input_order():
  """Rows of very different lengths over two batches: each prediction is its own row's
  output, batches are formed by length (so a short row is padded to a short width) and keep
  the batch size, and pad rows are skipped."""
  rng = np.random.default_rng(0)
  lengths = [30, 3, 25, 4, 5, 28, 6, 2]
  rows = [list(rng.integers(3, 16, n)) + [2] for n in lengths]
  batches = []
  for start in (0, 4):
    inputs = np.zeros((4, 40), np.int32)
    for i, r in enumerate(rows[start:start + 4]):
      inputs[i, :len(r)] = r
    batches.append({'inputs': inputs, 'targets': inputs})
  batches.append({'inputs': np.zeros((4, 40), np.int32), 'targets': np.zeros((4, 40), np.int32)})
  task = type('Task', (), {'model': _CopyModel()})()
  e = ml_collections.ConfigDict(dict(decode_method='greedy', beam_size=1, length_penalty=0.0,
                                     temperature=1.0, top_k=0, top_p=1.0))
  _CopyModel.shapes.clear()
  srcs, preds, tgts = evaluation.decode_split(task, None, batches, e, max_decode_len=40)
  assert srcs == [[int(t) for t in r] for r in rows] == tgts
  assert preds == srcs  # the copy of each row, in input order
  # Short rows together at width 8, long ones at 32; both batches keep 4 rows.
  assert sorted(_CopyModel.shapes) == [(4, 8), (4, 32)]
  assert [evaluation.padded_width(n) for n in (1, 8, 9, 64, 65, 80, 129, 250)] == [
      8, 8, 16, 64, 80, 80, 160, 256]


class _NeverEnds:
  """A decoder that always prefers token 5 (never EOS): outputs run to their length limit."""

  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    def logits(rows):
      return jnp.zeros((rows, 8)).at[:, 5].set(1.0)
    return models.DecodeFns(lambda: (logits(inputs.shape[0]), {}),
                            lambda state, tokens: (logits(tokens.shape[0]), state))


@pytest.mark.parametrize('method', ['greedy', 'beam'])
def test_eval_max_len_a_b_caps_outputs_by_source_length(method):
  task = type('Task', (), {'model': _NeverEnds()})()
  e = default_eval()
  e.decode_method, e.beam_size, e.max_len_a, e.max_len_b = method, 2, 1.0, 2
  inputs = np.array([[7, 2, 0, 0], [7, 7, 7, 2]], np.int32)  # 2 and 4 source tokens
  out = evaluation.generate(task, None, e, inputs=inputs, max_decode_len=10)
  assert [evaluation.until_eos(r) for r in out] == [[5, 5, 5, 2], [5] * 5 + [2]]
  e.max_len_a = e.max_len_b = 0  # off: the limit alone, reached without EOS
  out = evaluation.generate(task, None, e, inputs=inputs, max_decode_len=10)
  assert [len(evaluation.until_eos(r)) for r in out] == [10, 10]
  e.max_len_b = -1
  with pytest.raises(ValueError, match='max_len_b=-1 must be >= 0'):
    evaluation.validate_config(ml_collections.ConfigDict({'eval': e}))
