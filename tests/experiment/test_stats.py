"""The ablation's statistics against values computed by hand (and Welch's test against
scipy's own implementation), and the bootstrap's fixed-seed behaviour on cases whose answer
is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from attn_jax.experiment import stats

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def test_t_interval_of_three_seeds():
  mean, half = stats.t_interval([1.0, 2.0, 3.0])  # sd 1, sem 1/sqrt(3)
  assert mean == 2.0
  assert half == pytest.approx(T_975_DF2 / math.sqrt(3), rel=1e-9)  # 2.4841...
  mean, half = stats.t_interval([0.5, 0.5])
  assert (mean, half) == (0.5, 0.0)
  mean, half = stats.t_interval([0.5])  # one seed: a mean, no interval
  assert mean == 0.5 and math.isnan(half)
  with pytest.raises(ValueError, match='at least 1 finite values'):
    stats.t_interval([float('nan')])


def test_standard_errors():
  assert stats.binomial_se(0.5, 2000) == pytest.approx(math.sqrt(0.25 / 2000))  # 0.01118
  assert stats.mean_se([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3) / 2)
  # Weighted (bits per character over rows of 1, 1, 2, 2 characters): mean 17/6; the
  # linearized residuals w (x - mean) / mean(w) are -11/9, -5/9, 2/9, 14/9.
  resid = np.array([-11, -5, 2, 14]) / 9
  want = math.sqrt(np.sum(resid ** 2) / 3) / 2
  assert stats.mean_se([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(want)
  with pytest.raises(ValueError, match='binomial_se'):
    stats.binomial_se(1.5, 10)


def test_welch_difference_by_hand_and_against_scipy():
  a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
  diff, half, p = stats.welch_difference(a, b)
  se = math.sqrt(1 / 3 + 4 / 3)
  df = 50 / 17  # (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2)
  assert diff == -2.0
  assert half == pytest.approx(scipy_stats.t.ppf(0.975, df) * se)
  assert p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
  assert stats.welch_difference([1.0, 1.0], [1.0, 1.0]) == (0.0, 0.0, 1.0)


def test_holm_step_down():
  # Sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
  assert stats.holm([0.2, 0.001]) == [False, True]
  assert stats.holm([]) == []


def test_bootstrap_interval_with_a_fixed_seed():
  # Constant groups: every resample has the same mean.
  assert stats.bootstrap_interval([[0.5] * 10, [0.5] * 7], seed=0) == (0.5, 0.5)
  # Two seeds at 0 and 1: the resampled pair is (0,0), (0,1), (1,0) or (1,1), so the mean is
  # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4 and the 95% interval spans [0, 1].
  assert stats.bootstrap_interval([[0.0] * 50, [1.0] * 50], seed=0) == (0.0, 1.0)
  # One seed of 400 examples, half right: the examples' interval, 0.5 +- 1.96 * 0.025.
  lo, hi = stats.bootstrap_interval([[0.0, 1.0] * 200], seed=3, samples=4000)
  assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
  again = stats.bootstrap_interval([[0.0, 1.0] * 200], seed=3, samples=4000)
  assert again == (lo, hi)  # the seed fixes the result
