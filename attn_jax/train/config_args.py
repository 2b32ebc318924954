"""big_vision-style config arguments: `--config configs/x.py:variant=base,smoke=True`.

Discrete choices of an experiment come as one argument string, parsed against a known set of
keys with typed defaults, so a typo fails loudly instead of silently training something else.
Numeric knobs are still overridden with `--config.field=value` on the locked ConfigDict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

_TRUE = ('1', 'true', 'yes', 'y', 'on')
_FALSE = ('0', 'false', 'no', 'n', 'off')


def _convert(key: str, raw: str, default: Any) -> Any:
  """Converts `raw` to the type of `default` (str when the default is None)."""
  if isinstance(default, bool):
    low = raw.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f'config arg {key!r}: expected a boolean ({_TRUE + _FALSE}), got {raw!r}')
  if isinstance(default, int):
    try:
      return int(raw)
    except ValueError:
      raise ValueError(f'config arg {key!r}: expected an int, got {raw!r}') from None
  if isinstance(default, float):
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f'config arg {key!r}: expected a float, got {raw!r}') from None
  return raw


def parse_arg(arg: str | None, *, lazy: bool = False, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'key=value,key2=value2'` into a ConfigDict typed like `defaults`.

  Every config accepts `smoke` (default False): a tiny, fast run for tests and laptops. A bare
  key (`'smoke'`) means `key=True` for booleans. Values take the type of their default: bool,
  int, float, or str (also when the default is None).

  Args:
    arg: the string after `:` in `--config path.py:arg`, or None / '' for all defaults.
    lazy: if True, unknown keys are kept as strings instead of raising (for configs that
      forward part of their argument elsewhere).
    **defaults: the known keys and their default values.

  Returns:
    A ConfigDict with every known key (plus `smoke`).

  Raises:
    ValueError: for an unknown key (listing the known ones), a repeated key, a malformed item,
      or a value that does not parse as the default's type.
  """
  defaults = {'smoke': False, **defaults}
  values = dict(defaults)
  seen = set()
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    if '=' in item:
      key, raw = (s.strip() for s in item.split('=', 1))
    else:
      key, raw = item, 'True'
    if not key:
      raise ValueError(f'config arg item {item!r} has an empty key')
    if key in seen:
      raise ValueError(f'config arg {key!r} given twice in {arg!r}')
    seen.add(key)
    if key not in defaults:
      if lazy:
        values[key] = raw
        continue
      raise ValueError(f'unknown config arg {key!r}; known keys: {sorted(defaults)}')
    if '=' not in item and not isinstance(defaults[key], bool):
      raise ValueError(f'config arg {key!r} needs a value (key=value)')
    values[key] = _convert(key, raw, defaults[key])
  return ml_collections.ConfigDict(values)


def _get_field(config: Any, field: str) -> Any:
  value = config
  for part in field.split('.'):
    try:
      value = value[part] if isinstance(value, dict) else getattr(value, part)
    except (AttributeError, KeyError):
      raise ValueError(f'config has no field {field!r}') from None
  return value


def validate_choices(config: Any, field: str, allowed: Iterable[Any], *,
                     where: str = 'config') -> Any:
  """Checks that `config.<field>` (dotted path) is one of `allowed` and returns it.

  `where` names `config` in the message, e.g. 'config.optim' for a section.

  Raises:
    ValueError: naming the field, the bad value and the allowed values.
  """
  allowed = tuple(allowed)
  value = _get_field(config, field)
  if value not in allowed:
    raise ValueError(f'{where}.{field}={value!r} is not one of {allowed}')
  return value


def validate_positive(config: Any, fields: Sequence[str], *, allow_zero: bool = False) -> None:
  """Checks numeric `config.<field>` values are > 0 (or >= 0 with `allow_zero`).

  Raises:
    ValueError: naming the first field that fails.
  """
  for field in fields:
    value = _get_field(config, field)
    bad = not isinstance(value, int | float) or isinstance(value, bool)
    bad = bad or (value < 0 if allow_zero else value <= 0)
    if bad:
      bound = '>= 0' if allow_zero else '> 0'
      raise ValueError(f'config.{field}={value!r} must be a number {bound}')
