r"""Attention kernels side by side: time, achieved GFLOP/s and peak memory.

Compares, in one run and on the same inputs (batch 1, 8 heads, head_dim 64, fp32):
  attn_dense       attn_jax.ops.dot_product_attention(implementation='dense')
  attn_blockwise   attn_jax.ops.dot_product_attention(implementation='blockwise')
  jax_nn           jax.nn.dot_product_attention(implementation='xla')
  flax_linen       flax.linen.dot_product_attention (causal through a mask)
  torch_sdpa       torch.nn.functional.scaled_dot_product_attention on CPU, if torch is
                   installed (`pip install -e '.[bench]'`); otherwise reported as skipped.
plus the machine's plain 2048^3 matmul GFLOP/s, the practical ceiling.

Each (implementation, length, causal) case runs in its own subprocess with a
data-size limit, so an out-of-memory case is reported, not fatal, and its peak
RSS is its own. Times are medians over repeats; FLOPs are model FLOPs
(4*B*H*L^2*D forward, 3.5x that for forward+backward, halved when causal), the
same count for every implementation so GFLOP/s compare directly.

  python experiments/bench_attention.py --out bench_out/attention
  python experiments/bench_attention.py --lengths 512,1024,2048 --impls attn_dense,jax_nn

`--suite patterns` measures open attention instead: cost against the mask's block density, one
pattern per row, forward+backward, attn_jax's blockwise path with the pattern as a built-in
keyword, a `mask_mod` or a `score_mod`, next to the peers that can express it:

  full         no mask                           (reference of `documents`)
  causal       is_causal=True                    (reference of the three below)
  causal_mod   block_mask built once from `lambda b, h, q, kv: q >= kv`
  window       causal + a 1,024-token sliding window
  softcap      causal + score_mod soft_cap(30) (Gemma 2)
  documents    block_mask of 16 equal packed documents (mask_mods.document)

  jax_nn       jax.nn.dot_product_attention given the equivalent dense mask (no score mod)
  torch_flex   PyTorch FlexAttention on CPU under torch.compile: forward only (it has no CPU
               backward), block mask built once
  attnax       attnax's memory_efficient_attention with the same score function (Python-
               unrolled blocks, no block skipping, autodiff backward): compile time is shown

  python experiments/bench_attention.py --suite patterns --lengths 4096,16384,32768 \
      --max_peer_length 4096 --out bench_out/patterns

`--suite device` runs on one GPU or TPU: the fused Pallas kernels (`implementation='pallas'`)
against cuDNN, XLA, the Pallas attention shipped with jax (GPU) or splash attention (TPU),
FlexAttention and the blockwise path, bf16 and fp32, 4K-64K tokens (see bench_device.py):

  python experiments/bench_attention.py --suite device --out bench_out/device
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from attn_jax.experiment import provenance

IMPLS = ('attn_dense', 'attn_blockwise', 'jax_nn', 'flax_linen', 'torch_sdpa')
PATTERNS = ('full', 'causal', 'causal_mod', 'window', 'softcap', 'documents')
PATTERN_IMPLS = ('attn_blockwise', 'jax_nn', 'torch_flex', 'attnax')
# Each pattern's cost is quoted against this one, the same kernel without the feature.
PATTERN_REFERENCE = {'causal_mod': 'causal', 'window': 'causal', 'softcap': 'causal',
                     'documents': 'full'}
WINDOW, SOFT_CAP, DOCUMENTS = 1024, 30.0, 16
BATCH, HEADS, HEAD_DIM = 1, 8, 64
GiB = 1024 ** 3


def model_flops(length: int, causal: bool, backward: bool) -> float:
  flops = 4.0 * BATCH * HEADS * length * length * HEAD_DIM
  flops *= 3.5 if backward else 1.0
  return flops * (0.5 if causal else 1.0)


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _time(fn, budget_s: float, max_reps: int) -> tuple[float, list[float]]:
  """Warm-up time, then repeat timings within `budget_s`.

  JAX cases arrive compiled ahead of time, so the warm-up call is execution
  only; a case whose warm-up alone exceeds the budget (the longest sequences)
  is timed by that call.
  """
  start = time.perf_counter()
  fn()
  warmup = time.perf_counter() - start
  if warmup > budget_s:
    return warmup, [warmup]
  times = []
  while len(times) < max_reps and (not times or sum(times) + times[-1] < budget_s):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return warmup, times


def _jax_case(impl: str, length: int, causal: bool, backward: bool, block: int):
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((BATCH, length, HEADS, HEAD_DIM)), jnp.float32)
             for _ in range(3))
  if impl in ('attn_dense', 'attn_blockwise'):
    from attn_jax import ops
    attend = functools.partial(ops.dot_product_attention, is_causal=causal, block_size=block,
                               implementation=impl.removeprefix('attn_'))
  elif impl == 'jax_nn':
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                               implementation='xla')
  elif impl == 'flax_linen':
    import flax.linen as nn
    mask = nn.make_causal_mask(jnp.ones((BATCH, length), bool)) if causal else None
    attend = functools.partial(nn.dot_product_attention, mask=mask)
  else:
    raise ValueError(f'unknown implementation {impl!r}; known: {IMPLS}')
  if backward:
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
  else:
    fn = jax.jit(attend)
  start = time.perf_counter()
  compiled = fn.lower(q, k, v).compile()  # timed apart, so no timing includes compilation
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(q, k, v))), compile_s


def _torch_case(length: int, causal: bool, backward: bool):
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  gen = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen,
                         requires_grad=backward) for _ in range(3))

  def run():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if backward:
      out.sum().backward()
      for t in (q, k, v):
        t.grad = None
  if not backward:
    return (lambda: torch.inference_mode()(run)()), 0.0
  return run, 0.0


def pattern_density(pattern: str, length: int) -> float:
  """Fraction of the (query, key) pairs the pattern leaves visible."""
  if pattern == 'full':
    return 1.0
  if pattern == 'documents':
    return 1.0 / DOCUMENTS
  causal = (length + 1) / (2 * length)
  if pattern == 'window':
    return min(causal, WINDOW / length)
  return causal


def _document_ids(length: int):
  import numpy as np
  return np.repeat(np.arange(DOCUMENTS), -(-length // DOCUMENTS))[:length][None]


def _pattern_attn_jax(pattern, length, block, q):
  """(attend(q, k, v), block-mask build seconds) for attn_jax's blockwise path."""
  import functools

  import jax

  from attn_jax import ops
  kw = dict(implementation='blockwise', block_size=block)
  build_s = 0.0
  if pattern == 'causal':
    kw.update(is_causal=True)
  elif pattern == 'window':
    kw.update(is_causal=True, local_window=(WINDOW - 1, 0))
  elif pattern == 'softcap':
    kw.update(is_causal=True, score_mod=ops.score_mods.soft_cap(SOFT_CAP))
  elif pattern in ('causal_mod', 'documents'):
    mask_mod = ((lambda b, h, q_idx, kv_idx: q_idx >= kv_idx) if pattern == 'causal_mod'
                else ops.mask_mods.document(_document_ids(length)))
    build = jax.jit(lambda: ops.block_mask(mask_mod, batch=BATCH, heads=HEADS, q_len=length,
                                           block_size=block))
    start = time.perf_counter()
    bm = jax.block_until_ready(build())
    build_s = time.perf_counter() - start  # compile + run: what one use costs
    kw = dict(implementation='blockwise', block_mask=bm)
  return functools.partial(ops.dot_product_attention, **kw), build_s


