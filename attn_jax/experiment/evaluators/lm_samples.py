"""Sampled continuations of validation prompts (language models).

    SamplesEvaluator(config, task, bundle, workdir)(state, step)
      -> {'<split>/sample_length': mean tokens per sample}

Writes `config.eval.num_samples` continuations of the first `config.eval.prompt_length` tokens
of the first rows of the first eval split to `workdir/samples/step_<N>.txt` (and the debug
log), one
`'prompt' -> 'continuation'` per line, decoded as `config.eval` says (usually sampling).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np

from attn_jax.experiment.batches import until_eos
from attn_jax.experiment.evaluators.base import Evaluator, eval_splits
from attn_jax.experiment.evaluators.decoding import generate
from attn_jax.tokens import EOS_ID

SAMPLES_DIR = 'samples'  # Under the workdir.


class SamplesEvaluator(Evaluator):
  """Writes sampled continuations of validation prompts to `workdir/samples/step_<N>.txt`."""

  metrics = {'sample_length': None}  # a length: no direction is better

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.num_samples)

  def __init__(self, config, task, bundle, workdir):
    super().__init__(config, task, bundle, workdir)
    self.split = eval_splits(config, bundle)[0]
    self.detok = bundle.tokenizers['inputs']
    self.out_dir = pathlib.Path(workdir) / SAMPLES_DIR

  def __call__(self, state, step) -> dict[str, float]:
    e = self.config.eval
    batch = next(iter(self.bundle.eval[self.split]))
    prompt = np.asarray(batch['inputs'])[:e.num_samples, :e.prompt_length]
    if 'inputs_segmentation' in batch:  # keep only the first document of each row
      seg = np.asarray(batch['inputs_segmentation'])[:e.num_samples, :e.prompt_length]
      prompt = np.where(seg == seg[:, :1], prompt, 0)
    prompt = np.where(np.cumsum(prompt == EOS_ID, axis=1) > 0, 0, prompt)
    out = generate(self.task, state.params, e, prompt=prompt, max_decode_len=e.sample_length,
                   rng=jax.random.fold_in(jax.random.key(self.config.train.seed), step))
    lines = [f'{self.detok.decode(p)!r} -> {self.detok.decode(o)!r}'
             for p, o in zip(prompt, out, strict=True)]
    if jax.process_index() == 0:
      self.out_dir.mkdir(parents=True, exist_ok=True)
      (self.out_dir / f'step_{step}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
      for line in lines:  # In the file; on the console only with --verbosity=1.
        logging.debug('sample @%d: %s', step, line)
    return {f'{self.split}/sample_length': float(np.mean([len(until_eos(r)) for r in out]))}
