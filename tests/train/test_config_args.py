from __future__ import annotations

import ml_collections
import pytest

from attn_jax.train.config_args import parse_arg, validate_choices, validate_positive


def test_parse_arg_types_and_defaults():
  c = parse_arg('variant=base,steps=12,lr=0.5,packed=false', variant='tiny', steps=1, lr=1e-3,
                packed=True, name=None)
  assert c.variant == 'base' and c.steps == 12 and isinstance(c.steps, int)
  assert c.lr == 0.5 and c.packed is False and c.smoke is False and c.name is None


def test_parse_arg_smoke_bare_key_and_empty():
  assert parse_arg('smoke', variant='tiny').smoke is True
  assert parse_arg(None, variant='tiny').variant == 'tiny'
  assert parse_arg('', variant='tiny').smoke is False
  assert parse_arg('name=abc', name=None).name == 'abc'


def test_parse_arg_unknown_key_lists_known():
  with pytest.raises(ValueError, match=r"unknown config arg 'varient'.*'smoke'.*'variant'"):
    parse_arg('varient=base', variant='tiny')


@pytest.mark.parametrize('arg,match', [
    ('steps=abc', 'expected an int'),
    ('packed=maybe', 'expected a boolean'),
    ('steps=1,steps=2', 'given twice'),
    ('steps', 'needs a value'),
    ('=3', 'empty key'),
])
def test_parse_arg_bad_values(arg, match):
  with pytest.raises(ValueError, match=match):
    parse_arg(arg, steps=1, packed=True)


def test_parse_arg_lazy_keeps_unknown():
  assert parse_arg('other=x', lazy=True, steps=1).other == 'x'


def test_validate_choices_and_positive():
  c = ml_collections.ConfigDict({'optim': {'name': 'adamw', 'lr': 0.0}})
  assert validate_choices(c, 'optim.name', ('adam', 'adamw')) == 'adamw'
  with pytest.raises(ValueError, match=r"config.optim.name='adamw' is not one of \('sgd',\)"):
    validate_choices(c, 'optim.name', ('sgd',))
  with pytest.raises(ValueError, match="no field 'optim.nme'"):
    validate_choices(c, 'optim.nme', ('sgd',))
  validate_positive(c, ['optim.lr'], allow_zero=True)
  with pytest.raises(ValueError, match=r'config.optim.lr=0.0 must be a number > 0'):
    validate_positive(c, ['optim.lr'])