def _pattern_jax_case(impl, pattern, length, backward, block):
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((BATCH, length, HEADS, HEAD_DIM)), jnp.float32)
             for _ in range(3))
  build_s = 0.0
  if impl == 'attn_blockwise':
    attend, build_s = _pattern_attn_jax(pattern, length, block, q)
  elif impl == 'jax_nn':
    if pattern == 'softcap':
      return None, 'n/a (no score mod)'
    kw = dict(implementation='xla', is_causal=pattern in ('causal', 'causal_mod', 'window'))
    if pattern == 'window':
      kw['local_window_size'] = (WINDOW - 1, 0)
    if pattern == 'documents':
      ids = jnp.asarray(_document_ids(length))
      kw['mask'] = (ids[:, :, None] == ids[:, None, :])[:, None]
    attend = functools.partial(jax.nn.dot_product_attention, **kw)
  else:  # attnax: [B, H, L, D] layout, masks as score functions (the cap before the mask)
    from attnax.kernels import compose_score_mods, memory_efficient_attention, score_mods

    from attn_jax.ops import score_mods as ours
    causal = score_mods.causal_mod()
    mod = {'full': None, 'causal': causal, 'causal_mod': causal,
           'window': score_mods.sliding_window_mod(WINDOW, causal=True),
           'softcap': compose_score_mods(ours.soft_cap(SOFT_CAP), causal),
           'documents': score_mods.document_mask_mod(jnp.asarray(_document_ids(length)))
           }[pattern]

    def attend(q, k, v):
      t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
      return t(memory_efficient_attention(t(q), t(k), t(v), score_mod=mod,
                                          block_size=block or 512))
  import bench_device  # a sibling module: experiments/ is the script's directory

  # The inputs are float32, so the helper's float32 cast of the loss changes nothing here.
  return bench_device.compiled_case(attend, q, k, v, backward=backward, build_s=build_s)


