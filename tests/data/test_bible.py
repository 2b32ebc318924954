"""attn_jax.data.bible (behind experiments/bible_corpus.py): diatheke's plain output ->
aligned verse pairs (no diatheke needed: the text below has the shapes diatheke prints,
quirks included)."""

import pytest

from attn_jax.data import bible

ENGLISH = """\
Genesis 1:1: In the beginning God created the heaven and the earth.
Genesis 1:2: And the earth was without form, <G5547> and void;
and darkness was upon the face of the deep.

Psalms 3:1: LORD, how are they increased that trouble me!

A Psalm of David.
   Psalms 3:2: Many there be which say of my soul,
A Psalm of David.
   Psalms 3:3: But thou, O LORD, art a shield for me.
Jude 1:1: Jude, the servant of Jesus Christ.
Jude 1:2:
(engKJV2006eb)
"""
SPANISH = """\
Genesis 1:1: EN el principio crió Dios los cielos y la tierra.
Genesis 1:2: Y la tierra estaba desordenada y vacía.
Psalms 3:1: OH Jehová, ¡cuánto se han multiplicado mis enemigos!
Psalms 3:2: Muchos dicen de mi vida.
Psalms 3:3: Mas tú, Jehová, eres escudo alrededor de mí.
Jude 1:1: Judas, siervo de Jesucristo.
Jude 1:2: Misericordia y paz.
Jude 1:3: Amados.
(spaRV1909eb)
"""


def test_parse_keeps_verse_lines_and_continuations_drops_headings_and_markup():
  verses, headings = bible.parse_verses(ENGLISH.splitlines())
  assert headings == 2  # 'A Psalm of David.' before the indented verses 3:2 and 3:3
  assert verses[('Genesis', 1, 2)] == ('And the earth was without form, and void; and '
                                       'darkness was upon the face of the deep.')
  assert verses[('Psalms', 3, 2)] == 'Many there be which say of my soul,'
  assert verses[('Jude', 1, 2)] == ''
  assert len(verses) == 7


def test_align_counts_what_it_drops_and_split_holds_out_whole_books():
  english, _ = bible.parse_verses(ENGLISH.splitlines())
  spanish, _ = bible.parse_verses(SPANISH.splitlines())
  pairs, dropped = bible.align(english, spanish)
  assert len(pairs) == 6 and dropped == {'empty': 1, 'missing in source': 1}
  splits = bible.split(pairs, dev_books=['Jude'], test_books=['Psalms'])
  assert [len(splits[k]) for k in ('train', 'dev', 'test')] == [2, 1, 3]
  assert splits['dev'] == [('Jude, the servant of Jesus Christ.', 'Judas, siervo de Jesucristo.')]
  with pytest.raises(ValueError, match="books \\['Exodus'\\] are not in the corpus"):
    bible.split(pairs, dev_books=['Exodus'], test_books=[])
