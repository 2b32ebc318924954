"""Forward+backward of self-attention: attn_jax `MultiHeadAttention` vs flax's
`MultiHeadDotProductAttention`, same shapes and the same parameters, side by side.

    PYTHONPATH=. python experiments/bench_layer.py --output_dir=/tmp/bench_layer

For each `--seq_lens` value, times the jitted gradient (w.r.t. parameters and input) of a
scalar function of the module output, alternating the two modules run by run so that
machine load affects both alike. Prints median milliseconds and `flax / attn_jax`
(> 1 means attn_jax is faster), and writes `bench_layer.json` to `--output_dir`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn_jax import models
from attn_jax.experiment import provenance

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_layer', 'Where to write the JSON.')
flags.DEFINE_list('seq_lens', ['128', '512'], 'Sequence lengths.')
flags.DEFINE_integer('batch', 4, 'Batch size.')
flags.DEFINE_integer('d_model', 256, 'Model width.')
flags.DEFINE_integer('num_heads', 4, 'Heads.')
flags.DEFINE_bool('causal', True, 'Causal self-attention (decoder layer).')
flags.DEFINE_integer('repeats', 20, 'Timed runs per module (median reported).')


def grad_fn(module, mask):
  def loss(params, x):
    return jnp.sum(module.apply({'params': params}, x, mask=mask) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv):
  del argv
  results = []
  for length in (int(s) for s in FLAGS.seq_lens):
    x = jax.random.normal(jax.random.key(0), (FLAGS.batch, length, FLAGS.d_model))
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=FLAGS.num_heads)
    params = flax_mha.init(jax.random.key(1), x)['params']
    mask = nn.make_causal_mask(jnp.ones((1, length))) if FLAGS.causal else None
    ours = models.MultiHeadAttention(
        models.AttentionConfig(num_heads=FLAGS.num_heads, implementation='dense'),
        is_causal=FLAGS.causal)
    fns = {'attn_jax': grad_fn(ours, None), 'flax': grad_fn(flax_mha, mask)}
    # Same parameters, same maths: the gradients must agree before timing means anything.
    g_ours, g_flax = (fn(params, x) for fn in fns.values())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3),
                 g_ours, g_flax)
    times = {name: [] for name in fns}
    for _ in range(FLAGS.repeats):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    results.append(dict(seq_len=length, attn_jax_ms=ms['attn_jax'], flax_ms=ms['flax'],
                        flax_over_attn_jax=ms['flax'] / ms['attn_jax']))
  print(f'self-attention forward+backward, batch {FLAGS.batch}, d={FLAGS.d_model}, '
        f'{FLAGS.num_heads} heads, causal={FLAGS.causal}, backend={jax.default_backend()}')
  print(f"{'seq_len':>7} {'attn_jax ms':>12} {'flax ms':>9} {'flax/attn_jax':>14}")
  for r in results:
    print(f"{r['seq_len']:>7} {r['attn_jax_ms']:>12.2f} {r['flax_ms']:>9.2f} "
          f"{r['flax_over_attn_jax']:>13.2f}x")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'bench_layer.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(), config=dict(batch=FLAGS.batch,
                                                                 d_model=FLAGS.d_model,
                               num_heads=FLAGS.num_heads, causal=FLAGS.causal,
                               backend=jax.default_backend()), results=results), f, indent=2)


if __name__ == '__main__':
  app.run(main)
