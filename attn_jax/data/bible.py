"""Two Bible translations aligned by verse: a real parallel corpus from Debian's SWORD packages.

`diatheke -b MODULE -f plain -k 'Gen 1:1-Rev 22:21'` prints a SWORD module verse by verse;
`parse_verses` reads that text, `align` pairs two modules' verses by reference and `split`
holds whole books out for dev and test. `experiments/bible_corpus.py` runs diatheke and writes
the files.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence

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
