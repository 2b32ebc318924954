r"""`bench_attention.py --suite device`: fused open attention on one GPU or TPU against its peers.

For each dtype (bf16, fp32), length (4K-64K tokens), pattern and pass (forward, forward+
backward), one run times, on the same inputs (batch 1, 16 heads, head_dim 128):

  attn_pallas     ops.dot_product_attention(implementation='pallas'): the fused kernels
  cudnn           jax.nn.dot_product_attention(implementation='cudnn')   (GPU, bf16/fp16)
  xla             jax.nn.dot_product_attention(implementation='xla')     (dense logits)
  jax_pallas      the Pallas flash attention shipped with jax (jax.experimental.pallas.ops.gpu
                  .attention.mha: full, causal, segment ids)                   (GPU)
  splash          splash attention (jax.experimental.pallas.ops.tpu.splash_attention) (TPU)
  torch_flex      PyTorch FlexAttention under torch.compile, if torch with CUDA is installed
  attn_blockwise  ops.dot_product_attention(implementation='blockwise'): today's XLA loop

Patterns: full, causal, window (causal, 1,024 keys), documents (16 packed documents, a block
mask built once), softcap (causal + soft-cap 30), alibi (causal + ALiBi). A peer that cannot
express a pattern, is not installed, does not run on this platform, or would materialise
`L^2` logits beyond --max_dense_length is reported as skipped, never fatal; an error or OOM in
one case is reported in its cell.

The table gives per cell the median time and TFLOP/s (model FLOPs of the visible pairs: 4 B H
L^2 D times the pattern's density, x3.5 with the backward), and per row: cuDNN's time over
attn_pallas's (throughput ratio; the issue's GPU target at 8K causal bf16 fwd+bwd is >= 0.8),
blockwise's time over attn_pallas's (target >= 5), and attn_pallas's cost against the
pattern's reference (window / causal: target <= 1/8 at 32K). The JSON holds every row with the
device name, jax version and git revision (and whether the tree was dirty).

  python experiments/bench_attention.py --suite device --out bench_out/device
  python experiments/bench_attention.py --suite device --dtypes bfloat16 --lengths 8192,32768 \
      --patterns causal,window --passes fwd+bwd      # the issue's three targets, quickly

On a CPU the same code runs (attn_pallas interpreted: tiny lengths only; for smoke tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from attn_jax.experiment import provenance

PATTERNS = ('full', 'causal', 'window', 'documents', 'softcap', 'alibi')
IMPLS = ('attn_pallas', 'cudnn', 'xla', 'jax_pallas', 'splash', 'torch_flex', 'attn_blockwise')
DEFAULT_LENGTHS = '4096,8192,16384,32768,65536'
# Each pattern's cost is quoted against this one (the same kernel without the feature).
REFERENCE = {'window': 'causal', 'softcap': 'causal', 'alibi': 'causal', 'documents': 'full'}
SOFT_CAP, DOCUMENTS = 30.0, 16


@dataclasses.dataclass(frozen=True)
class Config:
  batch: int = 1
  heads: int = 16
  head_dim: int = 128
  window: int = 1024
  max_dense_length: int = 16384
  budget_s: float = 1.0
  max_reps: int = 20


def density(pattern: str, length: int, window: int) -> float:
  """Fraction of the (query, key) pairs the pattern leaves visible."""
  if pattern == 'full':
    return 1.0
  if pattern == 'documents':
    return 1.0 / DOCUMENTS
  causal = (length + 1) / (2 * length)
  return min(causal, window / length) if pattern == 'window' else causal


def model_flops(cfg: Config, pattern: str, length: int, backward: bool) -> float:
  flops = 4.0 * cfg.batch * cfg.heads * length * length * cfg.head_dim
  return flops * density(pattern, length, cfg.window) * (3.5 if backward else 1.0)


def machine() -> dict:
  """Where the numbers come from (the provenance record: device, versions, git), flat."""
  record = provenance.collect()
  return dict(platform=record['machine']['backend'],
              device_kind=record['machine'].get('device', record['machine']['cpu']),
              device_count=record['machine'].get('device_count', 1), **record['versions'],
              git_revision=record['git_revision'], git_dirty=record['git_dirty'])


def _document_ids(length: int):
  import numpy as np
  return np.repeat(np.arange(DOCUMENTS), -(-length // DOCUMENTS))[:length][None]


def skip_reason(impl: str, pattern: str, dtype: str, length: int, cfg: Config,
                backend: str) -> str | None:
  """Why `impl` cannot run this case here (None: it can)."""
  dense = impl in ('cudnn', 'xla') and pattern in ('documents', 'alibi')
  if impl in ('xla',) or dense:
    if length > cfg.max_dense_length:
      return f'skipped(L^2 > {cfg.max_dense_length}^2)'
  if impl in ('cudnn', 'xla') and pattern == 'softcap':
    return 'n/a (no score function)'
  if impl == 'cudnn':
    if backend != 'gpu':
      return 'n/a (GPU only)'
    if dtype == 'float32':
      return 'n/a (bf16/fp16 only)'
  if impl == 'jax_pallas':
    if backend != 'gpu':
      return 'n/a (GPU only)'
    if pattern not in ('full', 'causal', 'documents'):
      return 'n/a (causal/segments only)'
  if impl == 'splash':
    if backend != 'tpu':
      return 'n/a (TPU only)'
    if pattern == 'alibi':
      return 'n/a (no score function)'
  if impl == 'torch_flex':
    try:
      import torch
    except ImportError:
      return "not installed (pip install -e '.[bench]' on a CUDA machine)"
    if not torch.cuda.is_available():
      return 'n/a (needs a CUDA torch)'
  return None


def _inputs(cfg: Config, length: int, dtype: str):
  import jax
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (cfg.batch, length, cfg.heads, cfg.head_dim)
  return tuple(jax.random.normal(k, shape, dtype) for k in keys)


def _attn_jax(impl: str, pattern: str, length: int, cfg: Config):
  """(attend, block-mask build seconds) for attn_jax's pallas / blockwise paths."""
  import functools

  import jax

  from attn_jax import ops
  kw = dict(implementation=impl.removeprefix('attn_'))
  causal = pattern in ('causal', 'window', 'softcap', 'alibi')
  if causal:
    kw['is_causal'] = True
  if pattern == 'window':
    kw['local_window'] = (cfg.window - 1, 0)
  if pattern == 'softcap':
    kw['score_mod'] = ops.score_mods.soft_cap(SOFT_CAP)
  if pattern == 'alibi':
    kw['score_mod'] = ops.score_mods.alibi(ops.alibi_slopes(cfg.heads))
  build_s = 0.0
  if pattern == 'documents':
    block = ops.kernels.VISIT_BLOCK if impl == 'attn_pallas' else None
    build = jax.jit(lambda: ops.block_mask(
        ops.mask_mods.document(_document_ids(length)), batch=cfg.batch, heads=cfg.heads,
        q_len=length, block_size=block))
    start = time.perf_counter()
    kw['block_mask'] = jax.block_until_ready(build())
    build_s = time.perf_counter() - start
  return functools.partial(ops.dot_product_attention, **kw), build_s


