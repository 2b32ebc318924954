r"""Context extension study: train configs/context_extension.py's sweep (RoPE, ALiBi, NoPE x
3 seeds; resumable), score every run on held-out rows 1-8x its training length (RoPE also
under each frequency scaling), and write context_extension.{json,md,png}.

  apt-get install diatheke sword-text-kjv sword-text-sparv
  python experiments/bible_corpus.py --out data/bible
  PYTHONPATH=$PWD python experiments/context_extension.py --workdir runs/context \
      --out experiments/figures

`--arg=smoke` appends to every run's config argument (a seconds-long check, on a small text
that ships with the tests, in its own --workdir); `--positionals`/`--seeds` select part of
the sweep; `--eval_only` scores and redraws the finished runs without training.
"""

from __future__ import annotations

import logging
import pathlib

from absl import app, flags

from attn_jax.experiment import cli, context_study, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'configs/context_extension.py'
_WORKDIR = flags.DEFINE_string('workdir', 'runs/context', 'Base workdir: <base>/<run>.')
_OUT = flags.DEFINE_string('out', None, 'Where the JSON/table/figure go (default: --workdir).')
_ARG = flags.DEFINE_string('arg', '', "Appended to every run's config argument, e.g. smoke.")
_POSITIONALS = flags.DEFINE_list('positionals', None, 'Positionals to run (default: all).')
_SEEDS = flags.DEFINE_list('seeds', None, 'Seeds to run (default: the config\'s SEEDS).')
_EVAL_ONLY = flags.DEFINE_bool('eval_only', False, 'Score and redraw finished runs only.')


def _runs(module) -> list[sweep.Run]:
  positionals = _POSITIONALS.value or list(module.POSITIONALS)
  seeds = [int(s) for s in (_SEEDS.value or module.SEEDS)]
  extra = f',{_ARG.value}' if _ARG.value else ''
  entries = [{'arg': f'positional={p},seed={s}{extra}', 'name': module.run_name(p, s)}
             for p in positionals for s in seeds]
  return sweep.parse_sweep(entries, get_config=module.get_config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_path = str(ROOT / CONFIG)
  module = sweep.load_config_module(config_path)
  runs = _runs(module)
  base = pathlib.Path(_WORKDIR.value)
  if not _EVAL_ONLY.value:
    statuses = sweep.run_sweep(runs, config_path=config_path, base_workdir=base,
                               train_script=str(ROOT / sweep.DEFAULT_TRAIN_SCRIPT))
    failed = [name for name, status in statuses.items() if status != 'done']
    if failed:
      logging.error('unfinished or failed runs, left out: %s', failed)
  train_length = int(module.get_config(runs[0].arg).data.max_length)
  lengths = [train_length * f for f in module.EVAL_FACTORS]
  results = {}
  for run in runs:
    workdir = base / run.name
    if sweep.run_status(workdir) != 'done':
      continue
    config = module.get_config(run.arg)
    positional = 'nope' if config.model.positional == 'none' else config.model.positional
    results[run.name] = (positional, int(config.train.seed),
                         context_study.evaluate_run(workdir, lengths))
  if not results:
    raise app.UsageError(f'no finished run under {base}')
  paths = context_study.write_outputs(
      results, _OUT.value or base, lengths=lengths, train_length=train_length,
      settings={'config': CONFIG, 'arg': _ARG.value, 'runs': sorted(results)})
  print(paths['md'].read_text())


if __name__ == '__main__':
  cli.run(main)
