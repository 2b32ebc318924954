"""Per-device memory of context-parallel attention at a fixed global length, from the compiler.

    PYTHONPATH=. python experiments/bench_context_parallel.py --output_dir=experiments/figures

For every device count in `--devices` (fake CPU devices, `--xla_force_host_platform_device_count`
set here before JAX starts) and every `--strategies` entry, compiles the forward+backward pass
of causal self-attention over `--length` tokens, split over a `('sequence',)` mesh in the
zig-zag layout, and reads `compiled.memory_analysis()`: the per-device arguments (the local
q, k, v), outputs (the local gradients) and temporaries (everything the attention keeps or
builds while it runs: the K/V chunks in flight, residuals, blockwise scratch). 'unsharded' is
`ops.dot_product_attention` on one device. Nothing is run, so the numbers are the compiler's,
not a measurement of a shared machine. Writes `context_parallel_memory.json` (with the git
revision, date, CPU and versions) to `--output_dir`.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from attn_jax import ops  # noqa: E402
from attn_jax.experiment import provenance

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', 'experiments/figures', 'Where to write the JSON.')
flags.DEFINE_integer('length', 16384, 'Global sequence length.')
flags.DEFINE_integer('batch', 1, 'Batch size.')
flags.DEFINE_integer('heads', 8, 'Query heads.')
flags.DEFINE_list('kv_heads', ['8', '1'], 'Key/value head counts (MHA, MQA...).')
flags.DEFINE_integer('head_dim', 64, 'Head dimension.')
flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Sequence-axis sizes.')
flags.DEFINE_list('strategies', ['ring', 'all_gather'], 'Context-parallel strategies.')
flags.DEFINE_integer('block_size', 128, 'Blockwise block size of the local attention calls: '
                     'its scratch (heads x block^2 floats per array) is the same on every '
                     'device count, so it is kept small next to the length-dependent part.')


def _memory(fn, *args) -> dict[str, int]:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return dict(argument_bytes=int(stats.argument_size_in_bytes),
              output_bytes=int(stats.output_size_in_bytes),
              temp_bytes=int(stats.temp_size_in_bytes))


def _grad_of(attention):
  """fwd+bwd: gradients of <out, cotangent> w.r.t. q, k, v."""
  def program(q, k, v, d_out):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * d_out), argnums=(0, 1, 2))(
        q, k, v)
  return program


def _rows(kv_heads: int) -> list[dict]:
  b, t, h, d, block = FLAGS.batch, FLAGS.length, FLAGS.heads, FLAGS.head_dim, FLAGS.block_size
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, kv_heads, d), jnp.float32)
  unsharded = lambda q, k, v: ops.dot_product_attention(  # noqa: E731
      q, k, v, is_causal=True, implementation='blockwise', block_size=block)
  rows = [dict(strategy='unsharded', devices=1, kv_heads=kv_heads,
               **_memory(_grad_of(unsharded), q, kv, kv, q))]
  for strategy in FLAGS.strategies:
    for n in map(int, FLAGS.devices):
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ('sequence',))
      attention = lambda q, k, v, mesh=mesh, strategy=strategy: ops.sequence_sharded_attention(  # noqa: E731
          q, k, v, mesh=mesh, layout='zigzag', strategy=strategy, is_causal=True,
          implementation='blockwise', block_size=block)
      rows.append(dict(strategy=strategy, devices=n, kv_heads=kv_heads,
                       **_memory(_grad_of(attention), q, kv, kv, q)))
      print(rows[-1], flush=True)
  return rows


def main(argv):
  del argv
  rows = [r for kh in map(int, FLAGS.kv_heads) for r in _rows(kh)]
  b, t, h, d = FLAGS.batch, FLAGS.length, FLAGS.heads, FLAGS.head_dim
  config = dict(length=t, batch=b, heads=h, kv_heads=[int(x) for x in FLAGS.kv_heads],
                head_dim=d, dtype='float32', layout='zigzag', mask='causal',
                implementation='blockwise', block_size=FLAGS.block_size,
                program='forward+backward (grad of q, k, v)')
  path = os.path.join(FLAGS.output_dir, 'context_parallel_memory.json')
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(dict(provenance=provenance.collect(), config=config, results=rows), f, indent=1)
  print(f'{"kv_heads":>8} {"strategy":>12} {"devices":>7} {"args MiB":>9} {"temp MiB":>9} '
        f'{"temp x n":>9}')
  for r in rows:
    mib = lambda x: x / 2**20  # noqa: E731
    print(f"{r['kv_heads']:>8} {r['strategy']:>12} {r['devices']:>7} "
          f"{mib(r['argument_bytes']):>9.2f} {mib(r['temp_bytes']):>9.2f} "
          f"{mib(r['temp_bytes'] * r['devices']):>9.2f}")
  print('wrote', path)


if __name__ == '__main__':
  app.run(main)
