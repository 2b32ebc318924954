"""The documentation site builds warning-free: `mkdocs build --strict` from the repository root
(broken links and anchors, pages missing from the nav, docstrings the API reference cannot
render all fail it), and the results tables are well-formed marker pairs for the table script
to fill."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MARKER = re.compile(r'^<!-- (/?)table:([\w-]+) -->$', re.M)


def test_mkdocs_build_strict(tmp_path):
  site = tmp_path / 'site'
  env = dict(os.environ, NO_MKDOCS_2_WARNING='1')  # Material's banner about MkDocs 2.0
  result = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(site)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'WARNING' not in result.stderr, result.stderr
  assert (site / 'api' / 'ops' / 'index.html').is_file()
  # The hook copies experiments/figures/*.png into the site, where the pages link them.
  figures = sorted(p.name for p in (ROOT / 'experiments' / 'figures').glob('*.png'))
  assert figures and all((site / 'figures' / name).is_file() for name in figures)


def test_table_markers_come_in_pairs():
  names = []
  for page in sorted((ROOT / 'docs').rglob('*.md')):
    marks = _MARKER.findall(page.read_text(encoding='utf-8'))
    opened = [name for close, name in marks[::2]]
    want = [m for name in opened for m in (('', name), ('/', name))]
    assert marks == want, f'{page.name}: table markers must be open/close pairs, got {marks}'
    names += opened
  assert len(names) == len(set(names)), f'a table appears twice: {sorted(names)}'
