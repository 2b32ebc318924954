"""`bench_attention.py --suite device` runs its whole code path on CPU (interpreted kernels, one
tiny length), reports the peers this machine lacks as skipped, and writes the table and JSON
with the machine, jax version and git revision. In-process: a subprocess would pay JAX's
import again."""

import json
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / 'experiments'


def test_device_suite_runs_on_cpu_and_skips_absent_peers(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(EXPERIMENTS))
  import bench_attention

  monkeypatch.setattr(sys, 'argv', [
      'bench_attention.py', '--suite', 'device', '--lengths', '128', '--dtypes', 'float32',
      '--patterns', 'causal,window', '--passes', 'fwd', '--window', '32', '--heads', '2',
      '--head_dim', '16', '--budget_s', '0', '--max_reps', '1', '--out', str(tmp_path)])
  bench_attention.main()
  result = json.loads((tmp_path / 'device.json').read_text())
  rows = {(r['impl'], r['pattern']): r for r in result['rows']}
  for impl in ('attn_pallas', 'attn_blockwise', 'xla'):
    for pattern in ('causal', 'window'):
      assert rows[(impl, pattern)]['status'] == 'ok', rows[(impl, pattern)]
      assert rows[(impl, pattern)]['median_s'] > 0
  for impl in ('cudnn', 'jax_pallas', 'splash', 'torch_flex'):
    status = rows[(impl, 'causal')]['status']
    assert status.startswith(('n/a', 'not installed')), status
  machine = result['machine']
  assert machine['platform'] == 'cpu' and len(machine['git_revision']) == 40
  assert isinstance(machine['git_dirty'], bool) and machine['jax']
  table = (tmp_path / 'device.txt').read_text()
  assert 'cudnn/pallas' in table and 'blockw/pallas' in table
  window_line = next(line for line in table.splitlines() if ' window ' in line)
  assert window_line.split()[-1] != '-'  # window's cost against causal, same run
