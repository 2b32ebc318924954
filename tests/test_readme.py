"""Every ```python block of the README runs as written (in order, one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_python_blocks_run():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
  assert blocks, 'README has no python code blocks'
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f'README.md python block {i}', 'exec'), namespace)  # noqa: S102
