"""Greedy decoding speed: KV cache (`models.generate`) vs recomputing the whole prefix.

    PYTHONPATH=. python experiments/bench_decode.py --output_dir=/tmp/bench_decode

Both are one jitted `lax.while_loop` generating exactly `n` tokens from a one-token
prompt (EOS is disabled through the output bias so neither stops early). The baseline
runs the full teacher-forced forward pass over the `[batch, n]` buffer at every step and
reads position `i`. Prints median tokens/s over `--repeats` runs (after a warm-up that
compiles) and the speed-up, and writes `bench_decode.json` (+ a PNG) to `--output_dir`.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import models
from attn_jax.models.decoding import EOS_ID

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_decode', 'Where to write JSON and PNG.')
flags.DEFINE_list('lengths', ['256', '1024'], 'Numbers of generated tokens.')
flags.DEFINE_string('variant', 'tiny', 'Model size (transformer_config variant).')
flags.DEFINE_integer('num_layers', 2, 'Decoder layers.')
flags.DEFINE_integer('d_model', 128, 'Model width.')
flags.DEFINE_integer('batch', 1, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per setting (median reported).')


def build(max_len: int):
  cfg = models.transformer_config(
      FLAGS.variant, vocab_size=512, dropout_rate=0.0, num_decoder_layers=FLAGS.num_layers,
      d_model=FLAGS.d_model, d_ff=4 * FLAGS.d_model, max_len=max_len + 2, tie_output=False,
      positional='rope')
  model = models.DecoderLM(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params'])
  params['decoder']['logits']['bias'] = params['decoder']['logits']['bias'].at[EOS_ID].set(-1e9)
  return model, params


def recompute_greedy(model, params, prompt, n: int) -> jax.Array:
  """Greedy decoding without a cache: a full forward pass over the buffer per token."""
  batch = prompt.shape[0]

  def body(carry):
    i, buffer = carry
    logits = model.apply({'params': params}, buffer)  # logits[:, i] sees buffer[:, :i]
    return i + 1, buffer.at[:, i].set(jnp.argmax(logits[:, i], -1).astype(jnp.int32))

  buffer = jnp.zeros((batch, n + 1), jnp.int32).at[:, 0].set(prompt[:, 0])
  return jax.lax.while_loop(lambda c: c[0] < n + 1, body, (jnp.array(1), buffer))[1][:, 1:]


def tokens_per_second(fn, n: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return FLAGS.batch * n / statistics.median(times)


def measure(n: int) -> dict:
  """Tokens/s of cached and recomputing greedy decoding of `n` tokens."""
  model, params = build(n)
  prompt = jnp.full((FLAGS.batch, 1), 5, jnp.int32)

  def cached_fn():
    return models.generate(model, params, prompt=prompt, max_decode_len=n)
  recompute_jit = jax.jit(lambda p, pr: recompute_greedy(model, p, pr, n))

  def recompute_fn():
    return recompute_jit(params, prompt)
  cached, recompute = tokens_per_second(cached_fn, n), tokens_per_second(recompute_fn, n)
  # Same tokens either way (greedy, no EOS): the cache changes speed, not results.
  same = bool(jnp.all(cached_fn() == recompute_fn()))
  return dict(tokens=n, cache_tok_s=cached, recompute_tok_s=recompute,
              speedup=cached / recompute, same_tokens=same)


def main(argv):
  del argv
  results = [measure(int(x)) for x in FLAGS.lengths]
  print(f'greedy decoding, DecoderLM d={FLAGS.d_model} x {FLAGS.num_layers} layers, batch '
        f'{FLAGS.batch}, backend={jax.default_backend()}')
  print(f"{'tokens':>7} {'cache tok/s':>12} {'recompute tok/s':>16} {'speed-up':>9} {'same':>5}")
  for r in results:
    print(f"{r['tokens']:>7} {r['cache_tok_s']:>12.0f} {r['recompute_tok_s']:>16.0f} "
          f"{r['speedup']:>8.1f}x {str(r['same_tokens']):>5}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'bench_decode.json'), 'w') as f:
    json.dump(dict(config=dict(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                               batch=FLAGS.batch, backend=jax.default_backend()),
                   results=results), f, indent=2)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  lengths = [r['tokens'] for r in results]
  ax.plot(lengths, [r['cache_tok_s'] for r in results], 'o-', label='KV cache')
  ax.plot(lengths, [r['recompute_tok_s'] for r in results], 's-', label='recompute prefix')
  ax.set(xscale='log', yscale='log', xlabel='generated tokens', ylabel='tokens / s')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.output_dir, 'bench_decode.png'), dpi=120)


if __name__ == '__main__':
  app.run(main)
