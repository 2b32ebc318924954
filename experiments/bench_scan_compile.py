"""Compile time of a deep decoder: layers stacked with `nn.scan` vs a Python loop.

    PYTHONPATH=. python experiments/bench_scan_compile.py --output_dir=/tmp/bench_scan

Compiles the forward+backward pass (gradient of a token cross-entropy) of a `DecoderLM`
with `--num_layers` layers both ways, `--repeats` times each (fresh jit each time, so
XLA's in-memory cache does not help), and prints median seconds and the ratio. Writes
`bench_scan_compile.json` to `--output_dir`.
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

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_scan_compile', 'Where to write the JSON.')
flags.DEFINE_integer('num_layers', 24, 'Decoder layers.')
flags.DEFINE_string('variant', 'small', 'Model size (transformer_config variant).')
flags.DEFINE_integer('seq_len', 128, 'Sequence length.')
flags.DEFINE_integer('batch', 4, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Compilations per setting (median reported).')


def compile_seconds(scan_layers: bool) -> float:
  cfg = models.transformer_config(FLAGS.variant, vocab_size=1000, dropout_rate=0.0,
                                  num_decoder_layers=FLAGS.num_layers, scan_layers=scan_layers)
  model = models.DecoderLM(cfg)
  tokens = jnp.ones((FLAGS.batch, FLAGS.seq_len), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))['params']

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  grad_fn = jax.value_and_grad(loss)
  start = time.perf_counter()
  # A new jit wrapper per call so nothing is reused from an earlier compilation.
  jax.jit(lambda p, t: grad_fn(p, t)).lower(params, tokens).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  results = {}
  for name, scan in [('scan', True), ('unrolled', False)]:
    times = [compile_seconds(scan) for _ in range(FLAGS.repeats)]
    results[name] = dict(median_s=statistics.median(times), all_s=times)
  ratio = results['unrolled']['median_s'] / results['scan']['median_s']
  print(f'{FLAGS.num_layers}-layer DecoderLM ({FLAGS.variant}), forward+backward compile, '
        f'backend={jax.default_backend()}')
  print(f"{'stacking':<10} {'median s':>9}")
  for name in ('scan', 'unrolled'):
    print(f"{name:<10} {results[name]['median_s']:>9.2f}")
  print(f'unrolled / scan = {ratio:.1f}x')
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'bench_scan_compile.json'), 'w') as f:
    json.dump(dict(config=dict(num_layers=FLAGS.num_layers, variant=FLAGS.variant,
                               seq_len=FLAGS.seq_len, batch=FLAGS.batch,
                               backend=jax.default_backend()),
                   results=results, unrolled_over_scan=ratio), f, indent=2)


if __name__ == '__main__':
  app.run(main)
