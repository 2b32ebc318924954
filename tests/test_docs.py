"""Every ```python block of the walkthrough pages under docs/ runs as written (in order, one
namespace per page), so the docs cannot drift from the code."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / 'docs'
PAGES = ['add_an_attention_option.md']


@pytest.mark.parametrize('page', PAGES)
def test_walkthrough_code_runs(page):
  blocks = re.findall(r'```python\n(.*?)```', (DOCS / page).read_text(), flags=re.S)
  assert blocks, f'{page} has no python code blocks'
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f'{page} python block {i}', 'exec'), namespace)  # noqa: S102
