"""Tokenizers: bytes, characters, fixed word vocabularies and SentencePiece.

Every tokenizer shares the special ids of `attn_jax.tokens` (pad 0, bos 1, eos 2, unk 3); real
tokens start at id 4. `encode(text)` returns int32 ids *without* EOS (the pipeline appends
it); `decode(ids)` is the inverse used for BLEU and printing: it stops at the first EOS and drops
pad/bos. Tokenizers are saved as JSON (bytes/chars/words) or a SentencePiece `.model` file next
to the dataset or run, and `load_tokenizer(path)` restores either; no pickle.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

from attn_jax.tokens import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, UNK_ID

TOKENIZER_KINDS = ('byte', 'char', 'word', 'sentencepiece')
SENTENCEPIECE_MODEL_TYPES = ('unigram', 'bpe')


def _strip_ids(ids: Sequence[int] | np.ndarray) -> list[int]:
  """Ids up to the first EOS, without pad and bos."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == EOS_ID:
      break
    if i in (PAD_ID, BOS_ID):
      continue
    out.append(int(i))
  return out


class ByteTokenizer:
  """UTF-8 bytes: id = byte + 4, vocab_size 260. Never produces unk."""

  kind = 'byte'
  vocab_size = 256 + NUM_SPECIAL

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [len(utf8 bytes)]."""
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    data = bytes(i - NUM_SPECIAL for i in _strip_ids(ids) if i >= NUM_SPECIAL)
    return data.decode('utf-8', errors='replace')

  def to_json(self) -> dict:
    return {'kind': self.kind}


class CharTokenizer:
  """Unicode characters with a vocabulary learned from the training split.

  Characters not in the vocabulary map to unk (3) and decode as `unk_char`.
  """

  kind = 'char'

  def __init__(self, chars: Sequence[str], unk_char: str = '\N{REPLACEMENT CHARACTER}'):
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
      raise ValueError('CharTokenizer chars must be distinct single characters.')
    self.chars = list(chars)
    self.unk_char = unk_char
    self._index = {c: i + NUM_SPECIAL for i, c in enumerate(self.chars)}
    self.vocab_size = len(self.chars) + NUM_SPECIAL

  @classmethod
  def train(cls, texts: Iterable[str], *, max_vocab_size: int | None = None,
            min_count: int = 1) -> CharTokenizer:
    """Most frequent characters first (ties by code point), so the vocabulary is deterministic."""
    counts = collections.Counter()
    for t in texts:
      counts.update(t)
    items = sorted((c for c in counts.items() if c[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
    if max_vocab_size is not None:
      dropped = len(items) - max(0, max_vocab_size - NUM_SPECIAL)
      if dropped > 0:
        logging.info('CharTokenizer: %d rare characters map to unk (vocab cap %d).', dropped,
                     max_vocab_size)
      items = items[:max(0, max_vocab_size - NUM_SPECIAL)]
    return cls([c for c, _ in items])

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [len(text)]; unknown characters -> 3."""
    get = self._index.get
    return np.fromiter((get(c, UNK_ID) for c in text), dtype=np.int32, count=len(text))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    chars = self.chars
    return ''.join(chars[i - NUM_SPECIAL] if NUM_SPECIAL <= i < self.vocab_size else self.unk_char
                   for i in _strip_ids(ids))

  def to_json(self) -> dict:
    return {'kind': self.kind, 'chars': self.chars, 'unk_char': self.unk_char}


