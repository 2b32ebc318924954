"""configs/common.py: argument parsing with typed defaults and allowed values, and its promise
to import nothing but ml_collections (and the standard library)."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

from configs.common import parse_arg

COMMON = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'common.py'


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


def test_parse_arg_checks_choices_after_parsing():
  assert parse_arg('task=sort', choices={'task': ('copy', 'sort')}, task='copy').task == 'sort'
  with pytest.raises(ValueError, match=r"config arg.task='add' is not one of \('copy', 'sort'\)"):
    parse_arg('task=add', choices={'task': ('copy', 'sort')}, task='copy')
  with pytest.raises(ValueError, match="choices given for 'size'"):
    parse_arg('', choices={'size': ('a',)}, task='copy')


def test_common_imports_only_ml_collections_and_the_standard_library():
  tree = ast.parse(COMMON.read_text(encoding='utf-8'))
  roots = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
           for a in n.names}
  roots |= {n.module.split('.')[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module}
  assert roots - set(sys.stdlib_module_names) == {'ml_collections'}
