r"""Learning curves of one or more runs, one panel per metric, one line per run, as a PNG.

  python experiments/plot_metrics.py --workdirs /tmp/sweep/a,/tmp/sweep/b \
      --keys valid/accuracy,train/loss --out /tmp/sweep/curves.png

Each workdir's metrics.jsonl is read (a .jsonl file may be given instead of a workdir); lines
are labelled with the workdir's name (its full path where two names clash) or --labels.
"""

from __future__ import annotations

import pathlib

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


def run_labels(workdirs: list[str], labels: list[str] | None) -> dict[str, str]:
  """`{label: workdir}`: the given labels, else the workdir names (full paths if they clash)."""
  if labels is not None:
    if len(labels) != len(workdirs):
      raise ValueError(f'--labels has {len(labels)} names for {len(workdirs)} --workdirs')
    names = labels
  else:
    names = [pathlib.Path(w).name or w for w in workdirs]
    if len(set(names)) < len(names):
      names = list(workdirs)
  if len(set(names)) < len(names):
    raise ValueError(f'labels must be distinct, got {names}')
  return dict(zip(names, workdirs, strict=True))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runs = run_labels(_WORKDIRS.value, _LABELS.value)
  path = plots.plot_curves(runs, _KEYS.value, _OUT.value, x=_X.value, logy=_LOGY.value)
  logging.info('wrote %s', path)
  print(path)


if __name__ == '__main__':
  app.run(main)
