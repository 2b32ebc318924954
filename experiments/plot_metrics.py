r"""Learning curves of one or more runs, one panel per metric, one line per run, as a PNG.

  python experiments/plot_metrics.py --workdirs /tmp/sweep/a,/tmp/sweep/b \
      --keys valid/accuracy,train/loss --out /tmp/sweep/curves.png

Each workdir's metrics.jsonl is read (a .jsonl file may be given instead of a workdir); lines
are labelled with the workdir's name (its full path where two names clash) or --labels.
"""

from __future__ import annotations

from absl import app, flags, logging

from attn_jax.experiment import plots

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'run directories (or .jsonl files)',
                              required=True)
_KEYS = flags.DEFINE_list('keys', None, 'metric names, e.g. valid/accuracy,train/loss',
                          required=True)
_OUT = flags.DEFINE_string('out', None, 'output PNG path', required=True)
_LABELS = flags.DEFINE_list('labels', None, 'legend labels, one per workdir')
_X = flags.DEFINE_enum('x', 'step', plots.X_KEYS, 'x axis: training step or wall time')
_LOGY = flags.DEFINE_bool('logy', False, 'log-scale y axes')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runs = plots.run_labels(_WORKDIRS.value, _LABELS.value)
  path = plots.plot_curves(runs, _KEYS.value, _OUT.value, x=_X.value, logy=_LOGY.value)
  logging.info('wrote %s', path)
  print(path)


if __name__ == '__main__':
  app.run(main)
