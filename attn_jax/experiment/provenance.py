"""Where a figure came from: the one record every JSON under `experiments/figures/` carries.

    record = provenance.collect(matmul=True)
    json.dump({'provenance': record, 'rows': rows}, f)

`collect()` gives the code's git revision and whether the tree was dirty, the date, the
machine (CPU model and core count, or the accelerator's name and count), the float32 matmul
rate of the machine that day (optional: it takes a second), and the library versions. A table
quoted from a figure file names the revision and machine through it, and
`experiments/figure_tables.py` refuses a figure file without one.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
from typing import Any

REQUIRED = ('git_revision', 'git_dirty', 'date', 'machine', 'versions')


def _git(*args: str) -> str | None:
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    return subprocess.run(['git', *args], capture_output=True, text=True, check=True,
                          cwd=root, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` says."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """The CPU and, on an accelerator, the devices JAX sees."""
  import jax

  out: dict[str, Any] = {'cpu': cpu_model(), 'cores': os.cpu_count(),
                         'backend': jax.default_backend()}
  if out['backend'] != 'cpu':
    devices = jax.devices()
    out.update(device=devices[0].device_kind, device_count=len(devices))
  return out


def versions() -> dict[str, str]:
  import flax
  import jax
  import jaxlib

  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__}


def collect(*, matmul: bool = False) -> dict[str, Any]:
  """The provenance record; `matmul` also times a float32 matmul (GFLOP/s, best of 10)."""
  status = _git('status', '--porcelain', '--untracked-files=no')
  record: dict[str, Any] = {
      'git_revision': _git('rev-parse', 'HEAD'),
      'git_dirty': None if status is None else bool(status),
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'machine': machine(),
      'versions': versions(),
  }
  if matmul:
    from attn_jax.train import throughput

    record['matmul_gflops'] = round(throughput.matmul_flops_per_second(2048, reps=10) / 1e9, 1)
  return record


def check(record: Any, where: str) -> None:
  """Raises ValueError naming `where` unless `record` is a complete provenance record."""
  if not isinstance(record, dict):
    raise ValueError(f'{where}: no provenance record (see attn_jax.experiment.provenance)')
  missing = [key for key in REQUIRED if key not in record]
  if missing:
    raise ValueError(f'{where}: provenance lacks {missing}')
