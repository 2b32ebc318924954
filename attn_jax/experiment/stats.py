"""Intervals and tests for comparing runs over seeds (the ablation's and context study's).

    mean, half = t_interval([0.54, 0.58, 0.51])          # mean +- half: a 95% interval
    lo, hi = bootstrap_interval([run0_examples, run1_examples, run2_examples], seed=0)
    diff, half, p = welch_difference(variant_seeds, baseline_seeds)
    significant = holm(p_values)                          # across the comparisons of a column

- `t_interval`: Student's t interval of the mean over seeds (the runs are the samples: what a
  rerun with a new seed would vary by). With 3 seeds the multiplier is t(0.975, 2) = 4.30, so
  only large, consistent differences clear it; one seed gives no interval (NaN).
- `bootstrap_interval`: a two-level percentile bootstrap, seeds resampled and, within each,
  the eval examples: for when seeds are few, it also counts the eval set's sampling error.
- `binomial_se` / `mean_se`: one run's standard error from its eval examples (accuracy:
  binomial; token accuracy or bits per character: the examples' standard deviation / sqrt(n)).
- `welch_difference`: a variant minus the baseline, Welch's t interval and two-sided p-value
  (unequal variances); `holm` marks which of several p-values stay significant under Holm's
  step-down correction (the family-wise error rate at `alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


def _values(values: Sequence[float], name: str, least: int) -> np.ndarray:
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or len(x) < least or not np.all(np.isfinite(x)):
    raise ValueError(f'{name} needs at least {least} finite values, got {list(values)}')
  return x


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """`(mean, half width)` of the Student t interval of the mean of `values`; the half width
  is NaN for a single value (one seed gives no interval, and a table says so)."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence={confidence} must be in (0, 1)')
  x = _values(values, 't_interval', 1)
  if len(x) == 1:
    return float(x[0]), math.nan
  sem = np.std(x, ddof=1) / math.sqrt(len(x))
  return float(np.mean(x)), float(scipy_stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * sem)


def bootstrap_interval(groups: Sequence[Sequence[float]], *, seed: int, samples: int = 2000,
                       confidence: float = 0.95) -> tuple[float, float]:
  """Percentile interval of the mean over groups (seeds) of each group's mean (its examples),
  resampling the groups and, inside each, the examples, with `numpy.random.default_rng(seed)`.
  """
  arrays = [_values(g, 'bootstrap_interval group', 1) for g in groups]
  if not arrays:
    raise ValueError('bootstrap_interval needs at least one group')
  rng = np.random.default_rng(seed)
  means = np.empty(samples)
  for i in range(samples):
    picked = rng.integers(len(arrays), size=len(arrays))
    means[i] = np.mean([np.mean(rng.choice(arrays[g], size=len(arrays[g]))) for g in picked])
  tail = (1 - confidence) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(lo), float(hi)


def binomial_se(p: float, n: int) -> float:
  """Standard error of an accuracy `p` measured on `n` independent examples."""
  if n <= 0 or not 0.0 <= p <= 1.0:
    raise ValueError(f'binomial_se needs 0 <= p <= 1 and n > 0, got p={p}, n={n}')
  return math.sqrt(p * (1 - p) / n)


def mean_se(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
  """Standard error of the (weighted) mean of per-example `values` (a ratio estimator's
  linearization with weights: bits per character over rows of unequal length)."""
  x = _values(values, 'mean_se', 2)
  if weights is None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x)))
  w = _values(weights, 'mean_se weights', 2)
  mean = np.sum(w * x) / np.sum(w)
  resid = w * (x - mean) / np.mean(w)
  return float(np.std(resid, ddof=1) / math.sqrt(len(x)))


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95
                     ) -> tuple[float, float, float]:
  """`mean(a) - mean(b)`, the half width of Welch's t interval of it, and the two-sided
  p-value of no difference. Identical constant samples give half width 0 and p = 1."""
  x, y = _values(a, 'welch_difference a', 2), _values(b, 'welch_difference b', 2)
  va, vb = np.var(x, ddof=1) / len(x), np.var(y, ddof=1) / len(y)
  diff = float(np.mean(x) - np.mean(y))
  se = math.sqrt(va + vb)
  if se == 0.0:
    return diff, 0.0, 1.0 if diff == 0.0 else 0.0
  df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df) * se)
  p = float(2 * scipy_stats.t.sf(abs(diff) / se, df))
  return diff, half, p


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
  """Which hypotheses Holm's step-down procedure rejects at family-wise level `alpha`: the
  k-th smallest p-value (from 0) is compared with alpha / (m - k) until one fails."""
  order = np.argsort(p_values, kind='stable')
  rejected = [False] * len(p_values)
  for k, i in enumerate(order):
    if p_values[i] > alpha / (len(p_values) - k):
      break
    rejected[i] = True
  return rejected
