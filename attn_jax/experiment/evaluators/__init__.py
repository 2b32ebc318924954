"""Evaluators: one module per evaluator, each a class that declares its metrics (big_vision's
`evaluators/`). See `base.py` for what an evaluator is.

    decoding.DecodingEvaluator        seq2seq: exact match by length, BLEU
    lm_samples.SamplesEvaluator       LM: sampled continuations of validation prompts
    attention_maps.AttentionMapEvaluator   every task: heatmaps at the final step
"""

from attn_jax.experiment.evaluators.base import Evaluator, eval_splits, make_evaluators

__all__ = ['Evaluator', 'eval_splits', 'make_evaluators']
