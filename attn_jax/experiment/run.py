"""`train_and_evaluate(config, workdir)`: data + model + task + eval hooks -> `train_loop`.

    config = base_config('reverse', 'encoder_decoder', 'tiny')   # what configs/*.py build on
    train_and_evaluate(config, '/tmp/run')

The workdir it writes (read by `experiments/decode.py` and the sweep runner):

    config.json          the full config (JSON)
    data_meta.json       vocab sizes, classes, splits... (from the data pipeline)
    tokenizers.json      role -> tokenizer file in the workdir
    <role>_<tokenizer>   the tokenizers themselves
    metrics.jsonl, tensorboard/, checkpoints/   (from `train_loop`)
    samples/, attention/ (from the eval hooks)
    DONE                 JSON with final and best eval metrics, written when training completes

Every config is validated by `validate_config` before any data is generated or anything
compiles; a bad value raises ValueError naming the field and the allowed values.
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
from attn_jax.train import evaluation, loop, optim, parallel, tasks
from attn_jax.train.metrics import metric_mode, read_metrics

DONE_FILE = 'DONE'
CONFIG_FILE = 'config.json'
TOKENIZERS_FILE = 'tokenizers.json'
SECTIONS = ('data', 'model', 'optim', 'train', 'parallel', 'loss', 'eval')


def base_config(dataset: str, model_kind: str, variant: str,
                **model_overrides: Any) -> ml_collections.ConfigDict:
  """Every section with defaults: `data` for `dataset`, `model` of `model_kind` at size
  `variant` (+ overrides), `optim`/`train`/`parallel` from attn_jax.train, `loss`, `eval`.

  Config files start from this, set what their experiment needs, then `lock()`.
  """
  c = loop.full_config()
  c.arg = ''  # The `:key=value` string the config was built from (recorded, not read).
  c.data_dir = ''  # TFDS/tokenizer cache; '' = ~/tensorflow_datasets.
  c.data = data_lib.default_config(dataset)
  c.model = tasks.model_section(model_kind, variant, **model_overrides)
  c.loss = ml_collections.ConfigDict({'label_smoothing': 0.0})
  c.eval = evaluation.default_config()
  return c


SEQ2SEQ_MODELS = ('transformer', 'rnn', 'rnn_noattn')


def algorithmic_seq2seq_config(task: str, model: str, *, transformer: dict[str, Any],
                               rnn: dict[str, Any]) -> ml_collections.ConfigDict:
  """`base_config` for an algorithmic seq2seq `task` with `model` in SEQ2SEQ_MODELS, and the
  batch sizes and AdamW schedule shared by `configs/algorithmic.py` and
  `configs/length_study.py` (loaded by path, so they cannot import each other).

  'transformer' is a pre-norm encoder_decoder built with the fields in `transformer`;
  'rnn' / 'rnn_noattn' the RNN encoder-decoder with additive / no attention built with the
  fields in `rnn`. No dropout. The RNN trains best at a higher rate. Unlocked: the caller
  sets the data and train fields of its experiment, then `lock()`s.
  """
  if model not in SEQ2SEQ_MODELS:
    raise ValueError(f'model={model!r} is not one of {SEQ2SEQ_MODELS}')
  if model == 'transformer':
    kind, overrides = 'encoder_decoder', dict(transformer, dropout_rate=0.0,
                                              norm_position='pre')
  else:
    attention = 'none' if model == 'rnn_noattn' else 'additive'
    kind, overrides = 'rnn_seq2seq', dict(rnn, attention=attention, dropout_rate=0.0)
  c = base_config(task, kind, 'tiny', **overrides)
  c.data.batch_size = 64
  c.data.eval_batch_size = 250
  c.optim.learning_rate = 2e-3 if model == 'transformer' else 3e-3
  c.optim.schedule = 'warmup_cosine'
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section; raises ValueError naming the field before anything expensive."""
  missing = [s for s in SECTIONS if s not in config]
  if missing:
    raise ValueError(f'config is missing section(s) {missing}; start from '
                     'attn_jax.train.experiment.base_config')
  loop.validate_config(config)  # train / parallel fields
  optim.make_optimizer(loop.optim_config(config))  # optim fields (builds no arrays)
  data_lib.validate_config(config.data, jax.process_count())
  task = data_lib.task_of(config.data)
  tasks.build_model_config(config.model.to_dict(),
                           {'task': task, 'vocab_size': 16, 'num_classes': 2})
  if config.model.kind == 'rnn_seq2seq' and config.data.batching == 'pack':
    raise ValueError("config.data.batching='pack' is not supported by model.kind="
                     "'rnn_seq2seq' (it has no segment ids); use 'bucket' or 'pad'")
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
    for name in ('batch_size', 'eval_batch_size'):
      if rows_of(config.data[name]) % devices:
        raise ValueError(f'config.data.{name}={config.data[name]} must divide over '
                         f'{devices} data-parallel devices for parallel.mode={mode!r}')