def _pattern_torch_case(pattern, length, backward, block):
  if backward:
    return None, 'n/a (no CPU backward)'
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention

  torch.set_num_threads(os.cpu_count())
  gen = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen) for _ in range(3))
  ids = torch.as_tensor(_document_ids(length)[0])
  masks = {'full': None, 'causal': lambda b, h, qi, ki: qi >= ki,
           'causal_mod': lambda b, h, qi, ki: qi >= ki,
           'softcap': lambda b, h, qi, ki: qi >= ki,
           'window': lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW),
           'documents': lambda b, h, qi, ki: ids[qi] == ids[ki]}
  score_mod = None
  if pattern == 'softcap':
    def score_mod(score, b, h, qi, ki):
      return SOFT_CAP * torch.tanh(score / SOFT_CAP)
  start = time.perf_counter()
  bm = None
  if masks[pattern] is not None:
    size = block or 128
    bm = create_block_mask(masks[pattern], None, None, length, length, device='cpu',
                           BLOCK_SIZE=size)
  build_s = time.perf_counter() - start
  flex = torch.compile(flex_attention)
  start = time.perf_counter()
  with torch.inference_mode():
    flex(q, k, v, block_mask=bm, score_mod=score_mod)  # compiles
  compile_s = time.perf_counter() - start

  def run():
    with torch.inference_mode():
      flex(q, k, v, block_mask=bm, score_mod=score_mod)
  return run, dict(compile_s=compile_s, build_s=build_s)


def run_pattern_case(impl, pattern, length, backward, block, budget_s, max_reps) -> dict:
  """One pattern case in the child process."""
  row = dict(suite='patterns', impl=impl, pattern=pattern, length=length, backward=backward)
  if impl == 'torch_flex':
    fn, info = _pattern_torch_case(pattern, length, backward, block)
  else:
    fn, info = _pattern_jax_case(impl, pattern, length, backward, block)
  if fn is None:
    return dict(row, status=info)
  warmup, times = _time(fn, budget_s, max_reps)
  return dict(row, status='ok', median_s=statistics.median(times), times_s=times,
              warmup_s=warmup, peak_rss_gib=_peak_rss_bytes() / GiB, **info)


