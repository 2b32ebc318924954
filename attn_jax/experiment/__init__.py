"""The experiment layer: a config -> data + model + task + evaluators -> the train loop.

    config.base_config(...)          the sections of an experiment config (JAX-free)
    run.train_and_evaluate(config, workdir)
    tasks                            one module per kind of task (`tasks.TASKS`, `make_task`)
    evaluators                       one module per evaluator: decoding + BLEU, samples, heatmaps
    evaluation                       config.eval rules, accuracy by length, evaluator helpers
    inference.load_run / predict     a finished run applied to new text
    workdir                          the files of a run directory and "is it finished"
    sweep                            runs a config's `sweep()`, one process per entry
    plots, length_study              figures and the length study

This is the only layer that imports `models`, `data` and `train` together. Names are exported
lazily, so `attn_jax.experiment.config` loads without JAX.
"""

from typing import TYPE_CHECKING

from attn_jax import _lazy

_EXPORTS = {
    'base_config': 'config', 'train_and_evaluate': 'run', 'validate_config': 'run',
    'load_run': 'inference', 'predict': 'inference',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # Static analysers see the real names.
  from attn_jax.experiment.config import base_config
  from attn_jax.experiment.inference import load_run, predict
  from attn_jax.experiment.run import train_and_evaluate, validate_config