def _jax_nn(impl: str, pattern: str, length: int, cfg: Config):
  import functools

  import jax
  import jax.numpy as jnp

  from attn_jax import ops
  kw = dict(implementation=impl, is_causal=pattern in ('causal', 'window', 'alibi'))
  if pattern == 'window':
    kw['local_window_size'] = (cfg.window - 1, 0)
  if pattern == 'documents':
    ids = jnp.asarray(_document_ids(length))
    kw['mask'] = (ids[:, :, None] == ids[:, None, :])[:, None]
  if pattern == 'alibi':
    pos = jnp.arange(length)
    slopes = ops.alibi_slopes(cfg.heads)
    kw['bias'] = -slopes[None, :, None, None] * jnp.abs(pos[:, None] - pos[None, :])
  return functools.partial(jax.nn.dot_product_attention, **kw), 0.0


def _jax_pallas(pattern: str, length: int, cfg: Config):
  import functools
  import math

  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  ids = jnp.asarray(_document_ids(length)).repeat(cfg.batch, 0) if pattern == 'documents' else None
  return functools.partial(gpu_attention.mha, segment_ids=ids, causal=pattern == 'causal',
                           sm_scale=1.0 / math.sqrt(cfg.head_dim)), 0.0


def _splash(pattern: str, length: int, cfg: Config):
  import math

  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  shape = (length, length)
  mask = {'full': splash.FullMask(shape), 'documents': splash.FullMask(shape),
          'window': splash.LocalMask(shape, (cfg.window - 1, 0), 0)}.get(
              pattern, splash.CausalMask(shape))
  kernel = splash.make_splash_mha_single_device(
      splash.MultiHeadMask([mask] * cfg.heads),
      attn_logits_soft_cap=SOFT_CAP if pattern == 'softcap' else None)
  ids = jnp.asarray(_document_ids(length)[0]) if pattern == 'documents' else None
  scale = 1.0 / math.sqrt(cfg.head_dim)

  def attend(q, k, v):  # [B, L, H, D] -> splash's [H, L, D] per batch row
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    segments = None if ids is None else splash.SegmentIds(q=ids, kv=ids)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
        heads_first(q * scale), heads_first(k), heads_first(v))
    return heads_first(out)
  return attend, 0.0


