"""A real parallel corpus on any Debian machine: two Bible translations aligned by verse.

    apt-get install diatheke sword-text-kjv sword-text-sparv
    python experiments/bible_corpus.py --out data/bible        # data/bible/{train,dev,test}.{en,es}

Debian packages the King James Version (English, 1769 text) and the Reina-Valera 1909
(Spanish) as SWORD modules; `diatheke` prints them verse by verse. Verses are aligned by
their reference (book, chapter, verse), so the pairs are sentence-level translations of the
same source text: about 31,000 pairs, 24 English words per pair on average. Whole books go to
the dev and test splits (`--dev_books`, `--test_books`) so no chapter is split across
train and test.

The corpus then trains like any other local corpus (README, "Bring your own data"):

    python experiments/train.py --config configs/translation.py:model=small,data=local \\
        --workdir runs/bible --config.data.local.train=data/bible/train \\
        --config.data.local.validation=data/bible/dev --config.data.local.test=data/bible/test \\
        --config.data.local.source_suffix=en --config.data.local.target_suffix=es
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'data/bible', 'Directory for {train,dev,test}.{source,target}.')
flags.DEFINE_string('source_module', 'engKJV2006eb', 'SWORD module of the source language.')
flags.DEFINE_string('target_module', 'spaRV1909eb', 'SWORD module of the target language.')
flags.DEFINE_string('source_suffix', 'en', 'File suffix of the source side.')
flags.DEFINE_string('target_suffix', 'es', 'File suffix of the target side.')
flags.DEFINE_list('dev_books', ['Ruth', 'Esther', 'Galatians', 'Jude'],
                  'Books held out for dev (diatheke names, e.g. "II John").')
flags.DEFINE_list('test_books', ['Jonah', 'Joel', 'Lamentations', 'Ephesians', 'Colossians',
                                 'Titus', 'Philemon', 'James', 'II John', 'III John'],
                  'Books held out for test.')

# A verse line: 'Genesis 1:1: In the beginning ...'; book names may hold digits and spaces
# ('1 Samuel', 'Revelation of John'). Lines not starting so continue the previous verse.
_VERSE = re.compile(r'^(?P<book>\S.*?) (?P<chapter>\d+):(?P<verse>\d+): ?(?P<text>.*)$')
# Strong's numbers and morphology codes that plain rendering leaves behind: <G5547>, (H0430).
_MARKUP = re.compile(r'<[GH]\d+>|\([GH]\d+\)|<[^>]*>')
_SPACES = re.compile(r'\s+')

Reference = tuple[str, int, int]


def parse_verses(lines: Iterable[str]) -> tuple[dict[Reference, str], int]:
  """diatheke plain output -> `{(book, chapter, verse): text}` (markup removed, whitespace
  collapsed) and the number of heading lines dropped.

  A verse may go on over several lines (poetry). A heading is not part of any verse: a line
  after a blank line, or one right before an indented verse line (diatheke indents a verse
  that has a heading, and repeats a Psalm's title before every later verse of the call).
  Text before the first verse and the closing '(module)' line are ignored.
  """
  lines = [line.rstrip('\n') for line in lines]
  verses: dict[Reference, list[str]] = {}
  current: Reference | None = None
  after_blank, headings = False, 0
  for i, line in enumerate(lines):
    match = _VERSE.match(line.strip())
    if match:
      current = (match['book'], int(match['chapter']), int(match['verse']))
      verses[current] = [match['text']]
      after_blank = False
    elif not line.strip():
      after_blank = True
    elif current is not None and not re.fullmatch(r'\(\w+\)', line.strip()):
      following = lines[i + 1] if i + 1 < len(lines) else ''
      if after_blank or (following[:1].isspace() and _VERSE.match(following.strip())):
        headings += 1
      else:
        verses[current].append(line)
  return {ref: clean(' '.join(parts)) for ref, parts in verses.items()}, headings


def clean(text: str) -> str:
  return _SPACES.sub(' ', _MARKUP.sub('', text)).strip()


def align(source: dict[Reference, str], target: dict[Reference, str]
          ) -> tuple[list[tuple[Reference, str, str]], collections.Counter]:
  """Pairs of verses present and non-empty on both sides, in the source's order, and a count
  of what was dropped and why."""
  pairs, dropped = [], collections.Counter()
  for ref, text in source.items():
    other = target.get(ref)
    if other is None:
      dropped['missing in target'] += 1
    elif not text or not other:
      dropped['empty'] += 1
    else:
      pairs.append((ref, text, other))
  dropped['missing in source'] = sum(ref not in source for ref in target)
  return pairs, dropped


def split(pairs: Sequence[tuple[Reference, str, str]], dev_books: Sequence[str],
          test_books: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
  """`{'train', 'dev', 'test'}` -> `[(source, target)]`, dev/test by whole books."""
  books = {ref[0] for ref, _, _ in pairs}
  unknown = sorted(b for b in {*dev_books, *test_books} if b not in books)
  if unknown:
    raise ValueError(f'books {unknown} are not in the corpus; it has {sorted(books)}')
  if set(dev_books) & set(test_books):
    raise ValueError(f'books in both dev and test: {sorted(set(dev_books) & set(test_books))}')
  out: dict[str, list[tuple[str, str]]] = {'train': [], 'dev': [], 'test': []}
  for (book, _, _), src, tgt in pairs:
    name = 'dev' if book in dev_books else 'test' if book in test_books else 'train'
    out[name].append((src, tgt))
  return out


def read_module(module: str) -> dict[Reference, str]:
  if shutil.which('diatheke') is None:
    raise SystemExit('diatheke is not installed: apt-get install diatheke sword-text-kjv '
                     'sword-text-sparv')
  result = subprocess.run(['diatheke', '-b', module, '-f', 'plain', '-k', 'Gen 1:1-Rev 22:21'],
                          capture_output=True, text=True, check=False)
  verses, headings = parse_verses(result.stdout.splitlines())
  logging.info('%s: %d verses, %d heading lines dropped', module, len(verses), headings)
  if result.returncode or not verses:
    raise SystemExit(f'diatheke printed no verses of module {module!r} (exit '
                     f'{result.returncode}): is its sword-text package installed? '
                     f'{result.stderr.strip()[:200]}')
  return verses


def main(argv):
  del argv
  source, target = read_module(FLAGS.source_module), read_module(FLAGS.target_module)
  pairs, dropped = align(source, target)
  logging.info('%d aligned verse pairs; dropped: %s', len(pairs), dict(dropped))
  splits = split(pairs, FLAGS.dev_books, FLAGS.test_books)
  os.makedirs(FLAGS.out, exist_ok=True)
  for name, rows in splits.items():
    for side, suffix in enumerate((FLAGS.source_suffix, FLAGS.target_suffix)):
      with open(os.path.join(FLAGS.out, f'{name}.{suffix}'), 'w', encoding='utf-8') as f:
        f.writelines(row[side] + '\n' for row in rows)
    print(f'{name}: {len(rows)} pairs')
  print(f'dropped: {dict(dropped)}; written to {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