def run_case(impl, length, causal, backward, block, budget_s, max_reps) -> dict:
  """Runs in the child process; returns one result row."""
  if impl == 'torch_sdpa':
    fn, compile_s = _torch_case(length, causal, backward)
  else:
    fn, compile_s = _jax_case(impl, length, causal, backward, block)
  baseline = _peak_rss_bytes()
  warmup, times = _time(fn, budget_s, max_reps)
  median = statistics.median(times)
  return dict(impl=impl, length=length, causal=causal, backward=backward, status='ok',
              median_s=median, times_s=times, warmup_s=warmup, compile_s=compile_s,
              gflops=model_flops(length, causal, backward) / median / 1e9,
              peak_rss_gib=_peak_rss_bytes() / GiB, rss_before_run_gib=baseline / GiB)


def matmul_ceiling(size: int = 2048, reps: int = 10) -> float:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  _, times = _time(lambda: jax.block_until_ready(f(a)), budget_s=5.0, max_reps=reps)
  return 2.0 * size ** 3 / statistics.median(times) / 1e9


def _child(argv):
  args = json.loads(argv)
  limit = int(args.pop('mem_limit_gib') * GiB)
  # RLIMIT_DATA covers malloc/mmap: a case that needs more fails inside its own
  # process (reported as OOM) instead of inviting the kernel's OOM killer.
  resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
  if args.pop('matmul', False):
    print(json.dumps(dict(matmul_gflops=matmul_ceiling())))
  elif args.pop('suite', 'kernels') == 'patterns':
    print(json.dumps(run_pattern_case(**args)))
  else:
    print(json.dumps(run_case(**args)))


def spawn(payload: dict, timeout_s: float) -> dict:
  cmd = [sys.executable, __file__, '--_child', json.dumps(payload)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       os.environ.get('PYTHONPATH', '')]))
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
  except subprocess.TimeoutExpired:
    return dict(payload, status=f'timeout>{timeout_s:.0f}s')
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  err = proc.stderr.strip().splitlines()
  tail = err[-1] if err else f'exit {proc.returncode}'
  oom = any(s in proc.stderr for s in ('RESOURCE_EXHAUSTED', 'MemoryError', 'Out of memory',
                                        'bad_alloc', 'Cannot allocate'))
  status = 'OOM' if oom or proc.returncode in (-9, 137) else 'error'
  return dict(payload, status=status, error=tail[-300:])


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def format_table(rows: list[dict], reference: str = 'jax_nn') -> str:
  """One line per (length, causal, pass); ratio = reference time / impl time (>1 faster)."""
  keyed = {(r['impl'], r['length'], r['causal'], r['backward']): r for r in rows}
  impls = [i for i in IMPLS if any(r['impl'] == i for r in rows)]
  header = f"{'len':>6} {'causal':>6} {'pass':>8} | " + ' | '.join(
      f'{i:>30}' for i in impls)
  lines = [header, '-' * len(header)]
  for length, causal, backward in sorted({k[1:] for k in keyed}):
    ref = keyed.get((reference, length, causal, backward))
    cells = []
    for impl in impls:
      r = keyed.get((impl, length, causal, backward))
      if r is None:
        cells.append(f"{'-':>30}")
      elif r['status'] != 'ok':
        cells.append(f"{r['status']:>30}")
      else:
        speedup = (f"x{ref['median_s'] / r['median_s']:.2f}"
                   if ref and ref['status'] == 'ok' else 'x?')
        cells.append(f"{r['median_s']:>7.4g}s {r['gflops']:4.0f}GF "
                     f"{r['peak_rss_gib']:5.2f}GiB {speedup:>6}")
      cells[-1] = f'{cells[-1]:>30}'
    lines.append(f"{length:>6} {str(causal):>6} {'fwd+bwd' if backward else 'fwd':>8} | "
                 + ' | '.join(cells))
  return '\n'.join(lines)


