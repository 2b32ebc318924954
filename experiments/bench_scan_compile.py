"""Compile time of a deep decoder: layers stacked with `nn.scan` vs a Python loop.

    PYTHONPATH=. python experiments/bench_scan_compile.py --output_dir=/tmp/bench_scan

For every `--num_layers` depth and `--remat` setting, builds the forward+backward pass
(gradient of a token cross-entropy) of a `DecoderLM` both ways and times its three phases
separately: tracing to a jaxpr (`jax.jit(f).trace`), lowering to StableHLO (`.lower()`) and
XLA compilation (`.compile()`). With `--train_step` the program is a whole AdamW training
step (gradient, optimizer update, new parameters), the kind of program `train.py` compiles.
Both stackings time exactly the same thing: the parameter
shapes come from `jax.eval_shape` before the clock starts, and every repeat wraps a new
function in a new `jax.jit`, so nothing is reused from an earlier compilation. Repeats
alternate scan and unrolled so machine load affects both alike; the median of
`--repeats` is reported. Writes `scan_compile.json` and `scan_compile.png` (seconds vs
depth) to `--output_dir` (`scan_compile_train_step.*` with `--train_step`).

What bounds the ratio on XLA:CPU: the CPU compiler code-generates each distinct kernel once,
so 24 unrolled layers compile no more kernels than one (62 functions, profiled with
`jax.profiler.trace`); unrolling costs HLO passes and tracing (~0.1 s per layer here), while
the scan body's kernels (fused with the per-layer slices of the stacked parameters and
residuals) are all new (110 functions). In the forward+backward run in
`experiments/figures/scan_compile.json`, compile time is a fixed ~0.8 s of kernel code
generation plus ~0.1 s per unrolled layer, against ~0.45 s for the scanned body.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from attn_jax import models
from attn_jax.experiment import provenance

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_scan_compile', 'Where to write JSON and PNG.')
flags.DEFINE_list('num_layers', ['1', '6', '12', '24'], 'Decoder depths.')
flags.DEFINE_list('remat', ['false', 'true'], 'nn.remat settings to measure (both stackings).')
flags.DEFINE_string('variant', 'small', 'Model size (transformer_config variant).')
flags.DEFINE_integer('seq_len', 128, 'Sequence length.')
flags.DEFINE_integer('batch', 4, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Compilations per setting (median reported).')
flags.DEFINE_bool('train_step', False, 'Time a whole AdamW training step, not only the '
                  'forward+backward pass.')
flags.DEFINE_bool('replot', False, 'Only redraw the PNG from the JSON in --output_dir.')

PHASES = ('trace_s', 'lower_s', 'compile_s')


def phase_seconds(num_layers: int, scan_layers: bool, remat: bool) -> dict[str, float]:
  """Seconds to trace, lower and compile `value_and_grad` of the LM loss (or a train step)."""
  cfg = models.transformer_config(FLAGS.variant, vocab_size=1000, dropout_rate=0.0,
                                  num_decoder_layers=num_layers, scan_layers=scan_layers,
                                  remat=remat)
  model = models.DecoderLM(cfg)
  tokens = jnp.ones((FLAGS.batch, FLAGS.seq_len), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))['params']

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  grad_fn = jax.value_and_grad(loss)
  args = (params,)
  if FLAGS.train_step:
    optimizer = optax.adamw(1e-3)
    args += (jax.eval_shape(optimizer.init, params),)

    def program(params, opt_state, tokens):
      value, grads = grad_fn(params, tokens)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value
  else:
    program = grad_fn
  # A new function in a new jit per call so nothing is reused from an earlier one.
  fn = jax.jit(lambda *a: program(*a))
  t0 = time.perf_counter()
  traced = fn.trace(*args, tokens)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return dict(trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2)


def measure(num_layers: int, remat: bool) -> dict[str, dict]:
  runs: dict[str, list[dict]] = {'scan': [], 'unrolled': []}
  for _ in range(FLAGS.repeats):
    for name in runs:
      runs[name].append(phase_seconds(num_layers, name == 'scan', remat))
  out = {}
  for name, rs in runs.items():
    totals = [sum(r[p] for p in PHASES) for r in rs]
    out[name] = dict({p: statistics.median(r[p] for r in rs) for p in PHASES},
                     total_s=statistics.median(totals), all_total_s=totals)
  return out


def _program_name() -> str:
  return 'AdamW train step' if FLAGS.train_step else 'forward+backward'


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for remat in sorted({r['remat'] for r in rows}):
    sel = [r for r in rows if r['remat'] == remat]
    depths = [r['num_layers'] for r in sel]
    style = dict(linestyle='--', markerfacecolor='white') if remat else dict(linestyle='-')
    suffix = ', remat' if remat else ''
    for name, color, marker in [('unrolled', 'C1', 's'), ('scan', 'C0', 'o')]:
      ax.plot(depths, [r[name]['total_s'] for r in sel], color=color, marker=marker,
              label=f'{name}{suffix}', **style)
    last = sel[-1]
    ax.annotate(f"{last['unrolled_over_scan']:.1f}x", (last['num_layers'],
                                                       last['unrolled']['total_s']),
                xytext=(7, 0), textcoords='offset points', va='center', fontsize=9)
  ax.set(xlabel='decoder layers', ylabel='trace + lower + XLA compile (s)', ylim=(0, None),
         title=f'DecoderLM ({FLAGS.variant}) {_program_name()} compile, '
               f'{jax.default_backend()}')
  ax.title.set_fontsize(10)
  depths = sorted({r['num_layers'] for r in rows})
  ax.set_xticks(depths)
  ax.set_xlim(0, depths[-1] * 1.12)  # room for the unrolled/scan labels
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, title='labels: unrolled / scan', title_fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  stem = 'scan_compile_train_step' if FLAGS.train_step else 'scan_compile'
  json_path = os.path.join(FLAGS.output_dir, f'{stem}.json')
  if FLAGS.replot:
    with open(json_path) as f:
      saved = json.load(f)
    FLAGS.variant = saved['config']['variant']
    FLAGS.train_step = saved['config'].get('train_step', False)
    plot(saved['results'], os.path.join(FLAGS.output_dir, f'{stem}.png'))
    return
  rows = []
  for remat in (s.lower() in ('1', 'true', 'yes') for s in FLAGS.remat):
    for num_layers in (int(n) for n in FLAGS.num_layers):
      r = measure(num_layers, remat)
      rows.append(dict(num_layers=num_layers, remat=remat, **r,
                       unrolled_over_scan=r['unrolled']['total_s'] / r['scan']['total_s']))
  print(f'DecoderLM ({FLAGS.variant}, batch {FLAGS.batch} x {FLAGS.seq_len}) {_program_name()}, '
        f'median of {FLAGS.repeats}, backend={jax.default_backend()}')
  print(f"{'layers':>6} {'remat':>5} {'stacking':<9} {'trace s':>8} {'lower s':>8} "
        f"{'compile s':>9} {'total s':>8} {'unrolled/scan':>13}")
  for r in rows:
    for name in ('scan', 'unrolled'):
      t = r[name]
      ratio = f"{r['unrolled_over_scan']:.1f}x" if name == 'unrolled' else ''
      print(f"{r['num_layers']:>6} {str(r['remat']):>5} {name:<9} {t['trace_s']:>8.2f} "
            f"{t['lower_s']:>8.2f} {t['compile_s']:>9.2f} {t['total_s']:>8.2f} {ratio:>13}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(json_path, 'w') as f:
    json.dump(dict(provenance=provenance.collect(),
                   config=dict(variant=FLAGS.variant, seq_len=FLAGS.seq_len, batch=FLAGS.batch,
                               repeats=FLAGS.repeats, train_step=FLAGS.train_step,
                               backend=jax.default_backend(),
                               jax=jax.__version__), results=rows), f, indent=2)
  plot(rows, os.path.join(FLAGS.output_dir, f'{stem}.png'))


if __name__ == '__main__':
  app.run(main)
