"""Helpers shared by the experiment configs; imports only ml_collections.

    a = parse_arg(arg, choices={'task': TASKS}, task='reverse', generalize=False)
    ...
    if a.smoke:
      apply_smoke(c)

Discrete choices of an experiment come as one argument string (`--config x.py:task=sort,smoke`)
parsed against known keys with typed defaults and allowed values, so a typo fails loudly
instead of silently training something else (big_vision's `parse_arg`). Numbers are still
overridden with `--config.field=value` on the locked ConfigDict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def parse_arg(arg: str | None, *, lazy: bool = False,
              choices: Mapping[str, Iterable[Any]] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'key=value,key2=value2'` into a ConfigDict typed like `defaults`.

  Every config accepts `smoke` (default False): a tiny, fast run for tests and laptops. A bare
  key (`'smoke'`) means `key=True` for booleans. Values take the type of their default: bool,
  int, float, or str (also when the default is None).

  Args:
    arg: the string after `:` in `--config path.py:arg`, or None / '' for all defaults.
    lazy: if True, unknown keys are kept as strings instead of raising (for configs that
      forward part of their argument elsewhere).
    choices: allowed values of some keys, e.g. `{'task': ('copy', 'reverse')}`.
    **defaults: the known keys and their default values.

  Returns:
    A ConfigDict with every known key (plus `smoke`).

  Raises:
    ValueError: for an unknown key (listing the known ones), a repeated key, a malformed item,
      a value that does not parse as the default's type, or one outside its `choices`.
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
  for key, allowed in (choices or {}).items():
    allowed = tuple(allowed)
    if key not in defaults:
      raise ValueError(f'choices given for {key!r}, which has no default')
    if values[key] not in allowed:
      raise ValueError(f'config arg.{key}={values[key]!r} is not one of {allowed}')
  return ml_collections.ConfigDict(values)


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks `config` in place to a couple of steps on tiny batches (seconds on a CPU); the
  config file shrinks its data and model itself."""
  config.train.num_steps = 2
  config.train.log_every = 1
  config.train.eval_every = 0  # only at the end
  config.train.checkpoint_every = 0
  config.train.max_eval_batches = 1
  config.train.progress = False
  config.optim.warmup_steps = 1
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.eval_max_examples = 8
  config.data.bucket_window = 2
  config.data.num_length_buckets = 1  # one padded shape: one compile per step function
  config.data.eval_splits = 'validation'
  config.eval.max_decode_batches = 1
  config.eval.beam_size = min(config.eval.beam_size, 2)
  config.eval.num_samples = 2
  config.eval.sample_length = 8
  config.eval.attention_examples = 1
