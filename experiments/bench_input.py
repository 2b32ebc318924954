r"""Input pipeline throughput (tokenize + pack/bucket + batch) vs. a training step's appetite.

Builds a parallel text corpus (synthetic Zipfian sentences, or --corpus PREFIX with PREFIX.src /
PREFIX.tgt), converts it once through attn_jax.data (local corpus -> TFDS -> grain), then
measures for each batching mode the examples/s and tokens/s the training iterator delivers
(median of --repeats runs of --num_batches batches). If attn_jax.models is importable it also
times a jitted train step (forward, backward, Adam) of the Transformer `--model_variant` on the
same batch shapes and prints how many times faster the pipeline is than training consumes.

    PYTHONPATH=$PWD python experiments/bench_input.py --output_dir=/tmp/bench_input

Writes results.json and throughput.png under --output_dir.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np
from absl import app, flags, logging

from attn_jax import data
from attn_jax.experiment import provenance

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', None, 'Where results.json and throughput.png go.')
flags.DEFINE_string('corpus', '', 'Optional PREFIX of PREFIX.src / PREFIX.tgt line-aligned files.')
flags.DEFINE_integer('num_lines', 20_000, 'Synthetic corpus size (sentence pairs).')
flags.DEFINE_string('tokenizer', 'sentencepiece', 'byte | char | sentencepiece.')
flags.DEFINE_integer('vocab_size', 4_000, 'SentencePiece vocabulary size.')
flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
flags.DEFINE_integer('max_length', 128, 'Max tokens per sequence (incl. EOS).')
flags.DEFINE_list('modes', ['pad', 'bucket', 'pack'], 'Batching modes to compare.')
flags.DEFINE_integer('num_batches', 100, 'Batches per timed run.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per mode (median reported).')
flags.DEFINE_integer('num_workers', 0, 'grain worker processes.')
flags.DEFINE_string('model_variant', 'small', 'Transformer variant for the train-step rate.')
flags.DEFINE_integer('train_steps', 5, 'Timed train steps (after compilation).')
flags.mark_flag_as_required('output_dir')


def synthetic_corpus(prefix: str, num_lines: int, seed: int = 0) -> str:
  """Zipfian 'words' over a 5,000-word lexicon, 4-40 words a sentence; target = words reversed."""
  rng = np.random.default_rng(seed)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  lexicon = [''.join(rng.choice(letters, rng.integers(2, 10))) for _ in range(5_000)]
  probs = 1.0 / np.arange(1, len(lexicon) + 1)
  probs /= probs.sum()
  with open(prefix + '.src', 'w') as src, open(prefix + '.tgt', 'w') as tgt:
    for _ in range(num_lines):
      words = [lexicon[i] for i in rng.choice(len(lexicon), rng.integers(4, 41), p=probs)]
      src.write(' '.join(words) + '\n')
      tgt.write(' '.join(w[::-1] for w in reversed(words)) + '\n')
  return prefix


def make_config(prefix: str, mode: str):
  c = data.default_config('local')
  c.local.task, c.local.train = 'seq2seq', prefix
  c.local.source_suffix, c.local.target_suffix = 'src', 'tgt'
  c.tokenizer.kind, c.tokenizer.vocab_size = FLAGS.tokenizer, FLAGS.vocab_size
  c.max_length, c.batch_size, c.batching = FLAGS.max_length, FLAGS.batch_size, mode
  c.num_workers, c.eval_splits = FLAGS.num_workers, ''
  return c


def count(batch) -> tuple[int, int]:
  """(examples, non-pad tokens) in a batch, packed or not."""
  if 'inputs_segmentation' in batch:
    examples = int(batch['inputs_segmentation'].max(-1).sum())
  else:
    examples = int((batch['inputs'] != 0).any(-1).sum())
  tokens = int((batch['inputs'] != 0).sum() + (batch['targets'] != 0).sum())
  return examples, tokens


def time_pipeline(bundle) -> dict:
  rates, token_rates = [], []
  last = None
  for _ in range(FLAGS.repeats):
    it = iter(bundle.train_dataset)
    next(it)  # thread start-up is not throughput
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(FLAGS.num_batches):
      last = next(it)
      e, t = count(last)
      examples, tokens = examples + e, tokens + t
    elapsed = time.perf_counter() - start
    rates.append(examples / elapsed)
    token_rates.append(tokens / elapsed)
    if hasattr(it, 'close'):
      it.close()
  return {'examples_per_s': statistics.median(rates),
          'tokens_per_s': statistics.median(token_rates),
          'examples_per_batch': count(last)[0], 'batch_shape': list(last['inputs'].shape),
          'target_shape': list(last['targets'].shape)}, last


def time_train_step(batch, vocab_size: int) -> dict | None:
  """Examples/s a jitted Transformer train step consumes on `batch`; None without models."""
  try:
    import jax
    import jax.numpy as jnp
    import optax

    from attn_jax import models
  except ImportError as e:
    logging.warning('attn_jax.models not importable (%s): train-step comparison skipped.', e)
    return None
  cfg = models.transformer_config(FLAGS.model_variant, vocab_size=vocab_size,
                                  max_len=FLAGS.max_length)
  model = models.EncoderDecoder(cfg)
  kwargs = {}
  if 'inputs_segmentation' in batch:
    kwargs = {k: jnp.asarray(batch[b]) for k, b in (
        ('inputs_segmentation', 'inputs_segmentation'),
        ('targets_segmentation', 'targets_segmentation'),
        ('inputs_positions', 'inputs_position'), ('targets_positions', 'targets_position'))}
  inputs, targets = jnp.asarray(batch['inputs']), jnp.asarray(batch['targets'])
  params = model.init(jax.random.PRNGKey(0), inputs, targets, **kwargs)['params']
  opt = optax.adam(1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, inputs, targets, train=True, rngs={'dropout': rng},
                           **kwargs)
      w = (targets != 0).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return (ce * w).sum() / w.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = jax.random.PRNGKey(1)
  params, opt_state, loss = step(params, opt_state, rng)  # compile
  loss.block_until_ready()
  times = []
  for _ in range(FLAGS.train_steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, rng)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {'step_s': step_s, 'examples_per_s': count(batch)[0] / step_s,
          'device': str(jax.devices()[0].platform)}


def main(argv):
  del argv
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  data_dir = os.path.join(FLAGS.output_dir, 'tfds')
  prefix = FLAGS.corpus or synthetic_corpus(os.path.join(FLAGS.output_dir, 'corpus'),
                                            FLAGS.num_lines)
  results = {'flags': {k: FLAGS[k].value for k in (
      'corpus', 'num_lines', 'tokenizer', 'vocab_size', 'batch_size', 'max_length',
      'num_batches', 'repeats', 'num_workers', 'model_variant')}, 'modes': {}}
  for mode in FLAGS.modes:
    start = time.perf_counter()
    bundle = data.make_datasets(make_config(prefix, mode), data_dir=data_dir, seed=0)
    setup = time.perf_counter() - start
    pipe, last = time_pipeline(bundle)
    pipe['setup_s'] = setup
    train = time_train_step(last, bundle.meta['vocab_size'])
    pipe['train'] = train
    if train:
      pipe['pipeline_over_train'] = pipe['examples_per_s'] / train['examples_per_s']
    results['modes'][mode] = pipe

  header = (f"{'mode':8s} {'batch shape':>12s} {'ex/batch':>8s} {'pipeline ex/s':>14s} "
            f"{'tokens/s':>10s} {'train ex/s':>11s} {'pipeline/train':>15s}")
  print(header)
  print('-' * len(header))
  for mode, r in results['modes'].items():
    train = r['train']
    train_rate = f"{train['examples_per_s']:.1f}" if train else 'skipped'
    ratio = f"{r['pipeline_over_train']:.1f}x" if train else 'n/a'
    shape = 'x'.join(map(str, r['batch_shape']))
    print(f"{mode:8s} {shape:>12s} {r['examples_per_batch']:8d} {r['examples_per_s']:14.0f} "
          f"{r['tokens_per_s']:10.0f} {train_rate:>11s} {ratio:>15s}")
  base = results['modes'].get('pad')
  if base:
    for mode, r in results['modes'].items():
      print(f'{mode} / pad examples/s ratio: {r["examples_per_s"] / base["examples_per_s"]:.2f}')
  with open(os.path.join(FLAGS.output_dir, 'results.json'), 'w') as f:
    json.dump(dict(provenance=provenance.collect(), **results), f, indent=1)
  plot(results, os.path.join(FLAGS.output_dir, 'throughput.png'))


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  modes = list(results['modes'])
  pipe = [results['modes'][m]['examples_per_s'] for m in modes]
  train = [(results['modes'][m]['train'] or {}).get('examples_per_s', 0) for m in modes]
  x = np.arange(len(modes))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(x - 0.2, pipe, 0.4, label='input pipeline')
  ax.bar(x + 0.2, train, 0.4, label=f'train step ({FLAGS.model_variant})')
  ax.set_xticks(x, modes)
  ax.set_yscale('log')
  ax.set_ylabel('examples / s')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  app.run(main)
