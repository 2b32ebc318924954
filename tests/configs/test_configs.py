"""Every config file parses, validates and sweeps without importing JAX; bad arguments and
values fail by name."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from attn_jax.experiment import run

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Experiment configs: every module of the package but its helpers.
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'common'))
# Importing any of these means a config pulled in the training stack.
HEAVY = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'chex', 'grain', 'tensorflow_datasets',
         'tensorflow', 'matplotlib', 'sentencepiece', 'sacrebleu', 'torch')
# A bad choice for each config's main argument.
BAD_CHOICE = {'algorithmic': 'task', 'listops': 'size', 'translation': 'model',
              'text_classification': 'data', 'language_model': 'positional',
              'length_study': 'task', 'ablation': 'variant', 'context_extension': 'positional',
              'image_classification': 'data'}


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f'configs_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_building_any_config_imports_no_jax():
  # A fresh interpreter: this one has JAX loaded already.
  script = f"""
import importlib, sys
for name in {CONFIGS!r}:
  module = importlib.import_module('configs.' + name)
  for arg in [None, 'smoke'] + [r.get('arg', '') for r in module.sweep()]:
    module.get_config(arg)
print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
"""
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == '[]', f'building the configs imported {out.strip()}'


def test_every_config_is_covered():
  assert set(CONFIGS) == set(BAD_CHOICE), 'add the new config to BAD_CHOICE (and the smoke test)'


@pytest.mark.parametrize('name', CONFIGS)
def test_default_and_smoke_configs_validate(name):
  module = _load(name)
  assert 'experiments/train.py' in module.__doc__  # the launch command
  for arg in (None, 'smoke'):
    config = module.get_config(arg)
    assert config.is_locked
    run.validate_config(config)
  assert module.get_config('smoke').train.num_steps <= 5


@pytest.mark.parametrize('name', CONFIGS)
def test_unknown_arg_key_and_bad_choice_name_themselves(name):
  module = _load(name)
  with pytest.raises(ValueError, match="unknown config arg 'colour'"):
    module.get_config('colour=red')
  key = BAD_CHOICE[name]
  with pytest.raises(ValueError, match=rf"config arg\.{key}='nonsense' is not one of"):
    module.get_config(f'{key}=nonsense')


@pytest.mark.parametrize('name', CONFIGS)
def test_sweep_runs_build_and_override_existing_fields(name):
  module = _load(name)
  runs = module.sweep()
  assert runs and len({r.get('name', r['arg']) for r in runs}) == len(runs)
  for entry in runs:
    assert set(entry) <= {'arg', 'overrides', 'name'}
    config = module.get_config(entry['arg'])
    for field, value in entry.get('overrides', {}).items():
      section, _, leaf = field.rpartition('.')
      target = config
      for part in section.split('.'):
        target = target[part]
      assert leaf in target, f'{name} sweep overrides unknown field {field}'
      assert type(target[leaf]) is type(value), field


def _parse(argv):
  argv = ['train.py', *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_config_flags_override_numbers_and_reject_unknown_fields():
  path = str(ROOT / 'configs' / 'algorithmic.py')
  config = _parse([f'--config={path}:task=sort,smoke', '--config.optim.learning_rate=0.01',
                   '--config.model.d_model=64'])
  assert config.data.name == 'sort' and config.optim.learning_rate == 0.01
  assert config.model.d_model == 64
  with pytest.raises((flags.Error, AttributeError, KeyError), match='learning_rat'):
    _parse([f'--config={path}', '--config.optim.learning_rat=0.01'])


@pytest.mark.parametrize('field,value,message', [
    ('model.activation', 'relu6', "activation='relu6' is not one of"),
    ('model.kind', 'decoder_lm', "serves 'lm' data but the dataset is 'seq2seq'"),
    ('eval.decode_method', 'top', "config.eval.decode_method='top' is not one of"),
    ('parallel.mode', 'tpu', "parallel.mode='tpu' is not one of"),
    ('optim.schedule', 'cosine', "config.optim.schedule='cosine' is not one of"),
    ('data.batching', 'pile', "data.batching='pile'"),
    ('train.num_steps', 0, 'config.train.num_steps=0'),
    ('data.batch_size', 12, 'batch_size=12 must divide over 8'),
])
def test_validate_config_names_the_bad_field(field, value, message):
  config = _load('algorithmic').get_config('smoke')
  config.unlock()
  if field == 'data.batch_size':
    config.parallel.mode = 'pmap'
  section, leaf = field.split('.')
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    run.validate_config(config)


def test_rnn_model_rejects_packed_batches():
  config = _load('algorithmic').get_config('model=rnn,smoke')
  config.data.batching = 'pack'
  with pytest.raises(ValueError, match="batching='pack' is not supported by model.kind"):
    run.validate_config(config)


def test_algorithmic_addition_trains_longer_with_the_same_eval_count_per_step():
  # Addition needs three times the steps to learn its carries (README, CPU config table).
  module = _load('algorithmic')
  reverse, addition = module.get_config(None), module.get_config('task=addition')
  assert (reverse.train.num_steps, reverse.train.eval_every) == (2_000, 1_000)
  assert (addition.train.num_steps, addition.train.eval_every) == (6_000, 2_000)
  for c in (reverse, addition):
    assert c.train.checkpoint_every == c.train.eval_every  # best-checkpoint ranks eval steps
    assert c.train.num_steps % c.train.eval_every == 0
  assert module.get_config('task=addition,model=rnn').train.num_steps == 6_000


@pytest.mark.parametrize('model,kind,fields,lr', [
    ('transformer', 'encoder_decoder', {'d_model': 16, 'norm_position': 'pre'}, 2e-3),
    ('rnn', 'rnn_seq2seq', {'hidden_dim': 8, 'attention': 'additive'}, 3e-3),
    ('rnn_noattn', 'rnn_seq2seq', {'hidden_dim': 8, 'attention': 'none'}, 3e-3),
])
def test_algorithmic_seq2seq_config_builds_the_named_model_with_the_shared_schedule(
    model, kind, fields, lr):
  # Both algorithmic configs build on this helper: each name picks its kind and sizes only.
  c = _load('algorithmic').seq2seq_config('copy', model, transformer={'d_model': 16},
                                            rnn={'hidden_dim': 8})
  assert c.model.kind == kind and c.model.dropout_rate == 0.0
  assert {k: c.model[k] for k in fields} == fields
  assert (c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps, c.optim.b2) == (
      lr, 'warmup_cosine', 100, 0.98)
  assert (c.data.batch_size, c.data.eval_batch_size) == (64, 250)
  with pytest.raises(ValueError, match="model='lstm' is not one of"):
    _load('algorithmic').seq2seq_config('copy', 'lstm', transformer={}, rnn={})


def test_translation_budget_applies_the_low_resource_recipe_on_local_data_only():
  module = _load('translation')
  plain, budget = module.get_config('model=small,data=local'), module.get_config(
      'model=small,data=local,budget=40')
  assert plain.train.budget_minutes == 0 and plain.data.max_tokens == 0
  assert budget.train.budget_minutes == 40.0
  for field, value in module.LOW_RESOURCE.items():
    section, leaf = field.rsplit('.', 1)
    node = budget
    for part in section.split('.'):
      node = node[part]
    assert node[leaf] == value, field
  rnn = module.get_config('model=rnn,data=local,budget=40')
  assert rnn.data.max_tokens == module.LOW_RESOURCE['data.max_tokens']
  assert (rnn.model.embed_dim, rnn.model.hidden_dim) == (256, 256)  # not the paper's 620/1000
  assert module.get_config('model=rnn,data=local').model.hidden_dim == 1000
  for c in (budget, rnn):
    c.data.local.train = '/corpus/train'  # validation needs a path, not the file
    run.validate_config(c)
  wmt = module.get_config('model=base,budget=600')  # a budget alone: the WMT recipe stays
  assert wmt.train.budget_minutes == 600.0 and wmt.data.max_tokens == 0
  with pytest.raises(ValueError, match='budget=-1.0 must be >= 0'):
    module.get_config('budget=-1')
