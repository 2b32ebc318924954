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

import os
import shutil
import subprocess

from absl import app, flags, logging

from attn_jax.data.bible import align, parse_verses, split

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

def read_module(module: str) -> dict[tuple[str, int, int], str]:
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
