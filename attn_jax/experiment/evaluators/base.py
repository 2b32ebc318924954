"""What an evaluator is, and how a task's evaluators are built for a run.

    evaluators = make_evaluators(config, task, bundle, workdir)
    train_loop(..., eval_hooks=evaluators)   # each: (state, step) -> {'<split>/<name>': value}

An evaluator is a class in a module of its own under `attn_jax.experiment.evaluators` (as
big_vision's `evaluators/`): built from `(config, task, bundle, workdir)`, it runs after the
loss-based eval of the loop, on the unreplicated train state, and declares the metrics it
writes and which direction is better (`metrics`), so that best values, the best checkpoint
and the sweep summary never guess from a metric's name. A task lists its evaluators
(`Task.evaluators`); `enabled(config)` says whether `config.eval` asks for one.

Evaluators score this process's eval shard: with several processes none runs (a warning says
so); the loss-based eval metrics still aggregate exactly across hosts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import ml_collections

from attn_jax.train.metrics import Direction


class Evaluator:
  """Base of the evaluators: the constructor, `enabled`, the declared `metrics` and `__call__`.

  Attributes:
    metrics: metric name within an eval split (or an fnmatch pattern of names, e.g.
      'sequence_accuracy_len_*') -> 'max' (higher is better), 'min' or None (no best, e.g. a
      length). The evaluator writes them as '<split>/<name>'.
  """

  metrics: ClassVar[Mapping[str, Direction]] = {}

  def __init__(self, config: ml_collections.ConfigDict, task: Any, bundle: Any,
               workdir: str | os.PathLike):
    self.config, self.task, self.bundle, self.workdir = config, task, bundle, workdir

  @classmethod
  def enabled(cls, config: ml_collections.ConfigDict) -> bool:
    """Whether `config.eval` asks for this evaluator."""
    del config
    return True

  def __call__(self, state: Any, step: int) -> dict[str, float]:
    """`{'<split>/<name>': value}` for the train state at `step` (may write files too)."""
    raise NotImplementedError


def eval_splits(config: ml_collections.ConfigDict, bundle: Any) -> list[str]:
  """The splits `config.eval.decode_splits` names ('' = every eval split of the data)."""
  names = [s.strip() for s in config.eval.decode_splits.split(',') if s.strip()]
  names = names or list(bundle.eval)
  unknown = sorted(set(names) - set(bundle.eval))
  if unknown:
    raise ValueError(f'config.eval.decode_splits names {unknown}; eval splits are '
                     f'{sorted(bundle.eval)}')
  return names


def make_evaluators(config: ml_collections.ConfigDict, task: Any, bundle: Any,
                    workdir: str | os.PathLike) -> list[Evaluator]:
  """The evaluators of `task` (its `evaluators`, in order) that `config.eval` enables."""
  if jax.process_count() > 1:
    logging.warning('decoding/sampling/attention evaluators are disabled with %d processes '
                    '(they would score one shard); loss and accuracy are still exact',
                    jax.process_count())
    return []
  return [cls(config, task, bundle, workdir) for cls in task.evaluators if cls.enabled(config)]


def declared_directions(evaluators: Sequence[type[Evaluator]]) -> dict[str, Direction]:
  """The metrics the evaluator classes declare, merged in order."""
  out: dict[str, Direction] = {}
  for cls in evaluators:
    out.update(cls.metrics)
  return out