def format_pattern_table(rows: list[dict]) -> str:
  """A row per (pattern, length): each implementation's time, peak RSS and (compile) seconds;
  for attn_jax also the pattern's cost against its reference pattern and its density."""
  keyed = {(r['impl'], r['pattern'], r['length'], r['backward']): r for r in rows}
  impls = [i for i in PATTERN_IMPLS if any(r['impl'] == i for r in rows)]
  header = (f"{'pattern':>10} {'len':>6} {'pass':>7} {'density':>7} {'vs ref':>7} | "
            + ' | '.join(f'{i:>28}' for i in impls))
  lines = [header, '-' * len(header)]
  order = {p: i for i, p in enumerate(PATTERNS)}
  for pattern, length, backward in sorted({k[1:] for k in keyed},
                                           key=lambda k: (k[1], k[2], order[k[0]])):
    ours = keyed.get(('attn_blockwise', pattern, length, backward))
    ref = keyed.get(('attn_blockwise', PATTERN_REFERENCE.get(pattern), length, backward))
    ratio = (f"{ours['median_s'] / ref['median_s']:.3f}" if ours and ref
             and ours['status'] == ref['status'] == 'ok' else '')
    cells = []
    for impl in impls:
      r = keyed.get((impl, pattern, length, backward))
      if r is None:
        cell = '-'
      elif r['status'] != 'ok':
        cell = r['status']
      else:
        cell = f"{r['median_s']:.4g}s {r['peak_rss_gib']:.2f}GiB ({r['compile_s']:.1f}s)"
      cells.append(f'{cell:>28}')
    lines.append(f"{pattern:>10} {length:>6} {'fwd+bwd' if backward else 'fwd':>7} "
                 f"{pattern_density(pattern, length):>7.4f} {ratio:>7} | " + ' | '.join(cells))
  return '\n'.join(lines)


def run_patterns(args) -> None:
  impls = [i for i in args.impls.split(',') if i in PATTERN_IMPLS] or list(PATTERN_IMPLS)
  if 'torch_flex' in impls and not torch_available():
    print("torch not installed: torch_flex skipped (pip install -e '.[bench]' to include it)")
    impls.remove('torch_flex')
  if 'attnax' in impls:
    try:
      import attnax  # noqa: F401
    except ImportError:
      print("attnax not installed: skipped (pip install -e '.[bench]' to include it)")
      impls.remove('attnax')
  lengths = [int(x) for x in args.lengths.split(',')]
  passes = [{'fwd': False, 'fwd+bwd': True}[p] for p in args.passes.split(',')]
  patterns = args.patterns.split(',')
  os.makedirs(args.out, exist_ok=True)
  ceiling = spawn(dict(matmul=True, mem_limit_gib=args.mem_limit_gib), 300).get('matmul_gflops')
  print(f'matmul 2048^3 ceiling: {ceiling:.0f} GFLOP/s' if ceiling else 'matmul ceiling failed')
  rows = []
  for length in lengths:
    for backward in passes:
      for pattern in patterns:
        for impl in impls:
          payload = dict(suite='patterns', impl=impl, pattern=pattern, length=length,
                         backward=backward, block=args.block, budget_s=args.budget_s,
                         max_reps=args.max_reps, mem_limit_gib=args.mem_limit_gib)
          if impl != 'attn_blockwise' and length > args.max_peer_length:
            row = dict(payload, status=f'skipped(>{args.max_peer_length})')
          else:
            row = spawn(payload, args.case_timeout_s)
          row.pop('mem_limit_gib', None)
          rows.append(row)
          shown = (f"{row['median_s']:.3f}s {row['peak_rss_gib']:.2f} GiB, compile "
                   f"{row['compile_s']:.1f}s" if row['status'] == 'ok' else row['status'])
          print(f"{impl:>15} {pattern:>10} L={length:>6} "
                f"{'fwd+bwd' if backward else 'fwd':>7}: {shown}", flush=True)
  table = format_pattern_table(rows)
  print('\nvs ref = attn_jax time / its time on the reference pattern (causal, or full for '
        'documents); cells: median time, peak RSS, (compile s)\n' + table)
  with open(os.path.join(args.out, 'patterns.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(), matmul_gflops=ceiling, batch=BATCH,
                   heads=HEADS, head_dim=HEAD_DIM, window=WINDOW, soft_cap=SOFT_CAP,
                   documents=DOCUMENTS, rows=rows), f, indent=1)
  with open(os.path.join(args.out, 'patterns.txt'), 'w') as f:
    f.write(table + '\n')
  print(f'wrote {args.out}/patterns.json, patterns.txt')


