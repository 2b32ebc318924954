"""Decoding speed: what the caches save (`--suite=cache`), and beam search on a trained
translation run against an earlier revision of the code (`--suite=beam`).

    PYTHONPATH=. python experiments/bench_decode.py --output_dir=/tmp/bench_decode
    PYTHONPATH=. python experiments/bench_decode.py --suite=beam --workdir=runs/bible \
        --texts=data/bible/test.en --baseline_rev=92f50e9 --output_dir=/tmp/bench_decode

`--suite=beam` decodes `--sentences` lines of `--texts` with the run's beam search (beam 4)
through `inference.predict`, in fresh processes, four ways: the code at `--baseline_rev`
(checked out with `git worktree`) fed in input order as before (batches of `--batch_size`
lines padded to their longest), today's code fed the same way, today's code as `decode.py`
feeds it (sorted by length), all three without output caps, and the last again with each
output capped at `--max_len_a` x source tokens + `--max_len_b` (the translation config's
rule). Each process decodes the set twice: the first pass includes compiling every shape it
meets, the second is the steady state. It prints sentences/s and the speed-ups over the
baseline, checks which outputs equal the baseline's (all must, but for the capped row, where
only outputs the cap cut short may differ), and writes `beam_speed.json`.

1. `DecoderLM`, KV cache (`models.generate`) vs recomputing the whole prefix: both are one
   jitted `lax.while_loop` generating exactly `n` tokens (`--lengths`) from a one-token
   prompt (EOS is disabled through the output bias so neither stops early). The baseline
   runs the full teacher-forced forward pass over the `[batch, n]` buffer at every step and
   reads position `i`.
2. `EncoderDecoder` over a `--source_len` source, `--cross_tokens` tokens: cross-attention
   keys/values of the encoder output projected once at the prefill and cached (what
   `models.generate` does) vs projected again at every step (the same loop, with the
   encoder output passed to every step).

`--suite=cache`: prints median tokens/s over `--repeats` runs (after a warm-up that compiles)
and the speed-ups, checks that both ways generate the same tokens, and writes
`decode_speed.json` and `decode_speed.png` to `--output_dir`.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from attn_jax import models
from attn_jax.experiment import provenance
from attn_jax.models import decoding
from attn_jax.models.decoding import EOS_ID

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_decode', 'Where to write JSON and PNG.')
flags.DEFINE_list('lengths', ['256', '1024'], 'Numbers of generated tokens.')
flags.DEFINE_string('variant', 'tiny', 'Model size (transformer_config variant).')
flags.DEFINE_integer('num_layers', 2, 'Decoder layers.')
flags.DEFINE_integer('d_model', 128, 'Model width.')
flags.DEFINE_integer('batch', 1, 'Batch size.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per setting (median reported).')
flags.DEFINE_integer('source_len', 512, 'EncoderDecoder source length.')
flags.DEFINE_integer('cross_tokens', 128, 'EncoderDecoder generated tokens.')
flags.DEFINE_integer('beam_size', 4, 'EncoderDecoder beam search width.')
flags.DEFINE_enum('suite', 'cache', ['cache', 'beam'], 'Which benchmark (see the docstring).')
flags.DEFINE_string('workdir', None, '--suite=beam: a trained seq2seq run.')
flags.DEFINE_string('texts', None, '--suite=beam: source sentences, one per line.')
flags.DEFINE_integer('sentences', 256, '--suite=beam: how many (a seeded sample; 0 = all).')
flags.DEFINE_integer('batch_size', 32, '--suite=beam: sentences per decoding batch.')
flags.DEFINE_string('baseline_rev', '92f50e9', '--suite=beam: git revision of the baseline.')
flags.DEFINE_string('worker', None, 'Internal: run one beam measurement (input|sorted).')
flags.DEFINE_string('worker_caps', '', "Internal: '' = the code's own decoding options, 'off' "
                    "= no output caps, 'A,B' = eval.max_len_a/b.")
flags.DEFINE_float('max_len_a', 1.0, '--suite=beam: the capped row ends outputs by '
                   'max_len_a * source tokens + max_len_b (the translation config\'s rule).')
flags.DEFINE_integer('max_len_b', 50, '--suite=beam: see max_len_a.')
flags.DEFINE_string('result', None, 'Internal: where the worker writes its JSON.')


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


def build_encoder_decoder():
  cfg = models.transformer_config(
      FLAGS.variant, vocab_size=512, dropout_rate=0.0, num_encoder_layers=FLAGS.num_layers,
      num_decoder_layers=FLAGS.num_layers, d_model=FLAGS.d_model, d_ff=4 * FLAGS.d_model,
      max_len=max(FLAGS.source_len, FLAGS.cross_tokens) + 2, tie_output=False,
      positional='rope')
  model = models.EncoderDecoder(cfg)
  x = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), x, x)['params'])
  params['decoder']['logits']['bias'] = params['decoder']['logits']['bias'].at[EOS_ID].set(-1e9)
  return model, params


def measure_cross() -> list[dict]:
  """Tokens/s of EncoderDecoder decoding, cross keys/values cached vs recomputed, for
  greedy search (whose state XLA can see is loop-invariant) and beam search (which
  reorders the state at every step)."""
  model, params = build_encoder_decoder()
  n = FLAGS.cross_tokens
  source = jax.random.randint(jax.random.key(1), (FLAGS.batch, FLAGS.source_len), 3, 512)
  rows = []
  for method, kwargs in [('greedy', {}), ('beam', dict(beam_size=FLAGS.beam_size))]:
    def run(m, method=method, kwargs=kwargs):
      return lambda: models.generate(m, params, inputs=source, max_decode_len=n,
                                     method=method, **kwargs)
    cached_fn, recompute_fn = run(model), run(decoding.RecomputedCrossDecoding(model))
    cached, recompute = tokens_per_second(cached_fn, n), tokens_per_second(recompute_fn, n)
    same = bool(jnp.all(cached_fn() == recompute_fn()))
    name = method if method == 'greedy' else f'beam {FLAGS.beam_size}'
    rows.append(dict(method=name, source_len=FLAGS.source_len, tokens=n,
                     cached_cross_tok_s=cached, recomputed_cross_tok_s=recompute,
                     speedup=cached / recompute, same_tokens=same))
  return rows


def plot(results: list[dict], cross: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
  xs = range(len(results))
  width = 0.38
  for offset, key, label in [(-width / 2, 'cache_tok_s', 'KV cache'),
                             (width / 2, 'recompute_tok_s', 'no cache (recompute prefix)')]:
    bars = ax.bar([x + offset for x in xs], [r[key] for r in results], width, label=label)
    ax.bar_label(bars, fmt='%.0f', fontsize=8)
  for x, r in enumerate(results):
    ax.annotate(f"{r['speedup']:.0f}x", (x, max(r['cache_tok_s'], r['recompute_tok_s'])),
                xytext=(0, 14), textcoords='offset points', ha='center', weight='bold')
  ax.set_xticks(list(xs), [str(r['tokens']) for r in results])
  ax.set(yscale='log', xlabel='generated tokens', ylabel='greedy decoding (tokens / s, log)',
         title=f'DecoderLM d={FLAGS.d_model} x {FLAGS.num_layers} layers, batch {FLAGS.batch}')
  low = min(min(r['cache_tok_s'], r['recompute_tok_s']) for r in results)
  ax.set_ylim(low / 3, ax.get_ylim()[1] * 4)  # log bars need an explicit floor
  ax.legend(loc='upper right', fontsize=8)
  for offset, key, label in [(-width / 2, 'cached_cross_tok_s', 'cached once (prefill)'),
                             (width / 2, 'recomputed_cross_tok_s', 'projected every step')]:
    bars = bx.bar([x + offset for x in range(len(cross))], [c[key] for c in cross], width,
                  label=label)
    bx.bar_label(bars, fmt='%.0f', fontsize=8)
  for x, c in enumerate(cross):
    bx.annotate(f"{c['speedup']:.2f}x", (x, max(c['cached_cross_tok_s'],
                                                c['recomputed_cross_tok_s'])),
                xytext=(0, 14), textcoords='offset points', ha='center', weight='bold')
  bx.set_xticks(list(range(len(cross))), [c['method'] for c in cross])
  bx.set_ylim(0, bx.get_ylim()[1] * 1.35)
  bx.set(xlabel='search', ylabel='tokens / s',
         title=f"EncoderDecoder cross-attention keys/values\nsource {cross[0]['source_len']}, "
               f"{cross[0]['tokens']} tokens")
  bx.legend(loc='upper right', fontsize=8)
  bx.title.set_fontsize(9)
  ax.title.set_fontsize(9)
  fig.suptitle(f'decoding speed ({jax.default_backend()})', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# --- --suite=beam -------------------------------------------------------------------------

def beam_worker(order: str) -> dict:
  """Decodes FLAGS.texts twice with whichever attn_jax is on the path; times both passes."""
  import attn_jax
  from attn_jax.experiment import inference
  run = inference.load_run(FLAGS.workdir)
  texts = pathlib.Path(FLAGS.texts).read_text(encoding='utf-8').splitlines()
  options = dict(method='beam', beam_size=FLAGS.beam_size)
  if FLAGS.worker_caps == 'off':  # today's code without caps: the baseline's outputs
    options.update(max_len_a=0.0, max_len_b=0)
  elif FLAGS.worker_caps:
    a, b = FLAGS.worker_caps.split(',')
    options.update(max_len_a=float(a), max_len_b=int(b))

  def one_pass():
    if order == 'sorted':  # decode.py's way: predict sorts the whole set by length
      return inference.predict(run, texts, batch_size=FLAGS.batch_size, **options)
    outputs = []  # input order: each batch as it comes, padded to its longest line
    for start in range(0, len(texts), FLAGS.batch_size):
      outputs += inference.predict(run, texts[start:start + FLAGS.batch_size],
                                   batch_size=FLAGS.batch_size, **options)
    return outputs

  times = []
  for _ in range(2):
    start = time.perf_counter()
    outputs = one_pass()
    times.append(time.perf_counter() - start)
  return dict(order=order, first_pass_s=times[0], steady_s=times[1], outputs=outputs,
              package=os.path.dirname(attn_jax.__file__))


def _run_worker(tree: str, order: str, texts_file: str, caps: str = '') -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    result = os.path.join(tmp, 'result.json')
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={order}', f'--result={result}',
           f'--workdir={os.path.abspath(FLAGS.workdir)}', f'--texts={texts_file}',
           f'--batch_size={FLAGS.batch_size}', f'--beam_size={FLAGS.beam_size}',
           f'--worker_caps={caps}']
    subprocess.run(cmd, env=env, cwd=tree, check=True)
    with open(result, encoding='utf-8') as f:
      out = json.load(f)
  if not out['package'].startswith(os.path.realpath(tree)):
    raise RuntimeError(f"the worker for {tree} imported attn_jax from {out['package']}")
  return out


def measure_beam() -> dict:
  """Today's beam search vs the code at --baseline_rev, on a trained run."""
  if not FLAGS.workdir or not FLAGS.texts:
    raise app.UsageError('--suite=beam needs --workdir (a trained seq2seq run) and --texts')
  texts = pathlib.Path(FLAGS.texts).read_text(encoding='utf-8').splitlines()
  if FLAGS.sentences and FLAGS.sentences < len(texts):
    texts = random.Random(0).sample(texts, FLAGS.sentences)
  repo = pathlib.Path(__file__).resolve().parent.parent
  with tempfile.TemporaryDirectory() as tmp:
    texts_file = os.path.join(tmp, 'texts.txt')
    pathlib.Path(texts_file).write_text('\n'.join(texts) + '\n', encoding='utf-8')
    baseline = os.path.join(tmp, 'baseline')
    subprocess.run(['git', '-C', str(repo), 'worktree', 'add', '--detach', baseline,
                    FLAGS.baseline_rev], check=True, capture_output=True)
    try:
      caps = f'{FLAGS.max_len_a:g},{FLAGS.max_len_b}'
      rows = {'baseline, input order': _run_worker(baseline, 'input', texts_file),
              'today, input order': _run_worker(str(repo), 'input', texts_file, 'off'),
              'today, sorted': _run_worker(str(repo), 'sorted', texts_file, 'off'),
              f'today, sorted, capped {caps}': _run_worker(str(repo), 'sorted', texts_file,
                                                           caps)}
    finally:
      subprocess.run(['git', '-C', str(repo), 'worktree', 'remove', '--force', baseline],
                     check=False, capture_output=True)
  reference = rows['baseline, input order']
  n = len(texts)
  summary = []
  for name, r in rows.items():
    summary.append(dict(
        path=name, sentences=n, first_pass_s=r['first_pass_s'], steady_s=r['steady_s'],
        first_pass_sent_s=n / r['first_pass_s'], steady_sent_s=n / r['steady_s'],
        speedup_first_pass=reference['first_pass_s'] / r['first_pass_s'],
        speedup_steady=reference['steady_s'] / r['steady_s'],
        same_outputs=r['outputs'] == reference['outputs'],
        outputs_differing=sum(a != b for a, b in zip(r['outputs'], reference['outputs'],
                                                     strict=True))))
  return dict(workdir=str(FLAGS.workdir), baseline_rev=FLAGS.baseline_rev,
              max_len_a=FLAGS.max_len_a, max_len_b=FLAGS.max_len_b,
              beam_size=FLAGS.beam_size, batch_size=FLAGS.batch_size, rows=summary)


