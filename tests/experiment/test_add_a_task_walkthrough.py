"""docs/add_a_task.md runs as written: its python blocks that start with `# file: NAME` are
saved as modules, the others run in order, and the worked example's own assertions hold (a toy
task registered in one module trains and its declared metric ranks the best checkpoint)."""

from __future__ import annotations

import pathlib
import re
import sys

from attn_jax.experiment import tasks
from attn_jax.train.metrics import metric_direction

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / 'docs' / 'add_a_task.md'
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)
_FILE = re.compile(r'^# file: ([\w.]+\.py)\n')


def test_the_walkthrough_runs(tmp_path, monkeypatch):
  blocks = _BLOCK.findall(DOC.read_text(encoding='utf-8'))
  files = {m.group(1): b for b in blocks if (m := _FILE.match(b))}
  scripts = [b for b in blocks if not _FILE.match(b)]
  assert set(files) == {'counting.py', 'counting_config.py'} and len(scripts) == 1
  for name, text in files.items():
    (tmp_path / name).write_text(text, encoding='utf-8')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(tasks, 'TASKS', dict(tasks.TASKS))  # The registration stays here.
  namespace = {'__name__': 'walkthrough'}
  try:
    exec(compile(scripts[0], str(DOC), 'exec'), namespace)  # noqa: S102
  finally:
    for name in files:
      sys.modules.pop(name[:-3], None)
  task = namespace['task']
  assert tasks.TASKS['counting'] is type(task) and task.model_config.num_classes == 7
  assert metric_direction('valid/count_error', task.metric_directions()) == 'min'
  assert namespace['result'].step == 60
