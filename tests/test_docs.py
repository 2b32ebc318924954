"""Every ```python block of docs/add_an_attention_option.md runs as written (in order, one
namespace), so the walkthrough cannot drift from the code; what it registers stays here.
(docs/add_a_task.md has its own runner: tests/experiment/test_add_a_task_walkthrough.py.)"""

import re
from pathlib import Path

from attn_jax.models import modifiers

PAGE = Path(__file__).resolve().parents[1] / 'docs' / 'add_an_attention_option.md'


def test_add_an_attention_option_runs(monkeypatch):
  monkeypatch.setattr(modifiers, 'MODIFIERS', dict(modifiers.MODIFIERS))
  blocks = re.findall(r'```python\n(.*?)```', PAGE.read_text(), flags=re.S)
  assert len(blocks) == 2, 'the page registers a modifier, then trains with it'
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f'{PAGE.name} python block {i}', 'exec'), namespace)  # noqa: S102
  assert 'learned_alibi' in modifiers.MODIFIERS and namespace['loss'] < namespace['first_loss']
