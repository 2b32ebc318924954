r"""Records finished runs as one figure file: each run's config argument, steps, wall-clock
minutes and final eval metrics, with the provenance record (the code's revision now, which is
the revision the runs trained with when they are recorded from a checkout of it).

  python experiments/record_runs.py --workdirs runs/digits_a,runs/digits_b \
      --out experiments/figures/image_classification.json
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from attn_jax.experiment import cli, provenance
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.train.metrics import read_metrics

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Finished runs (with DONE).', required=True)
_OUT = flags.DEFINE_string('out', None, 'The JSON file to write.', required=True)


def record(workdir: pathlib.Path) -> dict:
  """One finished run: name, config argument and model section, steps, minutes, final metrics."""
  if not workdir_lib.is_finished(workdir):
    raise app.UsageError(f'{workdir} has not finished (no DONE)')
  config = workdir_lib.read_json(workdir / workdir_lib.CONFIG_FILE)
  done = workdir_lib.read_json(workdir / workdir_lib.DONE_FILE)
  times = [r['time'] for r in read_metrics(workdir) if 'time' in r]
  return {'name': workdir.name, 'arg': config.get('arg', ''), 'seed': config['train']['seed'],
          'model': config['model'], 'steps': done['step'],
          'minutes': (max(times) - min(times)) / 60 if times else None, 'final': done['final']}


def main(argv):
  del argv
  runs = [record(pathlib.Path(w)) for w in _WORKDIRS.value]
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'provenance': provenance.collect(matmul=True), 'runs': runs},
                            indent=1) + '\n')
  print(f'recorded {len(runs)} run(s) in {out}')


if __name__ == '__main__':
  cli.run(main)
