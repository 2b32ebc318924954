"""Every ```python block of the docs pages runs as written: the blocks of one page in order, in
one namespace, so a page's examples cannot drift from the code. The two walkthroughs have
runners of their own (tests/test_docs.py, tests/experiment/test_add_a_task_walkthrough.py).
Fragments that are not meant to run are fenced as ```py."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / 'docs'
OWN_RUNNERS = {'add_a_task.md', 'add_an_attention_option.md'}
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob('*.md')
               if p.name not in OWN_RUNNERS and _BLOCK.search(p.read_text(encoding='utf-8')))


def test_pages_with_examples_are_found():
  assert {'ops.md', 'open_attention.md', 'models.md'} <= set(PAGES)


@pytest.mark.parametrize('page', PAGES)
def test_page_examples_run(page):
  blocks = _BLOCK.findall((DOCS / page).read_text(encoding='utf-8'))
  namespace = {'__name__': f'docs_{Path(page).stem}'}
  for i, block in enumerate(blocks):
    exec(compile(block, f'docs/{page} python block {i}', 'exec'), namespace)  # noqa: S102
