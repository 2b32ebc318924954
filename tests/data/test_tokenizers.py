"""Tokenizer round trips, unknown symbols, special ids, save/load and pickling."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from attn_jax import data
from attn_jax.data import tokenizers
from tests.data.conftest import FIXTURES

TEXTS = ['Grüße aus Köln!', 'naïve café — 東京', 'plain ascii', '']


def _lines(name):
  with open(os.path.join(FIXTURES, name), encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def test_byte_round_trip_and_ids():
  tok = data.ByteTokenizer()
  for t in TEXTS:
    ids = tok.encode(t)
    assert ids.dtype == np.int32 and (ids >= 4).all() and (ids < tok.vocab_size).all()
    assert len(ids) == len(t.encode('utf-8'))
    assert tok.decode(ids) == t
  # decode stops at EOS and skips pad/bos
  ids = np.concatenate([[data.BOS_ID], tok.encode('ab'), [data.EOS_ID], tok.encode('zz'), [0]])
  assert tok.decode(ids) == 'ab'


def test_char_vocab_from_training_and_unknown_chars():
  tok = data.CharTokenizer.train(['abcab', 'cba'])
  assert tok.vocab_size == 4 + 3
  assert tok.decode(tok.encode('cab')) == 'cab'
  ids = tok.encode('abz')
  assert ids.tolist()[-1] == data.UNK_ID
  assert tok.decode(ids) == 'ab\N{REPLACEMENT CHARACTER}'
  # Most frequent first, so a vocabulary cap keeps the common characters.
  capped = data.CharTokenizer.train(['aaab'], max_vocab_size=5)
  assert capped.chars == ['a'] and capped.encode('b').tolist() == [data.UNK_ID]


def test_word_tokenizer_fixed_vocab():
  tok = data.WordTokenizer(['[MAX', ']', '1', '2'])
  ids = tok.encode('[MAX 1 2 ] 7')
  assert ids.tolist() == [4, 6, 7, 5, data.UNK_ID]
  assert tok.decode(ids[:4]) == '[MAX 1 2 ]'


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_round_trip_on_fixture(model_type, tmp_path):
  texts = _lines('tiny.en') + _lines('tiny.de')
  tok = data.SentencePieceTokenizer.train(texts, vocab_size=80, model_type=model_type)
  sp = tok._sp
  assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert tok.vocab_size <= 80
  for t in texts[:20]:
    ids = tok.encode(t)
    assert (ids >= 4).all()
    assert tok.decode(np.append(ids, data.EOS_ID)) == t
  # Unknown characters become unk, not an error.
  assert data.UNK_ID in tok.encode('Zebra ß').tolist()
  path = data.save_tokenizer(tok, str(tmp_path / 'sentencepiece.model'))
  again = data.load_tokenizer(path)
  assert again.encode(texts[0]).tolist() == tok.encode(texts[0]).tolist()
  clone = pickle.loads(pickle.dumps(tok))  # grain workers receive it pickled
  assert clone.encode(texts[1]).tolist() == tok.encode(texts[1]).tolist()


@pytest.mark.parametrize('tok', [data.ByteTokenizer(), data.CharTokenizer(['x', 'y']),
                                 data.WordTokenizer(['a', 'b'])])
def test_json_save_load(tok, tmp_path):
  path = data.save_tokenizer(tok, str(tmp_path / tokenizers.tokenizer_filename(tok.kind)))
  again = data.load_tokenizer(path)
  assert type(again) is type(tok) and again.vocab_size == tok.vocab_size


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.load_tokenizer(str(tmp_path / 'missing.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"kind": "nonsense"}')
  with pytest.raises(ValueError, match='kind'):
    data.load_tokenizer(str(bad))
  with pytest.raises(ValueError, match='model_type'):
    data.SentencePieceTokenizer.train(['a b'], vocab_size=10, model_type='wordpiece')