class WordTokenizer:
  """Whitespace-separated tokens with a fixed vocabulary (algorithmic tasks, ListOps)."""

  kind = 'word'

  def __init__(self, words: Sequence[str]):
    if len(set(words)) != len(words):
      raise ValueError('WordTokenizer words must be distinct.')
    self.words = list(words)
    self._index = {w: i + NUM_SPECIAL for i, w in enumerate(self.words)}
    self.vocab_size = len(self.words) + NUM_SPECIAL

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [num_words]; unknown words -> 3."""
    words = text.split()
    get = self._index.get
    return np.fromiter((get(w, UNK_ID) for w in words), dtype=np.int32, count=len(words))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return ' '.join(self.words[i - NUM_SPECIAL] if NUM_SPECIAL <= i < self.vocab_size
                    else SPECIAL_TOKENS[UNK_ID] for i in _strip_ids(ids))

  def to_json(self) -> dict:
    return {'kind': self.kind, 'words': self.words}


class SentencePieceTokenizer:
  """A SentencePiece model whose special ids follow the contract (pad 0, bos 1, eos 2, unk 3).

  Picklable (through the serialized model proto) so grain worker processes can use it.
  """

  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    specials = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
    if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
      raise ValueError(f'SentencePiece model has special ids (pad, bos, eos, unk) = {specials}; '
                       f'attn_jax needs {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}. Train it with '
                       'train_sentencepiece().')
    self.vocab_size = self._sp.get_piece_size()

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int, model_type: str = 'unigram',
            character_coverage: float = 1.0, max_sentence_length: int = 16384,
            seed_sentencepiece_size: int = 100_000) -> SentencePieceTokenizer:
    """Trains a model on `texts` (an iterable of str, e.g. the training split)."""
    import sentencepiece as spm

    if model_type not in SENTENCEPIECE_MODEL_TYPES:
      raise ValueError(f'sentencepiece model_type={model_type!r}; allowed: '
                       f'{SENTENCEPIECE_MODEL_TYPES}.')
    if vocab_size <= NUM_SPECIAL:
      raise ValueError(f'sentencepiece vocab_size={vocab_size} must exceed {NUM_SPECIAL}.')
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece=SPECIAL_TOKENS[0], bos_piece=SPECIAL_TOKENS[1], eos_piece=SPECIAL_TOKENS[2],
        unk_piece=SPECIAL_TOKENS[3], max_sentence_length=max_sentence_length,
        seed_sentencepiece_size=seed_sentencepiece_size, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return cls(model.getvalue())

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [num_pieces]."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode(_strip_ids(ids))

  def __getstate__(self):
    return {'model_proto': self.model_proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])


Tokenizer = ByteTokenizer | CharTokenizer | WordTokenizer | SentencePieceTokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str) -> str:
  """Writes `tokenizer` to `path` (`.model` for SentencePiece, JSON otherwise); returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  if isinstance(tokenizer, SentencePieceTokenizer):
    with open(tmp, 'wb') as f:
      f.write(tokenizer.model_proto)
  else:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(tokenizer.to_json(), f, ensure_ascii=False)
  os.replace(tmp, path)  # atomic, so concurrent runs never read half a file
  return path


def load_tokenizer(path: str) -> Tokenizer:
  """Reads a tokenizer written by `save_tokenizer`."""
  if not os.path.exists(path):
    raise ValueError(f'Tokenizer file {path!r} does not exist.')
  if path.endswith('.model'):
    with open(path, 'rb') as f:
      return SentencePieceTokenizer(f.read())
  with open(path, encoding='utf-8') as f:
    try:
      spec = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'Tokenizer file {path!r} is not valid JSON: {e}') from e
  kind = spec.get('kind')
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'char':
    return CharTokenizer(spec['chars'], spec.get('unk_char', '\N{REPLACEMENT CHARACTER}'))
  if kind == 'word':
    return WordTokenizer(spec['words'])
  raise ValueError(f'Tokenizer file {path!r} has kind={kind!r}; allowed: byte, char, word '
                   '(SentencePiece models end in .model).')


def decode_batch(tokenizer: Tokenizer, ids) -> list[str]:
  """int [batch, length] (model outputs or targets) -> one detokenized string per row, for BLEU.

  Each row stops at its first EOS; pad and bos are dropped.
  """
  return [tokenizer.decode(row) for row in np.asarray(ids)]


def tokenizer_filename(kind: str) -> str:
  return 'sentencepiece.model' if kind == 'sentencepiece' else f'{kind}_vocab.json'