def main_beam() -> None:
  result = measure_beam()
  print(f"beam {result['beam_size']} search, {result['rows'][0]['sentences']} sentences, "
        f"batches of {result['batch_size']}, baseline = {result['baseline_rev']}, "
        f'backend={jax.default_backend()}')
  print(f"{'path':>32} {'1st pass sent/s':>16} {'steady sent/s':>14} {'x 1st':>7} "
        f"{'x steady':>9} {'differ':>7}")
  for r in result['rows']:
    print(f"{r['path']:>32} {r['first_pass_sent_s']:>16.2f} {r['steady_sent_s']:>14.2f} "
          f"{r['speedup_first_pass']:>6.2f}x {r['speedup_steady']:>8.2f}x "
          f"{r['outputs_differing']:>7d}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'beam_speed.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(matmul=True), **result), f, indent=2)


def main(argv):
  del argv
  if FLAGS.worker:
    with open(FLAGS.result, 'w', encoding='utf-8') as f:
      json.dump(beam_worker(FLAGS.worker), f)
    return
  if FLAGS.suite == 'beam':
    main_beam()
    return
  results = [measure(int(x)) for x in FLAGS.lengths]
  cross = measure_cross()
  print(f'greedy decoding, d={FLAGS.d_model} x {FLAGS.num_layers} layers, batch '
        f'{FLAGS.batch}, backend={jax.default_backend()}')
  print(f"DecoderLM {'tokens':>7} {'cache tok/s':>12} {'recompute tok/s':>16} "
        f"{'speed-up':>9} {'same':>5}")
  for r in results:
    print(f"{'':9} {r['tokens']:>7} {r['cache_tok_s']:>12.0f} {r['recompute_tok_s']:>16.0f} "
          f"{r['speedup']:>8.1f}x {str(r['same_tokens']):>5}")
  print(f"EncoderDecoder, source {cross[0]['source_len']}, {cross[0]['tokens']} tokens: "
        'cross-attention keys/values')
  print(f"{'search':>9} {'cached tok/s':>13} {'per-step tok/s':>15} {'speed-up':>9} {'same':>5}")
  for c in cross:
    print(f"{c['method']:>9} {c['cached_cross_tok_s']:>13.0f} "
          f"{c['recomputed_cross_tok_s']:>15.0f} {c['speedup']:>8.2f}x "
          f"{str(c['same_tokens']):>5}")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'decode_speed.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(matmul=True),
                   config=dict(d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                               batch=FLAGS.batch, repeats=FLAGS.repeats,
                               backend=jax.default_backend()),
                   decoder_lm=results, encoder_decoder_cross=cross), f, indent=2)
  plot(results, cross, os.path.join(FLAGS.output_dir, 'decode_speed.png'))


if __name__ == '__main__':
  app.run(main)
