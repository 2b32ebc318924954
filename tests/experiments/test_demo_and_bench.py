"""The README's main-job script and the attention benchmark run end to end (tiny sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The scripts import attn_jax; make the checkout importable even without `pip install -e`.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))


def test_demo_ops_checks_pass_and_saves_png(tmp_path):
  proc = subprocess.run([sys.executable, 'experiments/demo_ops.py', '--out', str(tmp_path)],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'checks passed' in proc.stdout and 'FAIL' not in proc.stdout
  assert (tmp_path / 'attention_masks.png').stat().st_size > 10_000


def test_bench_attention_reports_every_case(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_attention.py', '--lengths', '128', '--causal', 'true',
       '--impls', 'attn_dense,attn_blockwise,jax_nn,flax_linen,torch_sdpa', '--passes', 'fwd+bwd',
       '--budget_s', '0.1',
       '--max_reps', '1', '--out', str(tmp_path)],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads((tmp_path / 'results.json').read_text())
  rows = {(r['impl'], r['backward']): r for r in result['rows']}
  for impl in ('attn_dense', 'attn_blockwise', 'jax_nn', 'flax_linen'):
    row = rows[(impl, True)]
    assert row['status'] == 'ok', row
    assert row['median_s'] > 0 and row['gflops'] > 0 and row['peak_rss_gib'] > 0
  assert result['matmul_gflops'] > 0
  assert 'ratio = jax_nn time' in proc.stdout
  assert (tmp_path / 'attention.png').exists()


def test_bench_attention_pattern_suite_reports_density_ratios(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_attention.py', '--suite', 'patterns', '--lengths',
       '256', '--impls', 'attn_blockwise,jax_nn', '--patterns', 'causal,causal_mod,softcap',
       '--passes', 'fwd+bwd', '--block', '64', '--budget_s', '0.1', '--max_reps', '1',
       '--out', str(tmp_path)],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads((tmp_path / 'patterns.json').read_text())
  rows = {(r['impl'], r['pattern']): r for r in result['rows']}
  for pattern in ('causal', 'causal_mod', 'softcap'):
    assert rows[('attn_blockwise', pattern)]['status'] == 'ok'
  assert rows[('jax_nn', 'causal_mod')]['status'] == 'ok'
  assert rows[('jax_nn', 'softcap')]['status'] == 'n/a (no score mod)'
  assert rows[('attn_blockwise', 'causal_mod')]['build_s'] > 0  # the block mask, timed apart
  assert 'vs ref' in (tmp_path / 'patterns.txt').read_text()


def test_bench_train_step_compares_with_flax_and_writes_json(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_train_step.py', f'--output_dir={tmp_path}',
       '--config_arg=model=small,data=local,smoke', '--batch=2', '--length=8', '--vocab=64',
       '--repeats=1', '--padding_row=false'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  [written] = list(tmp_path.glob('train_step_*.json'))
  result = json.loads(written.read_text())
  assert set(result['results']) == {'attn_jax', 'flax_linen'}
  for row in result['results'].values():
    assert row['tokens_per_s'] > 0 and 0 < row['utilisation'] and row['params'] > 1000
  # Same model: the same parameter count on both sides.
  assert result['results']['attn_jax']['params'] == result['results']['flax_linen']['params']
  assert result['matmul_gflops'] > 0 and 'attn_jax / flax_linen tokens/s' in proc.stdout


def test_bench_context_parallel_memory_falls_with_devices(tmp_path):
  # Small, compile-only: the ring's per-device temporaries at 4 devices are about half those
  # at 2 (the length-dependent buffers halve; blocks of 16 keep the fixed scratch small).
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_context_parallel.py', f'--output_dir={tmp_path}',
       '--length=1024', '--heads=2', '--kv_heads=2', '--head_dim=16', '--devices=2,4',
       '--strategies=ring', '--block_size=16'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads((tmp_path / 'context_parallel_memory.json').read_text())
  assert result['provenance']['git_revision'] and result['provenance']['versions']['jax']
  temp = {(r['strategy'], r['devices']): r['temp_bytes'] for r in result['results']}
  assert set(temp) == {('unsharded', 1), ('ring', 2), ('ring', 4)}
  assert 0.4 < temp[('ring', 4)] / temp[('ring', 2)] < 0.6, temp


def test_bench_decode_window_compares_patterns_and_records_provenance(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/bench_decode_window.py', '--layers=2', '--patterns=LG,G',
       '--context=32', '--steps=2', '--window=4', '--repeats=1', '--d_model=32',
       f'--output_dir={tmp_path}'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads((tmp_path / 'decode_window.json').read_text())
  rows = {r['pattern']: r for r in result['rows']}
  assert rows['G']['step_ratio'] == 1.0 and rows['LG']['ms_per_step'] > 0
  # The local layer's rolling cache holds window + 1 slots, not the whole context.
  assert rows['LG']['cache_bytes'] < rows['G']['cache_bytes']
  assert result['provenance']['git_revision'] and result['provenance']['machine']['cores']
