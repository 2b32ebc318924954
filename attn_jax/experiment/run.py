"""`train_and_evaluate(config, workdir)`: data + model + task + evaluators -> `train_loop`.

    config = experiment.config.base_config('reverse', 'encoder_decoder', 'tiny')
    train_and_evaluate(config, '/tmp/run')

It writes the workdir described in `attn_jax.experiment.workdir` (read by
`experiments/decode.py`, `inference.load_run` and the sweep runner).

The config is validated once, by `validate_config`, before any data is generated or anything
compiles; a bad value raises ValueError naming the field and the allowed values.

A re-run on a workdir compares its config with the saved config.json. If the checkpoint holds a
train state of other shapes (a changed model size, optimizer...), it stops with a
`StateMismatchError` that names the changed fields, before anything is written (config.json
included); `config.train.on_mismatch='restart'` moves the old run aside instead. Changes that
keep the state's shapes resume, with a warning and a record in config_changes.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections

from attn_jax import data as data_lib
from attn_jax.experiment import evaluation, evaluators, tasks
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.experiment.config import SECTIONS, saved_config
from attn_jax.models.kinds import model_kind
from attn_jax.train import loop, metrics, optim, parallel
from attn_jax.train.checkpoint import StateMismatchError

ABSENT = '<absent>'  # In config_changes: a field one config lacks (one added to the code since).


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section once, with the rules of the layer that reads it; raises ValueError
  naming the field before anything expensive."""
  missing = [s for s in SECTIONS if s not in config]
  if missing:
    raise ValueError(f'config is missing section(s) {missing}; start from '
                     'attn_jax.experiment.config.base_config')
  loop.validate_config(config)  # train / parallel fields
  optim.make_optimizer(loop.optim_config(config), loop.schedule_clock(config))  # no arrays
  data_lib.validate_config(config.data, jax.process_count())
  meta = {'vocab_size': 16, 'num_classes': 2, **data_lib.static_meta(config.data)}
  task = meta['task']
  tasks.build_model_config(config.model.to_dict(), meta)
  if config.data.batching == 'pack' and not model_kind(config.model.kind).packs:
    raise ValueError(f"config.data.batching='pack' is not supported by model.kind="
                     f"{config.model.kind!r} (it has no segment ids); use 'bucket' or 'pad'")
  # config.train.best_mode '' = the best metric's declared direction: it must have one.
  metrics.best_mode(config.train,
                    tasks.task_class(config.model.kind, task).metric_directions())
  if not 0.0 <= config.loss.label_smoothing < 1.0:
    raise ValueError(f'config.loss.label_smoothing={config.loss.label_smoothing} must be in '
                     '[0, 1)')
  evaluation.validate_config(config)
  mode = config.parallel.mode
  if mode in ('pmap', 'sharded'):
    if mode == 'pmap':
      devices, rows_of = jax.local_device_count(), lambda n: n // jax.process_count()
    else:
      mesh = parallel.make_mesh(config.parallel.mesh.to_dict())  # validates the axis sizes
      devices, rows_of = mesh.shape['data'] * mesh.shape['fsdp'], lambda n: n
    names = ('eval_batch_size',) if config.data.max_tokens else ('batch_size', 'eval_batch_size')
    for name in names:  # Token batches (data.max_tokens) get their rows from _row_multiple.
      if rows_of(config.data[name]) % devices:
        raise ValueError(f'config.data.{name}={config.data[name]} must divide over '
                         f'{devices} data-parallel devices for parallel.mode={mode!r}')
    if mode == 'sharded':
      _check_sequence_split(config, mesh.shape[parallel.SEQUENCE_AXIS])


def _check_sequence_split(config: ml_collections.ConfigDict, pieces: int) -> None:
  """With context parallelism every batch's length splits over the `sequence` devices, in two
  chunks per device for causal stacks (the zig-zag layout): fixed-width batches of a length
  that does so ('pack' or 'concat' rows of `data.max_length`)."""
  if pieces == 1:
    return
  if config.data.batching not in ('pack', 'concat'):
    raise ValueError(f'config.parallel.mesh.sequence={pieces} needs batches of one width: '
                     f"config.data.batching 'pack' or 'concat', not {config.data.batching!r}")
  if config.data.max_length % (2 * pieces):
    raise ValueError(f'config.data.max_length={config.data.max_length} must be a multiple of '
                     f'2 x config.parallel.mesh.sequence = {2 * pieces} (each device holds two '
                     'chunks of a sequence)')


def _row_multiple(config: ml_collections.ConfigDict) -> int:
  """What this process's rows of a token batch must be a multiple of: its share of the
  data-parallel devices."""
  mode = config.parallel.mode
  if mode == 'pmap':
    return jax.local_device_count()
  if mode == 'sharded':
    mesh = parallel.make_mesh(config.parallel.mesh.to_dict())
    return max(1, mesh.shape['data'] * mesh.shape['fsdp'] // jax.process_count())
  return 1


def write_run_files(config, bundle, workdir: pathlib.Path,
                    directions: dict[str, metrics.Direction]) -> None:
  """config.json, the data's meta, the tokenizers and their index (all decode.py needs besides
  checkpoints) and the declared direction of each eval metric (read by the sweep summary)."""
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_metric_directions(workdir, directions)
  (workdir / workdir_lib.CONFIG_FILE).write_text(config.to_json_best_effort(indent=1),
                                                 encoding='utf-8')
  meta = {k: v for k, v in bundle.meta.items() if k != 'tokenizer_paths'}
  (workdir / workdir_lib.DATA_META_FILE).write_text(json.dumps(meta, indent=1),
                                                    encoding='utf-8')
  paths = bundle.save_tokenizers(str(workdir))
  index = {role: os.path.basename(p) for role, p in paths.items()}
  (workdir / workdir_lib.TOKENIZERS_FILE).write_text(json.dumps(index, indent=1),
                                                     encoding='utf-8')


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                   ) -> dict[str, tuple[Any, Any]]:
  """`{'section.field': (saved value, value in config)}` for each leaf field in which `config`
  differs from the workdir's config.json (compared as JSON), sorted; {} without one. ABSENT
  stands for a field that one side lacks."""
  path = pathlib.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    return {}
  try:
    # Read as today's code reads it: a field added since is no change of the run's.
    old = _flat(saved_config(workdir_lib.read_json(path)).to_dict())
  except ValueError as e:  # The checkpoint's own check still guards the run.
    logging.warning('cannot compare the config with the saved one: %s', e)
    return {}
  new = _flat(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, ABSENT) != new.get(k, ABSENT)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())


