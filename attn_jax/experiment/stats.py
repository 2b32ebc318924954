"""Intervals for results over seeds: what a study may claim about a difference.

    mean, half = t_interval([0.81, 0.79, 0.84])      # 95% t-interval over seeds
    significant = intervals_disjoint((m1, h1), (m2, h2))

A t-interval treats the seeds' results as a sample of the training procedure's outcomes: with
n seeds, `mean +- t_{n-1, 0.975} * sd / sqrt(n)`. With 3 seeds t is 4.30, so only large,
consistent differences clear it; a study says so rather than reading its means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """`(mean, half_width)` of the t-interval of `values`' mean; half_width is NaN for one value.

  Raises:
    ValueError: no values, or a confidence outside (0, 1).
  """
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence={confidence} must be in (0, 1)')
  values = [float(v) for v in values]
  if not values:
    raise ValueError('t_interval of no values')
  n = len(values)
  mean = math.fsum(values) / n
  if n == 1:
    return mean, math.nan
  sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def intervals_disjoint(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """Whether two `(mean, half_width)` intervals do not overlap (a conservative reading of a
  difference; NaN widths never count as disjoint)."""
  (ma, ha), (mb, hb) = a, b
  if math.isnan(ha) or math.isnan(hb):
    return False
  return abs(ma - mb) > ha + hb