def plot(rows: list[dict], ceiling: float, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for color, impl in zip(colors, IMPLS, strict=False):
    for causal, style in ((False, '-'), (True, '--')):
      sel = sorted((r for r in rows if r['impl'] == impl and r['causal'] == causal
                    and r['backward'] and r['status'] == 'ok'), key=lambda r: r['length'])
      if not sel:
        continue
      xs = [r['length'] for r in sel]
      label = f"{impl}{' (causal, dashed)' if causal else ''}"
      for ax, field in zip(axes, ('median_s', 'gflops', 'peak_rss_gib'), strict=True):
        ax.plot(xs, [r[field] for r in sel], style, color=color, marker='o', label=label)
  axes[1].axhline(ceiling, color='k', lw=0.8, ls=':', label='2048^3 matmul')
  titles = ('forward+backward time (s)', 'achieved GFLOP/s (model FLOPs)',
            'peak RSS of the case process (GiB)')
  for ax, title in zip(axes, titles, strict=True):
    ax.set_xscale('log', base=2)
    ax.set_xlabel('sequence length (tokens)')
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  axes[0].set_yscale('log')
  axes[2].set_yscale('log')
  axes[0].legend(fontsize=7)
  fig.suptitle(f'Attention on CPU: batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, fp32')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run_device(parser, args) -> None:
  """--suite device: in this process, on its one device (bench_device.py)."""
  import bench_device  # a sibling module: experiments/ is the script's directory

  defaults = {a.dest: a.default for a in parser._actions}
  pick = lambda name, device_default: (  # noqa: E731  the kernels suite's defaults differ
      device_default if getattr(args, name) == defaults[name] else getattr(args, name))
  impls = pick('impls', ','.join(bench_device.IMPLS)).split(',')
  patterns = pick('patterns', ','.join(bench_device.PATTERNS)).split(',')
  for name, given, known in (('impls', impls, bench_device.IMPLS),
                             ('patterns', patterns, bench_device.PATTERNS)):
    if set(given) - set(known):
      parser.error(f'unknown --{name} {sorted(set(given) - set(known))}; known: {list(known)}')
  cfg = bench_device.Config(heads=args.heads, head_dim=args.head_dim, window=args.window,
                            max_dense_length=args.max_dense_length,
                            budget_s=pick('budget_s', 1.0), max_reps=pick('max_reps', 20))
  lengths = [int(x) for x in pick('lengths', bench_device.DEFAULT_LENGTHS).split(',')]
  passes = [{'fwd': False, 'fwd+bwd': True}[p] for p in args.passes.split(',')]
  out = args.out if args.out != defaults['out'] else 'bench_out/device'
  bench_device.run(argparse.Namespace(out=out), cfg, impls, lengths, args.dtypes.split(','),
                   passes, patterns)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--lengths', default='512,1024,2048,4096,8192,16384,32768,65536')
  parser.add_argument('--impls', default=','.join(IMPLS))
  parser.add_argument('--causal', default='false,true', help='which of false,true to run')
  parser.add_argument('--passes', default='fwd,fwd+bwd')
  parser.add_argument('--block', type=int, default=None, help='blockwise block size')
  parser.add_argument('--budget_s', type=float, default=20.0, help='timing budget per case')
  parser.add_argument('--max_reps', type=int, default=30)
  parser.add_argument('--case_timeout_s', type=float, default=1800.0)
  parser.add_argument('--mem_limit_gib', type=float, default=16.0)
  parser.add_argument('--max_dense_length', type=int, default=16384,
                      help='longest length tried for the implementations that store L^2 scores')
  parser.add_argument('--out', default='bench_out/attention')
  parser.add_argument('--suite', default='kernels', choices=('kernels', 'patterns', 'device'))
  parser.add_argument('--patterns', default=','.join(PATTERNS), help='--suite patterns only')
  parser.add_argument('--max_peer_length', type=int, default=4096,
                      help='--suite patterns: longest length tried for the peers')
  parser.add_argument('--dtypes', default='bfloat16,float32', help='--suite device only')
  parser.add_argument('--heads', type=int, default=16, help='--suite device only')
  parser.add_argument('--head_dim', type=int, default=128, help='--suite device only')
  parser.add_argument('--window', type=int, default=1024, help='--suite device only')
  parser.add_argument('--_child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._child:
    return _child(args._child)
  if args.suite == 'device':
    return run_device(parser, args)
  if args.suite == 'patterns':
    if args.impls == ','.join(IMPLS):
      args.impls = ','.join(PATTERN_IMPLS)
    if args.passes == 'fwd,fwd+bwd':
      args.passes = 'fwd+bwd,fwd'
    return run_patterns(args)

  impls = args.impls.split(',')
  unknown = sorted(set(impls) - set(IMPLS))
  if unknown:
    parser.error(f'unknown --impls {unknown}; known: {list(IMPLS)}')
  lengths = [int(x) for x in args.lengths.split(',')]
  causals = [{'false': False, 'true': True}[c] for c in args.causal.split(',')]
  passes = [{'fwd': False, 'fwd+bwd': True}[p] for p in args.passes.split(',')]
  os.makedirs(args.out, exist_ok=True)
  if 'torch_sdpa' in impls and not torch_available():
    print("torch not installed: torch_sdpa skipped (pip install -e '.[bench]' to include it)")
    impls.remove('torch_sdpa')

  ceiling = spawn(dict(matmul=True, mem_limit_gib=args.mem_limit_gib), 300).get('matmul_gflops')
  print(f'matmul 2048^3 ceiling: {ceiling:.0f} GFLOP/s' if ceiling else 'matmul ceiling failed')
  rows = []
  for length in lengths:
    for causal in causals:
      for backward in passes:
        for impl in impls:
          payload = dict(impl=impl, length=length, causal=causal, backward=backward,
                         block=args.block, budget_s=args.budget_s, max_reps=args.max_reps,
                         mem_limit_gib=args.mem_limit_gib)
          if impl != 'attn_blockwise' and impl != 'torch_sdpa' and length > args.max_dense_length:
            row = dict(payload, status='skipped(L^2)')
          else:
            row = spawn(payload, args.case_timeout_s)
          row.pop('mem_limit_gib', None)
          rows.append(row)
          shown = (f"{row['median_s']:.3f}s {row['gflops']:.0f} GFLOP/s "
                   f"{row['peak_rss_gib']:.2f} GiB" if row['status'] == 'ok' else row['status'])
          print(f"{impl:>15} L={length:>6} causal={causal!s:>5} "
                f"{'fwd+bwd' if backward else 'fwd':>7}: {shown}", flush=True)
  table = format_table(rows)
  print('\nratio = jax_nn time / implementation time (higher is faster)\n' + table)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(), matmul_gflops=ceiling, batch=BATCH,
                   heads=HEADS, head_dim=HEAD_DIM, rows=rows), f, indent=1)
  with open(os.path.join(args.out, 'table.txt'), 'w') as f:
    f.write(table + '\n')
  plot(rows, ceiling or 0.0, os.path.join(args.out, 'attention.png'))
  print(f'wrote {args.out}/results.json, table.txt, attention.png')


if __name__ == '__main__':
  main()
