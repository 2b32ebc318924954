r"""What a decoding step costs with sliding-window layers: 'LLLLLG' against all-global layers.

A `DecoderLM` of `--layers` layers is prefilled with a `--context`-token prompt, then decodes
`--steps` tokens one at a time; the timed part is the steps alone (one jitted `lax.fori_loop`
of `step`, after a warm-up that compiles it). Sliding-window ('L') layers keep a rolling cache
of `--window + 1` slots, so their step reads O(window) keys whatever the context; a global
layer reads every cached key. Printed and written to `decode_window.json` (with the
provenance record): milliseconds per step, tokens/s, the cache bytes per token of context
and the ratio to all-global, per pattern.

  python experiments/bench_decode_window.py --output_dir=experiments/figures
  python experiments/bench_decode_window.py --context=1024 --steps=8   # seconds, for a look
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
from attn_jax.experiment import provenance

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_decode_window', 'Where to write the JSON.')
flags.DEFINE_list('patterns', ['LLLLLG', 'G'], "Layer patterns ('G' = every layer global).")
flags.DEFINE_integer('layers', 6, 'Decoder layers.')
flags.DEFINE_integer('context', 8192, 'Prompt tokens before the timed steps.')
flags.DEFINE_integer('steps', 64, 'Timed decoding steps.')
flags.DEFINE_integer('window', 512, "Sliding window of the 'L' layers (keys back).")
flags.DEFINE_integer('d_model', 128, 'Model width.')
flags.DEFINE_integer('heads', 4, 'Attention heads.')
flags.DEFINE_integer('repeats', 3, 'Timed runs (median reported).')


def build(pattern: str):
  cfg = models.transformer_config(
      'tiny', vocab_size=512, dropout_rate=0.0, num_encoder_layers=0,
      num_decoder_layers=FLAGS.layers, d_model=FLAGS.d_model, d_ff=4 * FLAGS.d_model,
      positional='rope', max_len=FLAGS.context + FLAGS.steps + 2,
      layer_pattern='' if set(pattern) == {'G'} else pattern,
      attention=dict(num_heads=FLAGS.heads,
                     sliding_window=None if set(pattern) == {'G'} else FLAGS.window))
  model = models.DecoderLM(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params'])
  return model, params


def measure(pattern: str) -> dict:
  model, params = build(pattern)
  prompt = jax.random.randint(jax.random.key(1), (1, FLAGS.context), 4, 512)
  fns = model.decoding_fns(params, prompt=prompt, max_decode_len=FLAGS.steps)
  _, state = jax.jit(fns.start)()
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state['cache']))

  @jax.jit
  def decode(state):
    def body(i, carry):
      state, token = carry
      logits, state = fns.step(state, token)
      return state, jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, FLAGS.steps, body, (state, jnp.full((1,), 5, jnp.int32)))

  jax.block_until_ready(decode(state))  # compile + warm up
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(decode(state))
    times.append(time.perf_counter() - start)
  per_step = statistics.median(times) / FLAGS.steps
  return dict(pattern=pattern, ms_per_step=1e3 * per_step, tokens_per_second=1 / per_step,
              cache_bytes=cache_bytes,
              cache_bytes_per_context_token=cache_bytes / (FLAGS.context + FLAGS.steps + 1))


def main(argv):
  del argv
  rows = [measure(p) for p in FLAGS.patterns]
  reference = rows[-1]
  print(f'DecoderLM {FLAGS.layers} layers, d_model {FLAGS.d_model}, {FLAGS.heads} heads, '
        f'{FLAGS.context}-token context, window {FLAGS.window}, {jax.default_backend()}')
  print(f"{'pattern':>10} {'ms/step':>9} {'tokens/s':>9} {'cache MiB':>10} "
        f"{'step vs ' + reference['pattern']:>12} {'cache vs':>9}")
  for r in rows:
    r['step_ratio'] = r['ms_per_step'] / reference['ms_per_step']
    r['cache_ratio'] = r['cache_bytes'] / reference['cache_bytes']
    print(f"{r['pattern']:>10} {r['ms_per_step']:9.2f} {r['tokens_per_second']:9.1f} "
          f"{r['cache_bytes'] / 2**20:10.1f} {r['step_ratio']:12.3f} {r['cache_ratio']:9.3f}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  settings = {k: getattr(FLAGS, k) for k in ('layers', 'context', 'steps', 'window', 'd_model',
                                             'heads', 'repeats')}
  with open(os.path.join(FLAGS.output_dir, 'decode_window.json'), 'w') as f:
    json.dump({'provenance': provenance.collect(matmul=True), 'settings': settings,
               'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