def _jax_case(impl, pattern, length, dtype, backward, cfg: Config):
  if impl in ('attn_pallas', 'attn_blockwise'):
    attend, build_s = _attn_jax(impl, pattern, length, cfg)
  elif impl in ('cudnn', 'xla'):
    attend, build_s = _jax_nn(impl, pattern, length, cfg)
  elif impl == 'jax_pallas':
    attend, build_s = _jax_pallas(pattern, length, cfg)
  else:
    attend, build_s = _splash(pattern, length, cfg)
  return compiled_case(attend, *_inputs(cfg, length, dtype), backward=backward, build_s=build_s)


def compiled_case(attend, q, k, v, *, backward: bool, build_s: float):
  """(a call that runs the compiled step and waits for it, {compile_s, build_s}): `attend`
  alone, or the gradients of the float32 sum of its output with respect to q, k and v."""
  import jax
  import jax.numpy as jnp

  if backward:
    loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))  # noqa: E731
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  else:
    fn = jax.jit(attend)
  start = time.perf_counter()
  compiled = fn.lower(q, k, v).compile()
  compile_s = time.perf_counter() - start
  return (lambda: jax.block_until_ready(compiled(q, k, v))), dict(compile_s=compile_s,
                                                                  build_s=build_s)


def _torch_case(pattern, length, dtype, backward, cfg: Config):
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention

  gen = torch.Generator(device='cuda').manual_seed(0)
  tdtype = {'bfloat16': torch.bfloat16, 'float32': torch.float32,
            'float16': torch.float16}[dtype]
  q, k, v = (torch.randn(cfg.batch, cfg.heads, length, cfg.head_dim, generator=gen,
                         device='cuda', dtype=tdtype, requires_grad=backward) for _ in range(3))
  ids = torch.as_tensor(_document_ids(length)[0], device='cuda')
  slopes = torch.as_tensor([2.0 ** (-8.0 * (i + 1) / cfg.heads) for i in range(cfg.heads)],
                           device='cuda')
  causal = lambda b, h, qi, ki: qi >= ki  # noqa: E731
  masks = {'full': None, 'causal': causal, 'softcap': causal, 'alibi': causal,
           'window': lambda b, h, qi, ki: (qi >= ki) & (qi - ki < cfg.window),
           'documents': lambda b, h, qi, ki: ids[qi] == ids[ki]}
  score_mod = None
  if pattern == 'softcap':
    def score_mod(score, b, h, qi, ki):
      return SOFT_CAP * torch.tanh(score / SOFT_CAP)
  elif pattern == 'alibi':
    def score_mod(score, b, h, qi, ki):
      return score - slopes[h] * (qi - ki).abs()
  start = time.perf_counter()
  bm = None if masks[pattern] is None else create_block_mask(
      masks[pattern], None, None, length, length, device='cuda')
  build_s = time.perf_counter() - start
  flex = torch.compile(flex_attention)

  def run():
    out = flex(q, k, v, block_mask=bm, score_mod=score_mod)
    if backward:
      out.float().sum().backward()
      for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
  start = time.perf_counter()
  run()  # compiles
  return run, dict(compile_s=time.perf_counter() - start, build_s=build_s)


def _time(fn, budget_s: float, max_reps: int) -> list[float]:
  fn()  # warm-up
  times = []
  while len(times) < max_reps and (not times or sum(times) + times[-1] < budget_s):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def run_case(impl, pattern, length, dtype, backward, cfg: Config, backend: str) -> dict:
  row = dict(impl=impl, pattern=pattern, length=length, dtype=dtype, backward=backward)
  skip = skip_reason(impl, pattern, dtype, length, cfg, backend)
  if skip:
    return dict(row, status=skip)
  try:
    if impl == 'torch_flex':
      fn, info = _torch_case(pattern, length, dtype, backward, cfg)
    else:
      fn, info = _jax_case(impl, pattern, length, dtype, backward, cfg)
    times = _time(fn, cfg.budget_s, cfg.max_reps)
  except Exception as e:  # noqa: BLE001  one failing peer must not end the run
    text = f'{type(e).__name__}: {e}'
    oom = any(s in text for s in ('RESOURCE_EXHAUSTED', 'Out of memory', 'OutOfMemory'))
    return dict(row, status='OOM' if oom else 'error', error=text[:400])
  median = statistics.median(times)
  return dict(row, status='ok', median_s=median, times_s=times,
              tflops=model_flops(cfg, pattern, length, backward) / median / 1e12, **info)


