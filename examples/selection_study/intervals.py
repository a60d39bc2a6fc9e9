"""Paired differences between two losses over the same seeds, with their 95% intervals.

Two losses trained on the same seeds share the data, the initialisation and the batch order,
so a claim that one ends above the other is a claim about their per-seed differences
:math:`d_s = a_s - b_s`. The interval is Student's t over those differences:
:math:`\\bar d \\pm t_{0.975,\\,n-1}\\, s_d / \\sqrt{n}`. With a handful of seeds it is wide (at
n = 5, t is 2.78 where a normal approximation would use 1.96, which covers the true mean in
only about 88% of repetitions); a difference whose interval holds 0 is not shown by the runs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import NamedTuple

#: Student's t quantile 0.975 by degrees of freedom (1 - 30, then 40, 60, 120).
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t_quantile(degrees: int) -> float:
    """Student's t 0.975 quantile; between tabulated degrees of freedom, the next lower one's
    (slightly larger: the interval errs wide)."""
    if degrees < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees}")
    return _T975[max(d for d in _T975 if d <= degrees)]


class PairedInterval(NamedTuple):
    """The mean of paired differences, its 95% interval, and over how many pairs."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """Whether the runs show a difference (the interval lies on one side of 0)."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if self.n == 0:
            return "no pairs"
        if not math.isfinite(self.mean):
            return "no value (a run without test metrics)"
        if self.n < 2:
            return f"{self.mean:+.2f} (one pair: no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_interval(a: Mapping[int, float], b: Mapping[int, float]) -> PairedInterval:
    """``a - b`` over the seeds both hold (a seed missing from either is left out)."""
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    return interval(differences)


def interval(differences: list[float]) -> PairedInterval:
    """The mean of ``differences`` and its Student-t 95% interval (NaN with no value; the
    mean alone, as its own bounds, with one)."""
    n = len(differences)
    if n == 0 or not all(math.isfinite(d) for d in differences):  # (a run without test metrics: --no-eval-test)
        return PairedInterval(math.nan, math.nan, math.nan, n)
    mean = statistics.fmean(differences)
    if n == 1:
        return PairedInterval(mean, mean, mean, 1)
    half = t_quantile(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n)


def leave_one_out(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, PairedInterval]:
    """Per seed both hold, the interval of ``a - b`` on the other seeds: how much a verdict rests
    on any single seed."""
    seeds = sorted(set(a) & set(b))
    return {dropped: paired_interval(*({s: x[s] for s in seeds if s != dropped} for x in (a, b))) for dropped in seeds}


def seeds_to_exclude_zero(difference: PairedInterval, most: int = 1000) -> int | None:
    """How many pairs an interval would need to lie on one side of 0, were the mean and the spread
    of the differences what ``difference`` observed (None: a mean of 0, fewer than two pairs, or
    more than ``most``). A planning figure, not a result."""
    if difference.n < 2 or not math.isfinite(difference.mean) or difference.mean == 0:
        return None
    spread = (difference.high - difference.mean) * math.sqrt(difference.n) / t_quantile(difference.n - 1)
    if spread == 0:
        return 2
    for n in range(2, most + 1):
        if t_quantile(n - 1) * spread / math.sqrt(n) < abs(difference.mean):
            return n
    return None
