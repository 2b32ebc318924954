"""Algorithmic sequence-to-sequence tasks: copy, reverse, sort and multi-digit addition.

Examples are text with one symbol per whitespace-separated word, so a fixed `WordTokenizer`
reads them and a person can too:

    copy     inputs '3 1 4 1 5'      targets '3 1 4 1 5'
    reverse  inputs '3 1 4 1 5'      targets '5 1 4 1 3'
    sort     inputs '3 1 4 1 5'      targets '1 1 3 4 5'   (numeric order of the symbols)
    addition inputs '4 7 + 1 9 8'    targets '2 4 5'       (decimal digits, most significant first)

Lengths are symbol counts (copy/reverse/sort) or digits per operand (addition). Each example is
drawn from its own `random.Random(f'{seed}/{split}/{index}')`, so a dataset is identical across
runs, machines and Python versions for a given seed, and any example can be regenerated alone.
The test split uses longer lengths than train/validation to measure length generalization.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ALGORITHMIC_TASKS = ('copy', 'reverse', 'sort', 'addition')
ADDITION_SYMBOLS = tuple(str(d) for d in range(10)) + ('+',)


def task_vocabulary(task: str, num_symbols: int) -> list[str]:
  """The words of a task's fixed vocabulary (ids 4.. in this order)."""
  if task == 'addition':
    return list(ADDITION_SYMBOLS)
  if task in ALGORITHMIC_TASKS:
    return [str(i) for i in range(num_symbols)]
  raise ValueError(f'Unknown algorithmic task {task!r}; allowed: {ALGORITHMIC_TASKS}.')


def _number(rng: random.Random, num_digits: int) -> int:
  """A uniform number with exactly `num_digits` digits (0 allowed for one digit)."""
  if num_digits == 1:
    return rng.randrange(10)
  return rng.randrange(10 ** (num_digits - 1), 10 ** num_digits)


def make_example(task: str, rng: random.Random, *, min_length: int, max_length: int,
                 num_symbols: int) -> dict[str, str]:
  """One example {'inputs': str, 'targets': str} with a length in [min_length, max_length]."""
  if task == 'addition':
    a = _number(rng, rng.randint(min_length, max_length))
    b = _number(rng, rng.randint(min_length, max_length))
    return {'inputs': ' '.join(str(a)) + ' + ' + ' '.join(str(b)),
            'targets': ' '.join(str(a + b))}
  length = rng.randint(min_length, max_length)
  symbols = [rng.randrange(num_symbols) for _ in range(length)]
  if task == 'copy':
    out = symbols
  elif task == 'reverse':
    out = symbols[::-1]
  elif task == 'sort':
    out = sorted(symbols)
  else:
    raise ValueError(f'Unknown algorithmic task {task!r}; allowed: {ALGORITHMIC_TASKS}.')
  return {'inputs': ' '.join(map(str, symbols)), 'targets': ' '.join(map(str, out))}


def validate_params(params: dict) -> None:
  """Raises ValueError naming the field if the generation parameters are inconsistent."""
  if params['task'] not in ALGORITHMIC_TASKS:
    raise ValueError(f"algorithmic task={params['task']!r}; allowed: {ALGORITHMIC_TASKS}.")
  for name in ('train_length', 'test_length'):
    lo, hi = params[name]
    if not 1 <= lo <= hi:
      raise ValueError(f'algorithmic {name}={params[name]} must satisfy 1 <= min <= max.')
  if params['task'] != 'addition' and params['num_symbols'] < 1:
    raise ValueError(f"algorithmic num_symbols={params['num_symbols']} must be >= 1.")
  for split in ('train', 'validation', 'test'):
    if params[f'num_{split}'] < 1:
      raise ValueError(f"algorithmic num_{split}={params[f'num_{split}']} must be >= 1.")


def generate_split(params: dict, split: str) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (index, example) for `split` in 'train' | 'validation' | 'test'."""
  lo, hi = params['test_length'] if split == 'test' else params['train_length']
  for i in range(params[f'num_{split}']):
    rng = random.Random(f"{params['seed']}/{split}/{i}")
    yield i, make_example(params['task'], rng, min_length=lo, max_length=hi,
                          num_symbols=params['num_symbols'])
