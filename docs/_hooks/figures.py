"""mkdocs hook: the figures under experiments/figures/ join the site as figures/<name>.png.

The PNGs stay where the scripts write them; pages link them as `figures/<name>.png` (relative
to the docs root), and `mkdocs build --strict` checks those links like any other.
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

FIGURES = pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'figures'


def on_files(files, config):
  for png in sorted(FIGURES.glob('*.png')):
    files.append(File.generated(config, f'figures/{png.name}', abs_src_path=str(png)))
  return files
