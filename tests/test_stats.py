"""The study's statistics, against values worked out by hand (and scipy's own paired t-test)."""

import math

import pytest

from stages.core import stats


def test_the_t_interval_of_three_seeds():
    """[1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.3027 → half-width 4.3027 / √3 = 2.4841."""
    e = stats.estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.n == 3
    assert e.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (e.low, e.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-6)
    one = stats.estimate([0.7])
    assert one.mean == 0.7 and one.half is None and one.low is None  # one seed: no interval


def test_the_paired_t_test_by_hand_and_against_scipy():
    """a − b = [2, 3, 4]: mean 3, s = 1, t = 3 / (1/√3) = 5.196 on 2 dof. With 2 dof the t tail has a
    closed form, P(T > t) = ½ (1 − t / √(t² + 2)) = ½ (1 − 5.196 / √29) = 0.017550, so p = 0.035099."""
    from scipy.stats import ttest_rel

    d = stats.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert d.estimate.mean == 3.0
    assert d.p == pytest.approx(1 - math.sqrt(27) / math.sqrt(29), rel=1e-6)
    assert d.significant()
    a, b = [0.61, 0.70, 0.52, 0.66], [0.60, 0.72, 0.47, 0.61]
    assert stats.paired(a, b).p == pytest.approx(ttest_rel(a, b).pvalue, rel=1e-9)
    assert not stats.paired(a, b).significant()  # 3 of 4 seeds up, one down: not separated
    assert stats.paired([1.0, 2.0], [0.0, 1.0]).p is None  # the same difference every seed: nothing to test
    assert stats.paired([0.5], [0.4]).p is None


def test_holm_multiplies_the_ith_smallest_by_m_minus_i_and_keeps_the_order():
    """p = 0.01, 0.04, 0.03 → sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 → made
    non-decreasing: 0.03, 0.06, 0.06."""
    diffs = [stats.Difference(stats.Estimate(0, None, 3), p) for p in (0.01, 0.04, 0.03)]
    stats.holm(diffs)
    assert [d.p_holm for d in diffs] == pytest.approx([0.03, 0.06, 0.06])
    assert [d.significant() for d in diffs] == [True, False, False]