def _record_changes(changes: dict[str, tuple], workdir: pathlib.Path, step: int) -> None:
  logging.warning('re-run of %s resumes at step %d with %d changed config field(s) (the train '
                  'state keeps its shapes): %s', workdir, step, len(changes), _describe(changes))
  record = {'time': time.time(), 'step': step, 'changes': {k: list(v) for k, v in changes.items()}}
  with (workdir / workdir_lib.CONFIG_CHANGES_FILE).open('a', encoding='utf-8') as f:
    f.write(json.dumps(record) + '\n')


def _mismatch_message(error: StateMismatchError, changes: dict[str, tuple],
                      workdir: pathlib.Path) -> str:
  saved = workdir / workdir_lib.CONFIG_FILE
  if changes:
    what = f'this config differs from {saved} in {_describe(changes)}'
  elif saved.exists():
    what = f'this config equals {saved}, but the code that builds the model or optimizer changed'
  else:
    what = f'{workdir} holds checkpoints of another run'
  return (f'{what}: {error.summary}. Nothing was changed. Train in another --workdir, or add '
          f'--config.train.on_mismatch=restart to move the old run into '
          f'{workdir / loop.REPLACED_PREFIX}<n>/ and start over.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> loop.LoopResult:
  """Trains and evaluates the experiment `config` in `workdir` (resuming if it has
  checkpoints); returns the loop's result. See the module docstring for the files and what a
  re-run with a changed config does.

  Raises:
    ValueError: a bad config value (before anything runs), a bad data file.
    StateMismatchError: the workdir's checkpoint holds a train state of other shapes than
      `config` builds (and `config.train.on_mismatch='error'`); the workdir is unchanged.
  """
  validate_config(config)  # Once: the layers below are told it is done (validated=True).
  workdir = pathlib.Path(workdir)
  changes = config_changes(config, workdir)  # Read now: config.json is rewritten on start.
  t0 = time.time()
  bundle = data_lib.make_datasets(
      config.data, data_dir=config.data_dir or None, seed=config.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), validated=True,
      row_multiple=_row_multiple(config))
  task = tasks.make_task(config, bundle.meta)
  shown = ('input_vocab_size', 'target_vocab_size', 'image_shape', 'num_classes', 'num_examples')
  logging.info('task %s, model %s, data %s (%s), data ready in %.1fs', task.name, task.kind,
               config.data.name, {k: bundle.meta[k] for k in shown if k in bundle.meta},
               time.time() - t0)
  hooks = evaluators.make_evaluators(config, task, bundle, workdir)
  directions = task.metric_directions()

  def on_start(step: int) -> None:
    # After the restore: a refused re-run leaves config.json and the rest as they were.
    if not parallel.is_primary():
      return
    # Gone when the old run was moved aside (on_mismatch='restart'): nothing to compare with.
    if changes and (workdir / workdir_lib.CONFIG_FILE).exists():
      _record_changes(changes, workdir, step)
    write_run_files(config, bundle, workdir, directions)

  try:
    result = loop.train_loop(
        config, workdir, init_params=task.init_params, loss_fn=task.loss_fn,
        train_iter=bundle.train, eval_iters=bundle.eval, eval_hooks=hooks, validated=True,
        on_start=on_start, keep_on_restart=(workdir_lib.SWEEP_LOG,),
        count_tokens=task.count_tokens, metric_directions=directions)
  except StateMismatchError as e:
    raise StateMismatchError(_mismatch_message(e, changes, workdir), step=e.step,
                             differences=e.differences) from None
  counts = {name: dict(p.counts) for name, p in bundle.length_policies.items()}
  for name, c in counts.items():
    if c.get('truncated') or c.get('filtered'):
      logging.warning('%s: %d of %d examples truncated, %d filtered (data.length_policy)',
                      name, c.get('truncated', 0), c.get('seen', 0), c.get('filtered', 0))
  finished_before = result.step == result.start_step and workdir_lib.is_finished(workdir)
  # A re-run of a finished workdir restores and stops at once: keep its DONE record.
  if parallel.is_primary() and not result.preempted and not finished_before:
    eval_keys = set(result.last_eval)
    done = {'step': result.step, 'final': result.last_eval,
            'best': metrics.best_values(metrics.read_metrics(workdir), sorted(eval_keys),
                                        directions),
            'best_metric': config.train.best_metric, 'data_exhausted': result.data_exhausted,
            'length_policy_counts': counts}
    if config.train.budget_minutes:
      done.update(budget_minutes=config.train.budget_minutes,
                  budget_exhausted=result.budget_exhausted,
                  minutes_spent=result.seconds_spent / 60)
    (workdir / workdir_lib.DONE_FILE).write_text(json.dumps(done, indent=1), encoding='utf-8')
  return result
