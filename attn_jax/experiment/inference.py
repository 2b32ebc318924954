"""A trained run, reloaded from its workdir, applied to new text.

    run = load_run('/tmp/attn_jax/reverse', checkpoint='best')
    outputs = predict(run, ['3 1 4 1 5'], method='greedy')
    print(score(run, outputs, references))      # {'bleu', 'chrf'} or {'accuracy'}

`load_run` reads what `run.train_and_evaluate` wrote (see `workdir`: config.json,
data_meta.json, tokenizers.json + tokenizer files, checkpoints/) and restores the parameters
only; `load_run(workdir, average_last=5)` decodes with the mean of the last 5 checkpoints'
parameters instead (`train.averaging`, as Vaswani et al. 2017 do).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from attn_jax.data import tokenizers as tok_lib
from attn_jax.experiment import config as experiment_config
from attn_jax.experiment import evaluation, tasks
from attn_jax.experiment import workdir as workdir_lib
from attn_jax.tokens import EOS_ID
from attn_jax.train import averaging, loop, metrics, optim
from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import state as state_lib

CHECKPOINTS = ('latest', 'best')


@dataclasses.dataclass
class Run:
  """A reloaded run: its config, data meta, tokenizers, task (model) and parameters.

  `step` is the checkpoint's step (with averaging, the latest averaged); `averaged_steps` the
  steps whose params were averaged, ascending (empty without averaging).
  """

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  meta: dict[str, Any]
  tokenizers: dict[str, Any]
  task: tasks.Task
  params: Any
  step: int
  averaged_steps: tuple[int, ...] = ()


def load_run(workdir: str | pathlib.Path, checkpoint: str = 'latest',
             average_last: int = 0) -> Run:
  """Reloads the run in `workdir` at its latest or best (`config.train.best_metric`) step.

  Args:
    workdir: a run directory written by `run.train_and_evaluate`.
    checkpoint: 'latest' or 'best'.
    average_last: > 1 averages the params of the `average_last` highest steps on disk (which
      include a kept best checkpoint older than the latest ones only when `average_last`
      exceeds `config.train.keep_checkpoints`); 0 or 1 restores one checkpoint.

  Raises:
    ValueError: a missing/corrupt run file, no checkpoint, an unknown `checkpoint` choice,
      'best' without a best metric, a negative `average_last`, averaging with 'best', or
      fewer checkpoints kept than `average_last`.
  """
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f'checkpoint={checkpoint!r} is not one of {CHECKPOINTS}')
  if not isinstance(average_last, int) or average_last < 0:
    raise ValueError(f'average_last={average_last!r} must be an int >= 0 (0 or 1 = off)')
  if average_last > 1 and checkpoint != 'latest':
    raise ValueError(f'average_last={average_last} averages the latest checkpoints; it does '
                     f'not combine with checkpoint={checkpoint!r}')
  workdir = pathlib.Path(workdir)
  config = experiment_config.saved_config(
      workdir_lib.read_json(workdir / workdir_lib.CONFIG_FILE))
  meta = workdir_lib.read_json(workdir / workdir_lib.DATA_META_FILE)
  index = workdir_lib.read_json(workdir / workdir_lib.TOKENIZERS_FILE)
  toks = {role: tok_lib.load_tokenizer(str(workdir / name)) for role, name in index.items()}
  task = tasks.make_task(config, meta)
  tx, _ = optim.make_optimizer(loop.optim_config(config))
  abstract = state_lib.abstract_state(task.init_params, tx, jax.random.PRNGKey(0))
  t = config.train
  best_mode = metrics.best_mode(t, task.metric_directions())
  ckpt = ckpt_lib.Checkpointer(workdir / workdir_lib.CHECKPOINTS_DIR,
                               best_metric=t.best_metric or None, best_mode=best_mode,
                               async_save=False)
  try:
    if average_last > 1:
      if not ckpt.all_steps():
        raise ValueError(f'{workdir / workdir_lib.CHECKPOINTS_DIR} holds no checkpoint')
      params, steps = averaging.average_checkpoints(ckpt, abstract, average_last)
      return Run(workdir=workdir, config=config, meta=meta, tokenizers=toks, task=task,
                 params=params, step=steps[-1], averaged_steps=tuple(steps))
    step = None
    if checkpoint == 'best':
      step = ckpt.best_step()
      if step is None:
        raise ValueError(f'{workdir}: no best checkpoint (config.train.best_metric='
                         f'{t.best_metric!r}); use checkpoint=latest')
    restored = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f'{workdir / workdir_lib.CHECKPOINTS_DIR} holds no checkpoint')
  return Run(workdir=workdir, config=config, meta=meta, tokenizers=toks, task=task,
             params=restored.state.params, step=restored.step)


def _token_rows(run: Run, texts: Sequence[str], role: str) -> list[list[int]]:
  """Token ids of each text ending in EOS, truncated to the run's `max_length` (counted in a
  warning)."""
  max_len = int(run.meta['max_length'])
  rows, truncated = [], 0
  for text in texts:
    ids = list(run.tokenizers[role].encode(text))
    if len(ids) + 1 > max_len:
      ids, truncated = ids[:max_len - 1], truncated + 1
    rows.append(ids + [EOS_ID])
  if truncated:
    logging.warning('%d of %d inputs truncated to max_length=%d tokens', truncated, len(texts),
                    max_len)
  return rows


def encode(run: Run, texts: Sequence[str], role: str = 'inputs') -> np.ndarray:
  """Texts -> int32 `[n, L]` ids ending in EOS, padded to `evaluation.padded_width` (few
  compiles).

  Texts longer than the run's `max_length` are truncated (keeping EOS) and counted in a
  warning.
  """
  return evaluation.pad_rows(_token_rows(run, texts, role))


def predict(run: Run, texts: Sequence[str], *, batch_size: int = 32,
            max_decode_len: int = 0, seed: int = 0, **decode: Any) -> list[str]:
  """Translations / algorithmic outputs (seq2seq), label names (classification) or
  continuations (LM, `texts` are prompts) for `texts`, in their order.

  The texts are decoded in batches of similar length (sorted by token count), which cuts the
  padding every decoding step attends over and lets a batch of short inputs stop early;
  greedy and beam outputs do not depend on the batching. Sampling keys are per batch
  (`fold_in(seed, position of its first text in that order)`), so a sample depends on `seed`
  and on the whole set of texts given.

  `decode` overrides `config.eval` decoding fields: method (as `decode_method`), beam_size,
  length_penalty, temperature, top_k, top_p, max_len_a, max_len_b. `max_decode_len` 0 = the
  run's target length.
  """
  # Today's defaults under the run's values: a run saved before a field existed still decodes.
  e = experiment_config.default_eval()
  e.update(run.config.eval.to_dict())
  for key, value in decode.items():
    name = 'decode_method' if key == 'method' else key
    if name not in e:
      raise ValueError(f'unknown decoding option {key!r}; known: method, '
                       f'{sorted(k for k in e if k != "decode_method")}')
    if value is not None:
      e[name] = value
  evaluation.validate_config(ml_collections.ConfigDict({'eval': e}))
  length = max_decode_len or int(run.meta.get('max_target_length') or run.meta['max_length'])
  rows = _token_rows(run, texts, 'inputs')
  order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
  outputs: list[str | None] = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    picked = order[start:start + batch_size]
    ids = evaluation.pad_rows([rows[i] for i in picked])
    rng = jax.random.fold_in(jax.random.key(seed), start)
    texts_out = run.task.predict_batch(run.params, ids, eval_config=e, max_decode_len=length,
                                       rng=rng, tokenizers=run.tokenizers, meta=run.meta)
    for i, text in zip(picked, texts_out, strict=True):
      outputs[i] = text
  return outputs


def score(run: Run, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """What the run's task scores (`Task.score`): BLEU and chrF for translation, accuracy (exact
  string match) for classification and algorithmic tasks; nothing for LMs."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} references')
  return run.task.score(run.config, predictions, references)