def _ratio(num, den) -> str:
  ok = num is not None and den is not None and num['status'] == den['status'] == 'ok'
  return f"{num['median_s'] / den['median_s']:.2f}" if ok else '-'


def format_table(rows: list[dict], cfg: Config) -> str:
  """A line per (dtype, pass, pattern, length); cells: median ms and TFLOP/s per impl, then
  cudnn/pallas and blockwise/pallas time ratios and pallas's cost vs the reference pattern."""
  keyed = {(r['impl'], r['dtype'], r['backward'], r['pattern'], r['length']): r for r in rows}
  impls = [i for i in IMPLS if any(r['impl'] == i for r in rows)]
  header = (f"{'dtype':>8} {'pass':>7} {'pattern':>9} {'len':>6} {'dens':>6} | "
            + ' | '.join(f'{i:>18}' for i in impls)
            + f" | {'cudnn/pallas':>12} {'blockw/pallas':>13} {'vs ref':>6}")
  lines = [header, '-' * len(header)]
  order = {p: i for i, p in enumerate(PATTERNS)}
  cases = sorted({k[1:] for k in keyed}, key=lambda k: (k[0], k[1], order[k[2]], k[3]))
  for case in cases:
    dtype, backward, pattern, length = case
    get = lambda impl, p=pattern, c=case: keyed.get((impl, c[0], c[1], p, c[3]))  # noqa: E731
    cells = []
    for impl in impls:
      r = get(impl)
      cell = ('-' if r is None else f"{r['median_s'] * 1e3:.3g}ms {r['tflops']:.3g}TF"
              if r['status'] == 'ok' else r['status'].split(' (')[0][:16])
      cells.append(f'{cell:>18}')
    pallas = get('attn_pallas')
    ref = get('attn_pallas', REFERENCE.get(pattern))
    lines.append(
        f"{dtype:>8} {'fwd+bwd' if backward else 'fwd':>7} {pattern:>9} {length:>6} "
        f"{density(pattern, length, cfg.window):>6.3f} | " + ' | '.join(cells)
        + f" | {_ratio(get('cudnn'), pallas):>12} {_ratio(get('attn_blockwise'), pallas):>13}"
        f" {_ratio(pallas, ref) if pattern in REFERENCE else '':>6}")
  return '\n'.join(lines)


def run(args, cfg: Config, impls, lengths, dtypes, passes, patterns) -> dict:
  """Runs every case in this process (one device), prints and writes the table and JSON."""
  import jax

  info = machine()
  backend = jax.default_backend()
  print(f"device: {info['device_kind']} ({backend}), jax {info['jax']}, "
        f"git {info['git_revision'][:12]}{' (dirty)' if info['git_dirty'] else ''}")
  if backend == 'cpu':
    print('no accelerator: attn_pallas runs interpreted; numbers are not device numbers')
  rows = []
  for dtype in dtypes:
    for backward in passes:
      for pattern in patterns:
        for length in lengths:
          for impl in impls:
            row = run_case(impl, pattern, length, dtype, backward, cfg, backend)
            rows.append(row)
            shown = (f"{row['median_s'] * 1e3:.3f} ms {row['tflops']:.1f} TFLOP/s"
                     if row['status'] == 'ok' else row['status'])
            print(f"{impl:>15} {dtype:>8} {'fwd+bwd' if backward else 'fwd':>7} "
                  f"{pattern:>9} L={length:>6}: {shown}", flush=True)
  table = format_table(rows, cfg)
  print('\ncells: median time, TFLOP/s; cudnn/pallas and blockw/pallas: time ratios (>1: '
        'pallas faster); vs ref: pallas time / its time on the reference pattern\n' + table)
  os.makedirs(args.out, exist_ok=True)
  result = dict(provenance=provenance.collect(), machine=info,
                config=dataclasses.asdict(cfg), soft_cap=SOFT_CAP,
                documents=DOCUMENTS, rows=rows)
  with open(os.path.join(args.out, 'device.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, 'device.txt'), 'w') as f:
    f.write(table + '\n')
  print(f'wrote {args.out}/device.json, device.txt')
  return result
