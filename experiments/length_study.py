r"""Length study (Bahdanau et al. 2014, Figure 2): train models on lengths 1..L, score 1..2L.

  PYTHONPATH=$PWD python experiments/length_study.py --workdir runs/length_study \
      --out experiments/figures

trains (or resumes, or reuses) `rnn_noattn`, `rnn` and `transformer` of
configs/length_study.py in `--workdir/<model>`, decodes each model's test split (lengths
1..2L) greedily and writes length_study.{json,md,csv,png} to `--out` (default: --workdir).
`--models=rnn` runs one model only (e.g. one per job); a later run with all models reuses
the finished workdirs and their cached scores. `--arg` is passed to every model's config
(e.g. `--arg=train_max=10,task=copy`, or `smoke` for a seconds-long check). The exact
per-model commands are printed at the start.
"""

from __future__ import annotations

import ast
import logging
import pathlib
import shlex
import sys

from absl import app, flags

from attn_jax.experiment import length_study, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = flags.DEFINE_string('config', 'configs/length_study.py',
                              'The study config file (get_config, MODELS, LABELS); a relative '
                              'path not found here is taken from the repository root.')
_ARG = flags.DEFINE_string('arg', '', 'Config arg for every model, e.g. train_max=10.')
_MODELS = flags.DEFINE_list('models', None, 'Models to run (default: the config\'s MODELS).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/length_study', 'Base workdir: <base>/<model>.')
_OUT = flags.DEFINE_string('out', None, 'Where the JSON/table/plot go (default: --workdir).')
_SET = flags.DEFINE_multi_string('set', [], 'field=value for every model\'s config, e.g. '
                                 '--set=train.num_steps=3000 (typed like the field).')


def override(config, item: str) -> None:
  """Applies `field.path=value` to the locked `config`; the value is a Python literal (else
  a string) and must fit the field's type; an unknown field raises."""
  field, sep, text = item.partition('=')
  if not sep:
    raise app.UsageError(f'--set {item!r} must look like field.name=value')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  *parents, leaf = field.strip().split('.')
  node = config
  for part in parents:
    node = node[part]
  if leaf not in node:
    raise app.UsageError(f'--set {item!r}: the config has no field {field!r}')
  node[leaf] = value


def model_arg(arg: str, model: str) -> str:
  return ','.join(p for p in (arg.strip(), f'model={model}') if p)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  path = pathlib.Path(_CONFIG.value)
  module = sweep.load_config_module(path if path.exists() else ROOT / path)
  models = _MODELS.value or list(module.MODELS)
  unknown = sorted(set(models) - set(module.MODELS))
  if unknown:
    raise app.UsageError(f'--models {unknown} are not in {list(module.MODELS)}')
  configs = {m: module.get_config(model_arg(_ARG.value, m)) for m in models}  # fail fast
  for config in configs.values():
    for item in _SET.value:
      override(config, item)
  base = pathlib.Path(_WORKDIR.value)
  config_path = shlex.quote(_CONFIG.value)
  arg_flag = [f'--arg={shlex.quote(_ARG.value)}'] if _ARG.value else []
  arg_flag += [f'--set={shlex.quote(item)}' for item in _SET.value]
  train_flags = ''.join(f' --config.{shlex.quote(item)}' for item in _SET.value)
  commands = {m: ' '.join(['python experiments/length_study.py', f'--config={config_path}',
                           *arg_flag, f'--models={m}', f'--workdir={base}']) for m in models}
  print('Per model (the study trains with the same config as the train.py line):')
  for m in models:
    print(f'  {commands[m]}\n    = python experiments/train.py '
          f'--config={config_path}:{model_arg(_ARG.value, m)} --workdir={base / m}'
          f'{train_flags}')
  sys.stdout.flush()
  results = {m: length_study.run_model(configs[m], base / m) for m in models}
  for m, r in results.items():
    logging.info('%s: in-range exact %.3f, longer exact %.3f', m,
                 r['in_range']['sequence_accuracy'], r['out_of_range']['sequence_accuracy'])
  labels = getattr(module, 'LABELS', {})
  lo, hi = results[models[0]]['train_length']
  title = (f'{configs[models[0]].data.name}: trained on lengths {lo}-{hi}, '
           f'tested on {"-".join(map(str, results[models[0]]["test_length"]))}')
  paths = length_study.write_outputs(results, _OUT.value or base, labels=labels,
                                     commands=list(commands.values()), title=title)
  print((paths['md']).read_text())
  for p in paths.values():
    print(p)


if __name__ == '__main__':
  app.run(main)
