"""The context-extension study (`experiment.context_study`): evaluation configs, the summary's
t-intervals, the outputs, and one tiny trained run scored end to end."""

from __future__ import annotations

import json
import math

import pytest

from attn_jax.experiment import context_study, run, stats
from configs import context_extension


def test_eval_config_scales_rope_by_the_length_ratio_and_leaves_training_alone():
  config = context_extension.get_config('positional=rope,smoke')
  scaled = context_study.eval_config(config, 256, 'yarn')
  attention = scaled.model.attention
  assert (attention.rope_scaling, attention.rope_scaling_factor,
          attention.rope_original_length) == ('yarn', 4.0, 64)
  assert scaled.data.max_length == 256 and scaled.data.eval_batch_size == 16
  assert config.model.attention.rope_scaling == 'none'  # the run's own config is untouched
  with pytest.raises(ValueError, match="applies to RoPE, not positional='alibi'"):
    context_study.eval_config(context_extension.get_config('positional=alibi,smoke'), 128,
                              'ntk')


def test_summary_gives_each_method_and_length_a_t_interval_over_seeds(tmp_path):
  rows = lambda *bpc: [{'length': 64, 'scaling': 'none', 'bits_per_char': b, 'tokens': 10}  # noqa: E731
                       for b in bpc]
  runs = {f'rope_seed{s}': ('rope', s, rows(v)) for s, v in enumerate([2.0, 2.2, 2.1])}
  runs['alibi_seed0'] = ('alibi', 0, rows(1.5))
  summary = context_study.summarize(runs)
  assert [s['method'] for s in summary] == ['RoPE', 'ALiBi']
  mean, half = stats.t_interval([2.0, 2.2, 2.1])
  assert summary[0]['bits_per_char'] == pytest.approx(mean)
  assert summary[0]['ci95'] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5) == half
  assert math.isnan(summary[1]['ci95'])  # one seed: no interval
  paths = context_study.write_outputs(runs, tmp_path, lengths=[64], train_length=64,
                                      settings={})
  record = json.loads(paths['json'].read_text())
  assert record['provenance']['git_revision'] and len(record['runs']) == 4
  assert '| RoPE | 2.100 ± 0.248 |' in paths['md'].read_text()
  assert paths['png'].stat().st_size > 5_000


def test_a_trained_rope_run_is_scored_at_every_length_and_scaling(tmp_path):
  config = context_extension.get_config('positional=rope,smoke,train_length=16')
  run.train_and_evaluate(config, tmp_path)
  rows = context_study.evaluate_run(tmp_path, [16, 32])
  got = {(r['length'], r['scaling']) for r in rows}
  assert got == {(16, 'none')} | {(32, s) for s in context_study.SCALINGS}
  assert all(0 < r['bits_per_char'] < 10 and r['tokens'] > 0 for r in rows)
  cached = json.loads((tmp_path / context_study.EVAL_FILE).read_text())
  assert len(cached['rows']) == 6  # a second call reads these instead of scoring again
  assert context_study.evaluate_run(tmp_path, [16, 32]) == rows
