"""Statistics over seeds for the method comparison (`make study`): intervals and paired tests.

A seed is one replicate of the whole chain (its own data draw, base model, SFT, reward model, pairs
and alignment runs), so seeds are the independent units; the methods of one seed share everything
upstream, so method against method is a paired comparison within seeds.

- Interval: Student's t 95% interval of the mean over seeds, mean ± t(0.975, n−1) · s / √n.
- Difference: the paired t-test over seeds of (a − b), two-sided, with its t interval.
- Many differences: Holm's step-down correction of their p-values (family-wise error rate 5%).

With 3 seeds t(0.975, 2) = 4.30: an interval is wide, and only a large, consistent difference is
significant. That is the honest reading of 3 runs, not a defect of the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95


@dataclass
class Estimate:
    """mean ± half (a t interval at LEVEL; None with fewer than 2 values) over n values."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half


@dataclass
class Difference:
    """Paired difference a − b over seeds: its estimate, the two-sided p-value of the paired t-test
    (None when it cannot be tested: fewer than 2 seeds, or the same difference on every seed, which
    leaves no spread to test against) and the p-value after Holm's correction over its family."""

    estimate: Estimate
    p: float | None
    p_holm: float | None = None

    def significant(self, alpha: float = 1 - LEVEL) -> bool:
        p = self.p_holm if self.p_holm is not None else self.p
        return p is not None and p < alpha


def t_quantile(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def estimate(values: list[float]) -> Estimate:
    """Mean and t interval of values (one per seed)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, t_quantile(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n), n)


def paired(a: list[float], b: list[float]) -> Difference:
    """a − b seed by seed (a[i] and b[i] from the same seed): the paired t-test."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    est = estimate(diffs)
    if est.n < 2 or est.half == 0.0:
        return Difference(est, None)
    from scipy.stats import t

    se = est.half / t_quantile(0.5 + LEVEL / 2, est.n - 1)
    return Difference(est, float(2 * t.sf(abs(est.mean) / se, est.n - 1)))


def holm(diffs: list[Difference]) -> list[Difference]:
    """Set p_holm on each difference (in place; returned): the i-th smallest of m p-values is multiplied
    by (m − i + 1), made non-decreasing in that order, capped at 1 (Holm 1979)."""
    tested = sorted((d for d in diffs if d.p is not None), key=lambda d: d.p)
    m, running = len(tested), 0.0
    for i, d in enumerate(tested):
        running = max(running, min(1.0, (m - i) * d.p))
        d.p_holm = running
    return diffs
