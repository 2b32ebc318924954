r"""Applies a trained run to new text: translate, classify, or continue (LM), one line each.

  PYTHONPATH=$PWD python experiments/decode.py --workdir /tmp/attn_jax/reverse \
      --input test.src --output test.hyp --references test.ref      # prints accuracy
  echo 'Der Arzt ruft.' | python experiments/decode.py --workdir /tmp/attn_jax/my_mt \
      --method=beam --beam_size=5                                    # stdin -> stdout
  python experiments/decode.py --workdir /tmp/attn_jax/shakespeare --input prompts.txt \
      --method=sample --temperature=0.8 --top_k=40 --max_decode_len=200
  python experiments/decode.py --workdir /tmp/attn_jax/my_mt --average_last=5 --method=beam \
      --input test.src --output test.hyp --references test.ref

Loads config.json, the tokenizers and the latest (or `--checkpoint=best`) checkpoint from the
workdir; `--average_last=N` decodes with the mean of the params of the last N checkpoints kept
(Vaswani et al. 2017; train with `--config.train.keep_checkpoints` >= N). With `--references`
(one line per input) it prints the score: BLEU and chrF (sacrebleu, detokenized) for translation,
exact-match accuracy for classification and algorithmic tasks.
"""

from __future__ import annotations

from attn_jax.experiment import allocator

allocator.reexec_with_tcmalloc()  # ATTN_JAX_ALLOCATOR=tcmalloc; before JAX loads

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from attn_jax.experiment import cli, inference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A workdir written by experiments/train.py.')
flags.DEFINE_string('input', '-', "Input file, one example per line ('-' = stdin).")
flags.DEFINE_string('output', '-', "Output file ('-' = stdout).")
flags.DEFINE_string('references', None, 'Reference outputs, one per line, to score against.')
flags.DEFINE_enum('checkpoint', 'latest', inference.CHECKPOINTS, 'Which checkpoint to load.')
flags.DEFINE_integer('average_last', 0, 'Average the params of the last N checkpoints kept '
                     '(0 or 1 = off; not with --checkpoint=best).')
flags.DEFINE_enum('method', None, ['greedy', 'sample', 'beam'], 'Default: the config\'s.')
flags.DEFINE_integer('beam_size', None, 'Beam width (method=beam).')
flags.DEFINE_float('length_penalty', None, 'GNMT length-penalty alpha (method=beam).')
flags.DEFINE_float('temperature', None, 'Sampling temperature (method=sample).')
flags.DEFINE_integer('top_k', None, 'Sample from the k most likely tokens (0 = off).')
flags.DEFINE_float('top_p', None, 'Nucleus sampling mass (1.0 = off).')
flags.DEFINE_integer('max_decode_len', 0, 'Generated tokens; 0 = the run\'s target length.')
flags.DEFINE_float('max_len_a', None, 'seq2seq: outputs end by max_len_a * source tokens + '
                   'max_len_b (both 0 = max_decode_len only). Default: the run\'s config.')
flags.DEFINE_integer('max_len_b', None, 'See max_len_a.')
flags.DEFINE_integer('batch_size', 32, 'Examples per decoding batch.')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flag_as_required('workdir')


def _read_lines(path: str) -> list[str]:
  if path == '-':
    return [line.rstrip('\n') for line in sys.stdin]
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run = inference.load_run(FLAGS.workdir, FLAGS.checkpoint, average_last=FLAGS.average_last)
  texts = _read_lines(FLAGS.input)
  if not texts:
    raise app.UsageError(f'no input lines in {FLAGS.input!r}')
  outputs = inference.predict(
      run, texts, batch_size=FLAGS.batch_size, max_decode_len=FLAGS.max_decode_len,
      seed=FLAGS.seed, method=FLAGS.method, beam_size=FLAGS.beam_size,
      length_penalty=FLAGS.length_penalty, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, max_len_a=FLAGS.max_len_a, max_len_b=FLAGS.max_len_b)
  text = '\n'.join(outputs) + '\n'
  if FLAGS.output == '-':
    sys.stdout.write(text)
  else:
    with open(FLAGS.output, 'w', encoding='utf-8') as f:
      f.write(text)
  if FLAGS.references:
    scores = inference.score(run, outputs, _read_lines(FLAGS.references))
    averaged = {'averaged_steps': list(run.averaged_steps)} if run.averaged_steps else {}
    print(json.dumps({'step': run.step, **averaged, 'num_examples': len(outputs), **scores}))


if __name__ == '__main__':
  cli.run(main)
