"""Runs saved by earlier code load and compute as they did.

`fixtures/saved_model_configs.json` holds model configs exactly as runs saved them at revision
b2cbc47 (attention options flat, before `model.attention` and every field added since),
across model kinds and options, with what that code computed: the logits and loss of fixed
inputs with parameters initialized from key 0, and greedy and beam decodes. Today's
`saved_config` reads each into today's layout, filling every field added since with its
default; the model built from it must reproduce those numbers. So a new model field whose
default changes what an old run computes fails here, with no table of fields to keep by hand.

Tolerances: float32 logits 1e-5 absolute (the same computation, reordered); decoded tokens
exactly.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax.experiment import config as experiment_config
from attn_jax.experiment import evaluation, tasks

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'saved_model_configs.json'
RUNS = json.loads(FIXTURE.read_text())['runs']
# Decoding compiles a loop per method: two kinds cover the encoder-decoder and the LM caches.
DECODED = ('seq2seq_modern', 'lm_local_global_rope')


def _task(record):
  raw = {'model': record['model'], 'loss': {'label_smoothing': 0.0}}
  config = experiment_config.saved_config(raw)
  return tasks.make_task(config, record['meta'])


@pytest.mark.parametrize('name', sorted(RUNS))
def test_a_saved_model_config_computes_what_it_did(name):
  record = RUNS[name]
  task = _task(record)
  batch = {'inputs': jnp.asarray(record['inputs'], jnp.int32),
           'targets': jnp.asarray(record['targets'], jnp.int32), 'label': jnp.array([0, 2])}

  @jax.jit
  def run(batch):
    params = task.init_params(jax.random.key(0))
    logits = task.apply(params, batch)
    loss, _ = task.loss_fn(params, batch, jax.random.key(1), False)
    return params, logits, loss

  params, logits, loss = run(batch)
  np.testing.assert_allclose(logits, np.asarray(record['logits'], np.float32), atol=1e-5)
  np.testing.assert_allclose(loss, record['loss'], rtol=1e-5)
  if name not in DECODED:
    return
  inputs = np.asarray(record['inputs'], np.int32)
  seq2seq = 'decoded_greedy' in record and record['meta']['task'] == 'seq2seq'
  args = dict(inputs=inputs) if seq2seq else dict(prompt=np.where(inputs == 2, 0, inputs)[:, :4])
  for method in ('greedy', 'beam'):
    e = experiment_config.default_eval()
    e.decode_method = method
    decoded = evaluation.generate(task, params, e, max_decode_len=6, **args)
    np.testing.assert_array_equal(decoded, record[f'decoded_{method}'], err_msg=method)


def test_flat_attention_fields_move_into_the_attention_section_and_new_fields_fill_in():
  record = RUNS['seq2seq_modern']
  assert 'attention' not in record['model'] and record['model']['num_kv_heads'] == 2
  config = experiment_config.saved_config({'model': record['model']})
  assert config.model.attention.num_kv_heads == 2
  assert config.model.attention.logit_softcap == 5.0  # was attn_logit_softcap
  assert config.model.attention.sinks is True  # was attention_sinks
  assert config.model.attention.modifiers == ''  # added since: its default
  assert 'attn_logit_softcap' not in config.model and 'num_heads' not in config.model
  # What a re-run would override from the command line keeps its type.
  assert config.model.attention.implementation is None
  config.model.attention.implementation = 'dense'
