r"""Attention figures of trained algorithmic-task runs (e.g. the length study's reverse models).

  PYTHONPATH=$PWD python experiments/attention_maps.py \
      --workdirs runs/length_study/transformer,runs/length_study/rnn --out experiments/figures

For a Transformer workdir: `attention_maps_<name>.png`, every head of the encoder
self-attention, decoder self-attention and cross-attention of each layer, for one example of
`--lengths[0]` symbols, and `attention_cross_<name>.png`, the last layer's cross-attention for
one example of each further length (e.g. beyond the training lengths). For an RNN with
attention: `attention_alignment_<name>.png`, the additive (Bahdanau) alignment of one example
of each of `--lengths` (the anti-diagonal of reverse, the diagonal of copy). `<name>` is the
workdir's name. Examples come from the task's own generator with `--seed` (not from the run's
data), weights are teacher-forced on the reference target, and each title says whether greedy
decoding of the same input is exactly right.
"""

from __future__ import annotations

import pathlib
import random

from absl import app, flags, logging

from attn_jax.data import algorithmic
from attn_jax.experiment import evaluation, inference, plots
from attn_jax.models import names
from attn_jax.tokens import EOS_ID

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Trained algorithmic-task workdirs.',
                              required=True)
_OUT = flags.DEFINE_string('out', 'experiments/figures', 'Directory for the PNGs.')
_LENGTHS = flags.DEFINE_list('lengths', ['12', '30'], 'Source lengths (symbols) of the examples.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the generated examples.')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'latest', inference.CHECKPOINTS, 'Checkpoint.')


def example(run, length: int, seed: int) -> dict[str, str]:
  """One generated example of the run's task with exactly `length` symbols."""
  alg = run.config.data.algorithmic
  rng = random.Random(f'attention_maps/{seed}/{length}')
  return algorithmic.make_example(run.config.data.name, rng, min_length=length,
                                  max_length=length, num_symbols=alg.num_symbols)


def rows_for(run, ex: dict[str, str]) -> tuple[list[dict], bool]:
  """Labelled attention rows of one example, and whether greedy decoding gets it right."""
  ids = {role: list(run.tokenizers[role].encode(ex[role])) + [EOS_ID]
         for role in ('inputs', 'targets')}
  panels = evaluation.attention_panels(run.task, run.params, ids['inputs'], ids['targets'],
                                       run.tokenizers)
  correct = inference.predict(run, [ex['inputs']], method='greedy')[0].strip() == ex['targets']
  for p in panels:
    p['name'] = (f"{p['kind'].replace(names.RNN_ATTENTION, 'additive attention')} layer "
                 f"{p['layer']}")
  return panels, correct


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  lengths = [int(n) for n in _LENGTHS.value]
  out = pathlib.Path(_OUT.value)
  for workdir in _WORKDIRS.value:
    run = inference.load_run(workdir, _CHECKPOINT.value)
    name = pathlib.Path(workdir).resolve().name
    task, (lo, hi) = run.config.data.name, run.config.data.algorithmic.train_length
    first, first_correct = rows_for(run, example(run, lengths[0], _SEED.value))
    if not first:
      raise app.UsageError(f'{workdir}: the model captures no attention (an RNN with '
                           'attention=none)')
    if first[0]['kind'] == names.RNN_ATTENTION:  # one alignment per example, in one figure
      rows = []
      for i, n in enumerate(lengths):
        panels, correct = ((first, first_correct) if i == 0
                           else rows_for(run, example(run, n, _SEED.value)))
        for p in panels:
          p['name'] = (f'{n} symbols ({"in" if n <= hi else "beyond"} training range), '
                       f'greedy output {"correct" if correct else "wrong"}')
        rows += panels
      figures = [(out / f'attention_alignment_{name}.png', rows,
                  f'{task}, RNN additive attention (trained on lengths {lo}-{hi}, '
                  f'step {run.step})', None)]
    else:
      rows, correct = first, first_correct
      figures = [(out / f'attention_maps_{name}.png', rows,
                  f'{task}, Transformer, one example of {lengths[0]} symbols (trained on '
                  f'{lo}-{hi}, step {run.step}); greedy output '
                  f'{"correct" if correct else "wrong"}', None)]
      cross = []
      for n in lengths[1:]:  # the last layer's cross-attention on the longer examples
        panels, correct = rows_for(run, example(run, n, _SEED.value))
        last = [p for p in panels if p['kind'] == names.CROSS][-1]
        last['name'] = (f"{n} symbols ({'in' if n <= hi else 'beyond'} training range), "
                        f"output {'correct' if correct else 'wrong'}")
        cross.append(last)
      if cross:
        figures.append((out / f'attention_cross_{name}.png', cross,
                        f"{task}, Transformer cross-attention of the last layer "
                        f"({cross[0]['layer']}), trained on lengths {lo}-{hi}, step {run.step}",
                        2))  # long examples: two heads side by side
    for path, rows, title, max_cols in figures:
      plots.plot_attention_grid(rows, path, title=title, max_cols=max_cols)
      logging.info('wrote %s', path)
      print(path)


if __name__ == '__main__':
  app.run(main)
