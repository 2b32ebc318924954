"""User corpora: formats, conversion cache, and the documented errors / skip counts."""

from __future__ import annotations

import json
import os

import pytest

from attn_jax.data import local
from attn_jax.data.config import default_config
from tests.data.conftest import FIXTURES


def _cfg(**kw):
  c = default_config('local').local
  c.unlock()
  for k, v in kw.items():
    c[k] = v
  return c


def _write(path, text, mode='w'):
  with open(path, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
    f.write(text)
  return str(path)


def test_parallel_files_and_fraction_split(tmp_path):
  cfg = _cfg(task='seq2seq', train=os.path.join(FIXTURES, 'tiny'), source_suffix='de',
             target_suffix='en', validation_fraction=0.1, test_fraction=0.1)
  splits, labels, skipped = local.read_corpus(cfg, seed=0)
  assert {k: len(v) for k, v in splits.items()} == {'train': 96, 'validation': 12, 'test': 12}
  assert labels == [] and skipped == {}
  with open(os.path.join(FIXTURES, 'tiny.de'), encoding='utf-8') as f:
    de = [line.rstrip('\n') for line in f]
  with open(os.path.join(FIXTURES, 'tiny.en'), encoding='utf-8') as f:
    en = [line.rstrip('\n') for line in f]
  pairs = sorted((e['source'], e['target']) for s in splits.values() for e in s)
  assert pairs == sorted(zip(de, en, strict=True))
  again, _, _ = local.read_corpus(cfg, seed=0)
  assert again == splits  # split by seed: deterministic
  other, _, _ = local.read_corpus(cfg, seed=1)
  assert other['test'] != splits['test']


def test_tsv_parallel_and_labeled_formats(tmp_path):
  tsv = _write(tmp_path / 'p.tsv', 'hallo\thello\nwelt\tworld\n')
  splits, _, _ = local.read_corpus(_cfg(task='seq2seq', train=tsv), seed=0)
  assert splits['train'] == [{'source': 'hallo', 'target': 'hello'},
                             {'source': 'welt', 'target': 'world'}]
  train = {
      'csv': 'label,text\npos,"good, really"\nneg,bad\n',
      'tsv': 'text\tlabel\ngood, really\tpos\nbad\tneg\n',
      'jsonl': '{"text": "good, really", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'}
  for ext, body in train.items():
    path = _write(tmp_path / f'train.{ext}', body)
    test = _write(tmp_path / f'test.{ext}', body)
    splits, labels, _ = local.read_corpus(_cfg(train=path, test=test), seed=0)
    assert labels == ['neg', 'pos']
    assert splits['train'] == [{'text': 'good, really', 'label': 1}, {'text': 'bad', 'label': 0}]
    assert splits['test'] == splits['train']


def test_plain_text_documents(tmp_path):
  path = _write(tmp_path / 'a.txt', 'one\ntwo\n\nthree\n')
  assert len(local.read_corpus(_cfg(task='lm', train=path, lm_documents='paragraph'),
                               0)[0]['train']) == 2
  assert len(local.read_corpus(_cfg(task='lm', train=path, lm_documents='file'), 0)[0]['train']) \
      == 1
  with pytest.raises(ValueError, match=r'a.txt:3: empty line'):
    local.read_corpus(_cfg(task='lm', train=path), 0)
  splits, _, skipped = local.read_corpus(_cfg(task='lm', train=path, on_bad_line='skip'), 0)
  assert [e['text'] for e in splits['train']] == ['one', 'two', 'three']
  assert skipped == {'empty line': 1}


def test_line_count_mismatch_names_both_files(tmp_path):
  _write(tmp_path / 'c.de', 'a\nb\nc\n')
  _write(tmp_path / 'c.en', 'a\nb\n')
  cfg = _cfg(task='seq2seq', train=str(tmp_path / 'c'), source_suffix='de', target_suffix='en')
  with pytest.raises(ValueError, match=r'c\.de has 3 lines.*c\.en has 2'):
    local.read_corpus(cfg, 0)


def test_empty_line_and_invalid_utf8_name_file_and_line(tmp_path):
  _write(tmp_path / 'c.de', 'a\n\nc\nd\n')
  _write(tmp_path / 'c.en', b'a\nb\n\xff\xfe\nd\n', 'wb')
  cfg = _cfg(task='seq2seq', train=str(tmp_path / 'c'), source_suffix='de', target_suffix='en')
  with pytest.raises(ValueError, match=r'c\.en:3: invalid UTF-8'):
    local.read_corpus(cfg, 0)
  cfg.on_bad_line = 'skip'
  splits, _, skipped = local.read_corpus(cfg, 0)
  assert splits['train'] == [{'source': 'a', 'target': 'a'}, {'source': 'd', 'target': 'd'}]
  assert skipped == {'invalid UTF-8': 1, 'empty line': 1}
  _write(tmp_path / 'e.en', 'x\n\n')
  _write(tmp_path / 'e.de', 'y\nz\n')
  cfg = _cfg(task='seq2seq', train=str(tmp_path / 'e'), source_suffix='de', target_suffix='en')
  with pytest.raises(ValueError, match=r'e\.en:2: empty line'):
    local.read_corpus(cfg, 0)


def test_missing_and_unknown_labels(tmp_path):
  train = _write(tmp_path / 'train.jsonl', '{"text": "a", "label": "x"}\n{"text": "b"}\n')
  with pytest.raises(ValueError, match=r"train.jsonl:2: missing label field 'label'"):
    local.read_corpus(_cfg(train=train), 0)
  train = _write(tmp_path / 'train.csv', 'text,label\na,x\nb,y\n')
  test = _write(tmp_path / 'test.csv', 'text,label\nc,x\nd,zzz\n')
  with pytest.raises(ValueError, match=r"test.csv:3: label 'zzz' not in the training labels"):
    local.read_corpus(_cfg(train=train, test=test), 0)
  splits, labels, skipped = local.read_corpus(_cfg(train=train, test=test, on_bad_line='skip'), 0)
  assert labels == ['x', 'y'] and splits['test'] == [{'text': 'c', 'label': 0}]
  assert skipped == {"label 'zzz' not in the training labels ['x', 'y']": 1}
  missing_col = _write(tmp_path / 'bad.csv', 'body,label\na,x\n')
  with pytest.raises(ValueError, match=r"bad.csv:1: header .* no column 'text'"):
    local.read_corpus(_cfg(train=missing_col), 0)
  with pytest.raises(ValueError, match='does not exist'):
    local.read_corpus(_cfg(train=str(tmp_path / 'nope.csv')), 0)


def test_config_errors():
  with pytest.raises(ValueError, match='local.task'):
    local.validate_config(_cfg(task='translation', train='x'))
  with pytest.raises(ValueError, match='on_bad_line'):
    local.validate_config(_cfg(train='x', on_bad_line='ignore'))
  with pytest.raises(ValueError, match='local.train'):
    local.validate_config(_cfg())
  with pytest.raises(ValueError, match='source_suffix'):
    local.validate_config(_cfg(train='x', source_suffix='de'))


def test_prepare_converts_once_and_reuses(tmp_path, monkeypatch):
  train = _write(tmp_path / 'train.tsv', 'text\tlabel\ngood\t1\n\nbad\t0\nfine\t1\n\n')
  cfg = _cfg(train=train, test=train, on_bad_line='skip')
  builder, info = local.prepare_corpus(cfg, str(tmp_path / 'tfds'), seed=0)
  # train and test are the same file: its two empty lines are counted once per split.
  assert info['label_names'] == ['0', '1'] and info['skipped'] == {'empty line': 4}
  src = builder.as_data_source('train')
  assert len(src) == 3 and {int(src[i]['label']) for i in range(3)} == {0, 1}

  def fail(*a, **k):
    raise AssertionError('cached corpus was read again')

  monkeypatch.setattr(local, 'read_corpus', fail)
  again, info2 = local.prepare_corpus(cfg, str(tmp_path / 'tfds'), seed=0)
  assert again.data_dir == builder.data_dir and info2 == json.loads(json.dumps(info))
  # Editing the file changes its fingerprint: converted again.
  _write(tmp_path / 'train.tsv', 'text\tlabel\ngood\t1\nbad\t0\nok\t2\n')
  monkeypatch.undo()
  third, info3 = local.prepare_corpus(cfg, str(tmp_path / 'tfds'), seed=0)
  assert third.data_dir != builder.data_dir and info3['label_names'] == ['0', '1', '2']
