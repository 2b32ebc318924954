"""A researcher's own files -> a local TFDS dataset, converted once and reused.

Supported layouts (`task` says which fields an example has):

    seq2seq         {prefix}.{source_suffix} + {prefix}.{target_suffix}, line-aligned; or one
                    TSV file with `source<TAB>target` per line (no header)
    classification  TSV or CSV with a header row naming `text_field` and `label_field`, or JSONL
                    with those keys; labels are strings (or numbers) named in the training file
    lm              plain text; documents are lines (`lm_documents='line'`), paragraphs
                    separated by blank lines ('paragraph') or whole files ('file')

Splits come from files (`train`, `validation`, `test` paths) or, for those left empty, from the
training file by a seeded random fraction (`validation_fraction`, `test_fraction`).

Bad input raises `ValueError` naming file and line: line-count mismatch of parallel files,
empty lines, invalid UTF-8, a missing text/label field, a label at eval that training never
saw. With `on_bad_line='skip'` the offending example is dropped instead and counted per reason;
the counts are logged and returned, so nothing disappears silently.

The dataset is keyed by the files' absolute paths, sizes and modification times plus every
option, so editing a file or an option converts again and anything else reuses the cache.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os

import numpy as np

from attn_jax.data import builders
from attn_jax.data.formats import TEXT_TASKS, format_of

LOCAL_TASKS = TEXT_TASKS  # what your files may hold (attn_jax.data.formats)
LM_DOCUMENTS = ('line', 'paragraph', 'file')
BAD_LINE_POLICIES = ('error', 'skip')
FILE_SPLITS = ('train', 'validation', 'test')


class _Problems:
  """Raises or counts bad input according to the `on_bad_line` policy."""

  def __init__(self, policy: str):
    self.policy = policy
    self.counts: collections.Counter = collections.Counter()

  def report(self, reason: str, path: str, line: int, detail: str = '') -> None:
    if self.policy == 'error':
      raise ValueError(f'{path}:{line}: {reason}{": " + detail if detail else ""} '
                       "(set on_bad_line='skip' to drop and count such examples).")
    self.counts[reason] += 1


def _read_lines(path: str, problems: _Problems) -> list[tuple[int, str | None]]:
  """[(line_number, text or None if undecodable)], strict UTF-8, line ends stripped."""
  if not os.path.isfile(path):
    raise ValueError(f'Corpus file {path!r} does not exist.')
  with open(path, 'rb') as f:
    raw = f.read()
  out = []
  for i, line in enumerate(raw.splitlines(), start=1):
    try:
      out.append((i, line.decode('utf-8')))
    except UnicodeDecodeError as e:
      problems.report('invalid UTF-8', path, i, f'{e.reason} at byte {e.start}')
      out.append((i, None))
  if raw and not out:
    out.append((1, ''))
  return out


def _read_parallel(cfg, prefix: str, problems: _Problems) -> list[dict]:
  if cfg.source_suffix and cfg.target_suffix:
    src_path, tgt_path = f'{prefix}.{cfg.source_suffix}', f'{prefix}.{cfg.target_suffix}'
    src, tgt = _read_lines(src_path, problems), _read_lines(tgt_path, problems)
    if len(src) != len(tgt):
      raise ValueError(f'Parallel files differ in line count: {src_path} has {len(src)} lines, '
                       f'{tgt_path} has {len(tgt)}.')
    pairs = [(n, s, t, src_path, tgt_path) for (n, s), (_, t) in zip(src, tgt, strict=True)]
  else:
    pairs = []
    for n, line in _read_lines(prefix, problems):
      if line is None:
        continue
      if line and line.count('\t') != 1:
        problems.report(f'expected 2 tab-separated fields, found {line.count(chr(9)) + 1}',
                        prefix, n)
        continue
      s, t = line.split('\t') if line else ('', '')
      pairs.append((n, s, t, prefix, prefix))
  examples = []
  for n, s, t, sp, tp in pairs:
    if s is None or t is None:
      continue  # already reported as invalid UTF-8
    if not s.strip() or not t.strip():
      problems.report('empty line', sp if not s.strip() else tp, n)
      continue
    examples.append({'source': s, 'target': t})
  return examples


def _rows(cfg, path: str, problems: _Problems):
  """Yields (line, text, label) from a TSV/CSV/JSONL labeled file."""
  ext = os.path.splitext(path)[1].lower()
  lines = _read_lines(path, problems)
  if ext in ('.jsonl', '.json'):
    for n, line in lines:
      if line is None:
        continue
      if not line.strip():
        problems.report('empty line', path, n)
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        problems.report('invalid JSON', path, n, str(e))
        continue
      if not isinstance(obj, dict):
        problems.report('expected a JSON object', path, n)
        continue
      yield n, obj.get(cfg.text_field), obj.get(cfg.label_field)
    return
  if ext not in ('.tsv', '.csv'):
    raise ValueError(f'Labeled corpus {path!r}: unknown extension {ext!r}; allowed: .tsv, .csv, '
                     '.jsonl.')
  good = [(n, line) for n, line in lines if line is not None]
  if not good:
    raise ValueError(f'Labeled corpus {path!r} is empty (needs a header row).')
  reader = csv.reader(io.StringIO('\n'.join(line for _, line in good)),
                      delimiter='\t' if ext == '.tsv' else ',')
  header = next(reader)
  for field in (cfg.text_field, cfg.label_field):
    if field not in header:
      raise ValueError(f'{path}:{good[0][0]}: header {header} has no column {field!r} '
                       '(set text_field / label_field).')
  ti, li = header.index(cfg.text_field), header.index(cfg.label_field)
  # csv yields no row for blank lines at the very end; report them like any other empty line.
  while len(good) > 1 and not good[-1][1].strip():
    problems.report('empty line', path, good.pop()[0])
  for row in reader:
    n = good[reader.line_num - 1][0] if reader.line_num - 1 < len(good) else good[-1][0]
    if not row or not any(c.strip() for c in row):
      problems.report('empty line', path, n)
      continue
    yield n, row[ti] if ti < len(row) else None, row[li] if li < len(row) else None


def _read_labeled(cfg, path: str, problems: _Problems) -> list[dict]:
  examples = []
  for n, text, label in _rows(cfg, path, problems):
    if text is None or not str(text).strip():
      problems.report(f'missing or empty text field {cfg.text_field!r}', path, n)
      continue
    if label is None or not str(label).strip():
      problems.report(f'missing label field {cfg.label_field!r}', path, n)
      continue
    examples.append({'text': str(text), 'label': str(label).strip(), '_line': n, '_path': path})
  return examples


def _read_plain(cfg, path: str, problems: _Problems) -> list[dict]:
  lines = _read_lines(path, problems)
  if cfg.lm_documents == 'file':
    return [{'text': '\n'.join(t for _, t in lines if t is not None)}]
  if cfg.lm_documents == 'paragraph':
    docs, cur = [], []
    for _, t in lines + [(0, '')]:
      if t is not None and t.strip():
        cur.append(t)
      elif t is not None and cur:
        docs.append({'text': '\n'.join(cur)})
        cur = []
    return docs
  docs = []
  for n, t in lines:
    if t is None:
      continue
    if not t.strip():
      problems.report('empty line', path, n)
      continue
    docs.append({'text': t})
  return docs


def validate_config(cfg) -> None:
  """Checks the `local` section of a data config before any file is read."""
  if cfg.task not in LOCAL_TASKS:
    raise ValueError(f'local.task={cfg.task!r}; allowed: {LOCAL_TASKS}.')
  if cfg.on_bad_line not in BAD_LINE_POLICIES:
    raise ValueError(f'local.on_bad_line={cfg.on_bad_line!r}; allowed: {BAD_LINE_POLICIES}.')
  if cfg.lm_documents not in LM_DOCUMENTS:
    raise ValueError(f'local.lm_documents={cfg.lm_documents!r}; allowed: {LM_DOCUMENTS}.')
  if not cfg.train:
    raise ValueError('local.train must name the training file (or file prefix).')
  if bool(cfg.source_suffix) != bool(cfg.target_suffix):
    raise ValueError('local.source_suffix and local.target_suffix must be set together.')
  for name in ('validation_fraction', 'test_fraction'):
    if not 0.0 <= cfg[name] < 1.0:
      raise ValueError(f'local.{name}={cfg[name]} must be in [0, 1).')
  if cfg.validation_fraction + cfg.test_fraction >= 1.0:
    raise ValueError('local.validation_fraction + local.test_fraction must be < 1.')


def _files_of(cfg, path: str) -> list[str]:
  if format_of(cfg.task).paired and cfg.source_suffix:
    return [f'{path}.{cfg.source_suffix}', f'{path}.{cfg.target_suffix}']
  return [path]


def _fingerprint(cfg) -> dict:
  files = {}
  for split in FILE_SPLITS:
    for f in (_files_of(cfg, cfg[split]) if cfg[split] else []):
      if not os.path.isfile(f):
        raise ValueError(f'local.{split}: corpus file {f!r} does not exist.')
      st = os.stat(f)
      files[f'{split}:{os.path.abspath(f)}'] = [st.st_size, st.st_mtime_ns]
  return files


def read_corpus(cfg, seed: int) -> tuple[dict[str, list[dict]], list[str], dict]:
  """Reads and validates the files: (examples per split, label names, problem counts)."""
  validate_config(cfg)
  problems = _Problems(cfg.on_bad_line)
  fmt = format_of(cfg.task)
  reader = _read_parallel if fmt.paired else _read_labeled if fmt.labeled else _read_plain
  splits = {s: reader(cfg, cfg[s], problems) for s in FILE_SPLITS if cfg[s]}
  if not splits['train']:
    raise ValueError(f'local.train={cfg.train!r} holds no usable example.')
  # Fraction splits come out of the training file, in a seeded random order.
  wanted = {s: cfg[f'{s}_fraction'] for s in ('validation', 'test')
            if not cfg[s] and cfg[f'{s}_fraction'] > 0}
  if wanted:
    train = splits['train']
    order = np.random.default_rng(seed).permutation(len(train))
    start = 0
    for s, frac in wanted.items():
      n = int(round(frac * len(train)))
      if n == 0:
        raise ValueError(f'local.{s}_fraction={frac} of {len(train)} training examples is 0.')
      splits[s] = [train[i] for i in order[start:start + n]]
      start += n
    splits['train'] = [train[i] for i in sorted(order[start:])]
  label_names: list[str] = []
  if fmt.labeled:
    # Labels are named by the training file (all of it when eval splits are cut from it).
    source = splits['train'] + [e for s in wanted for e in splits.get(s, [])]
    names = sorted({e['label'] for e in source})
    if all(n.lstrip('-').isdigit() for n in names):
      names = sorted(names, key=int)
    label_names = names
    index = {n: i for i, n in enumerate(names)}
    for s, exs in splits.items():
      kept = []
      for e in exs:
        if e['label'] not in index:
          problems.report(f'label {e["label"]!r} not in the training labels {names}', e['_path'],
                          e['_line'])
          continue
        kept.append({'text': e['text'], 'label': index[e['label']]})
      splits[s] = kept
  if problems.counts:
    logging.warning('Local corpus: skipped bad examples %s', dict(problems.counts))
  return splits, label_names, dict(problems.counts)


def prepare_corpus(cfg, data_dir: str, seed: int):
  """Converts (once) the files described by `cfg` into a TFDS dataset; returns (builder, info).

  info: {'label_names': [...], 'splits': [...], 'skipped': {reason: count}}. It is stored beside
  the dataset, so a reused cache reports the same skipped counts as the conversion did.
  """
  validate_config(cfg)
  params = {k: cfg[k] for k in sorted(cfg.keys())}
  params['seed'] = seed
  params['files'] = _fingerprint(cfg)
  config = builders.make_config('local', params)
  meta_path = os.path.join(data_dir, builders.AttnJaxLocalCorpus.name, f'{config.name}.json')
  cached = _cached_corpus(config, meta_path, data_dir)
  if cached is not None:
    return cached
  # Parallel jobs of a sweep convert the same files: the first does, the others reuse it.
  with builders.exclusive(meta_path + '.lock'):
    cached = _cached_corpus(config, meta_path, data_dir)
    if cached is not None:
      return cached
    splits, label_names, skipped = read_corpus(cfg, seed)
    for s, exs in splits.items():
      if not exs:
        raise ValueError(f'local corpus split {s!r} is empty after reading.')
    info = {'task': cfg.task, 'label_names': label_names, 'splits': sorted(splits),
            'skipped': skipped, 'num_examples': {s: len(e) for s, e in splits.items()}}
    builder = builders.AttnJaxLocalCorpus(config=config, corpus_info=info, examples=splits,
                                          data_dir=data_dir)
    builder.download_and_prepare()
    with open(meta_path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(info, f)
    os.replace(meta_path + '.tmp', meta_path)
  return builder, info


def _cached_corpus(config, meta_path: str, data_dir: str):
  """(builder, info) of an already converted corpus, or None."""
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path, encoding='utf-8') as f:
    info = json.load(f)
  builder = builders.AttnJaxLocalCorpus(config=config, corpus_info=info, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  logging.info('Reusing converted corpus at %s', builder.data_dir)
  if info['skipped']:
    logging.warning('Local corpus (cached): skipped bad examples %s', info['skipped'])
  return builder, info