def _best(records: list[dict[str, Any]], keys: set[str]) -> dict[str, Any]:
  """Best value and its step for each eval metric over the run, in the direction
  `metrics.metric_mode` gives; metrics with no known direction (counts) have no best."""
  best: dict[str, Any] = {}
  for rec in records:
    for k in keys & set(rec):
      v, mode = rec[k], metric_mode(k)
      if v is None or mode is None:
        continue
      if k not in best or (v < best[k]['value'] if mode == 'min' else v > best[k]['value']):
        best[k] = {'value': v, 'step': rec['step']}
  return best


def write_run_files(config, bundle, workdir: pathlib.Path) -> None:
  """config.json, the tokenizers and their index: all decode.py needs besides checkpoints."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1), encoding='utf-8')
  paths = bundle.save_tokenizers(str(workdir))
  index = {role: os.path.basename(p) for role, p in paths.items()}
  (workdir / TOKENIZERS_FILE).write_text(json.dumps(index, indent=1), encoding='utf-8')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> loop.LoopResult:
  """Trains and evaluates the experiment `config` in `workdir` (resuming if it has
  checkpoints); returns the loop's result. See the module docstring for the files."""
  validate_config(config)
  workdir = pathlib.Path(workdir)
  t0 = time.time()
  bundle = data_lib.make_datasets(
      config.data, data_dir=config.data_dir or None, seed=config.train.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  task = tasks.make_task(config, bundle.meta)
  logging.info('task %s, model %s, data %s (%s), data ready in %.1fs', task.task, task.kind,
               config.data.name, {k: bundle.meta[k] for k in ('input_vocab_size',
                                                               'target_vocab_size',
                                                               'num_classes', 'num_examples')},
               time.time() - t0)
  if parallel.is_primary():
    write_run_files(config, bundle, workdir)
  hooks = evaluation.make_eval_hooks(config, task, bundle, workdir)
  result = loop.train_loop(config, workdir, init_params=task.init_params, loss_fn=task.loss_fn,
                           train_iter=bundle.train, eval_iters=bundle.eval, eval_hooks=hooks)
  counts = {name: dict(p.counts) for name, p in bundle.length_policies.items()}
  for name, c in counts.items():
    if c.get('truncated') or c.get('filtered'):
      logging.warning('%s: %d of %d examples truncated, %d filtered (data.length_policy)',
                      name, c.get('truncated', 0), c.get('seen', 0), c.get('filtered', 0))
  finished_before = result.step == result.start_step and (workdir / DONE_FILE).exists()
  # A re-run of a finished workdir restores and stops at once: keep its DONE record.
  if parallel.is_primary() and not result.preempted and not finished_before:
    eval_keys = set(result.last_eval)
    done = {'step': result.step, 'final': result.last_eval,
            'best': _best(read_metrics(workdir), eval_keys),
            'best_metric': config.train.best_metric, 'data_exhausted': result.data_exhausted,
            'length_policy_counts': counts}
    (workdir / DONE_FILE).write_text(json.dumps(done, indent=1), encoding='utf-8')
  return result


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config` in place to a couple of steps on tiny batches (seconds on a CPU); the
  config file shrinks its data and model itself."""
  config.train.num_steps = 2
  config.train.log_every = 1
  config.train.eval_every = 0  # only at the end
  config.train.checkpoint_every = 0
  config.train.max_eval_batches = 1
  config.train.progress = False
  config.optim.warmup_steps = 1
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.eval_max_examples = 8
  config.data.bucket_window = 2
  config.data.num_length_buckets = 1  # one padded shape: one compile per step function
  config.data.eval_splits = 'validation'
  config.eval.max_decode_batches = 1
  config.eval.beam_size = min(config.eval.beam_size, 2)
  config.eval.num_samples = 2
  config.eval.sample_length = 8
  config.eval.attention_examples = 1
