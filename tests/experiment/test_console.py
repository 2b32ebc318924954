"""A quiet console: a training run prints one line per log interval and per evaluation, the
config file and its command-line overrides instead of the whole config, and no library INFO
lines (orbax, absl, jax...) unless --verbosity asks for them."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

from attn_jax.experiment import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
# absl's line prefix: 'I1205 06:44:27.954290 140023242652544 train.py:48] ...'
_ABSL_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ')


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord('absl', level, path, 1, 'message', None, None)


def test_library_info_records_are_dropped_below_verbosity_1():
  quiet = cli.LibraryInfoFilter()
  library = '/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not quiet.filter(_record(library, logging.INFO))
  assert quiet.filter(_record(library, logging.WARNING))  # Warnings always pass.
  assert quiet.filter(_record(str(ROOT / 'attn_jax' / 'train' / 'loop.py'), logging.INFO))
  assert quiet.filter(_record(str(ROOT / 'experiments' / 'train.py'), logging.INFO))
  assert cli.quiet_libraries(verbosity=1) is None  # --verbosity=1: everything shows.


def test_a_smoke_run_prints_a_screenful(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'train.py'),
       f'--config={ROOT / "configs" / "algorithmic.py"}:smoke', f'--workdir={workdir}',
       f'--config.data_dir={tmp_path / "tfds"}', '--config.optim.learning_rate=0.003'],
      env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = (out.stdout + out.stderr).splitlines()
  logged = [m.group(1) for m in map(_ABSL_LINE.match, lines) if m]
  # 2 steps logged every step, one eval: three metric lines; the rest is a few lines of set-up
  # (config, task, parameters, FLOPs, the heatmaps) and TFDS's notes on the first run's data
  # generation (15 lines in all, measured).
  assert logged.count('metrics.py') == 3, lines
  assert len(lines) <= 25, '\n'.join(lines)
  assert not any('orbax' in line or 'checkpoint_manager' in line for line in lines), lines
  config_line = next(line for line in lines if 'train.py' in line and 'config ' in line)
  assert "optim.learning_rate=0.003" in config_line and 'algorithmic.py:smoke' in config_line
  # The full config is in the workdir, not on the console.
  assert json.loads((workdir / 'config.json').read_text())['optim']['learning_rate'] == 0.003
  assert not any(line.startswith('optim:') or line.startswith('  learning_rate') for line in lines)
