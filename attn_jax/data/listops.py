"""ListOps following the Long Range Arena recipe (Tay et al., 2020; Nangia & Bowman, 2018).

An example is a nested list expression over the digits 0-9 and four operators, its label the
value (10 classes):

    '[MAX 2 9 [MIN 4 7 ] 0 ]'  -> 9

    [MAX  maximum          [MIN  minimum
    [MED  median (LRA: int(np.median), i.e. the mean of the middle two floored)
    [SM   sum modulo 10    ]     closes the innermost open operator

As in LRA's generator, a node at depth < max_depth is an operator with probability
`operator_prob` (LRA: 1 - VALUE_P = 0.25) with randint(2, max_args) arguments, otherwise a digit;
trees are drawn until their token count (operators, digits and ']', no parentheses) lies in
[min_length, max_length]. Unlike LRA's TSV we do not write the redundant '(' ')' tokens, which
would double sequence length without adding information.

Generation is the expensive part at LRA sizes, so a draw is abandoned as soon as it grows past
`max_length` (most rejected trees are far too large) and the value is computed while the tree is
built, never by re-parsing. Each example has its own `random.Random(f'{seed}/{split}/{index}')`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

OPERATORS = ('[MAX', '[MIN', '[MED', '[SM')
END = ']'
DIGITS = tuple(str(d) for d in range(10))
VOCABULARY = OPERATORS + (END,) + DIGITS
NUM_CLASSES = 10


class _TooLong(Exception):
  pass


def _apply(op: str, args: list[int]) -> int:
  if op == '[MAX':
    return max(args)
  if op == '[MIN':
    return min(args)
  if op == '[SM':
    return sum(args) % 10
  s = sorted(args)  # '[MED'
  n = len(s)
  return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def _tree(rng: random.Random, depth: int, tokens: list[str], *, max_depth: int, max_args: int,
          operator_prob: float, max_length: int) -> int:
  """Appends one subtree's tokens to `tokens` and returns its value."""
  if depth < max_depth and rng.random() < operator_prob:
    op = OPERATORS[rng.randrange(4)]
    tokens.append(op)
    args = [_tree(rng, depth + 1, tokens, max_depth=max_depth, max_args=max_args,
                  operator_prob=operator_prob, max_length=max_length)
            for _ in range(rng.randint(2, max_args))]
    tokens.append(END)
    if len(tokens) > max_length:
      raise _TooLong
    return _apply(op, args)
  value = rng.randrange(10)
  tokens.append(DIGITS[value])
  if len(tokens) > max_length:
    raise _TooLong
  return value


def make_example(rng: random.Random, *, min_length: int, max_length: int, max_depth: int,
                 max_args: int, operator_prob: float, max_tries: int = 100_000
                 ) -> dict[str, object]:
  """{'text': str, 'label': int} with min_length <= token count <= max_length."""
  for _ in range(max_tries):
    tokens: list[str] = []
    try:
      # The root (depth 1) is always an operator: LRA rejects its lone-digit roots anyway, so
      # the accepted trees have the same distribution, minus the wasted draws.
      op = OPERATORS[rng.randrange(4)]
      tokens.append(op)
      args = [_tree(rng, 2, tokens, max_depth=max_depth, max_args=max_args,
                    operator_prob=operator_prob, max_length=max_length)
              for _ in range(rng.randint(2, max_args))]
      tokens.append(END)
      if len(tokens) > max_length:
        raise _TooLong
      value = _apply(op, args)
    except _TooLong:
      continue
    if len(tokens) >= min_length:
      return {'text': ' '.join(tokens), 'label': value}
  raise ValueError(f'ListOps: no tree with {min_length} <= length <= {max_length} in {max_tries} '
                   f'draws (max_depth={max_depth}, max_args={max_args}, '
                   f'operator_prob={operator_prob}); widen the range or raise max_depth/max_args.')


def validate_params(params: dict) -> None:
  """Raises ValueError naming the field if the generation parameters are inconsistent."""
  lo, hi = params['length']
  if not 3 <= lo <= hi:
    raise ValueError(f"listops length={params['length']} must satisfy 3 <= min <= max.")
  if params['max_depth'] < 1:
    raise ValueError(f"listops max_depth={params['max_depth']} must be >= 1.")
  if params['max_args'] < 2:
    raise ValueError(f"listops max_args={params['max_args']} must be >= 2.")
  if not 0.0 < params['operator_prob'] < 1.0:
    raise ValueError(f"listops operator_prob={params['operator_prob']} must be in (0, 1).")
  for split in ('train', 'validation', 'test'):
    if params[f'num_{split}'] < 1:
      raise ValueError(f"listops num_{split}={params[f'num_{split}']} must be >= 1.")


def generate_split(params: dict, split: str) -> Iterator[tuple[int, dict[str, object]]]:
  """Yields (index, {'text', 'label'}) for `split` in 'train' | 'validation' | 'test'."""
  lo, hi = params['length']
  for i in range(params[f'num_{split}']):
    rng = random.Random(f"{params['seed']}/{split}/{i}")
    yield i, make_example(rng, min_length=lo, max_length=hi, max_depth=params['max_depth'],
                          max_args=params['max_args'], operator_prob=params['operator_prob'])
