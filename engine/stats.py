"""The few statistics a seeded sweep reports: mean, sample sd, Student's t quantile, a paired interval.

No scipy: the t quantile is the exact inverse of Student's t CDF, found by bisection on

    F(t; nu) = 1 - I_x(nu/2, 1/2) / 2,   x = nu / (nu + t^2),   t >= 0

where I_x(a, b) is the regularised incomplete beta function, evaluated by its continued fraction
(modified Lentz; Press et al., Numerical Recipes 3rd ed., section 6.4). Checked against the printed
tables: t_{0.975,1} = 12.706, t_{0.975,4} = 2.776, t_{0.975,9} = 2.262, t_{0.975,30} = 2.042.

A paired difference (same seed, two settings) is the mean of d_i = a_i - b_i with the interval
mean(d) -/+ t_{(1+level)/2, n-1} * sd(d) / sqrt(n) (sample sd, n - 1 in the denominator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def sample_sd(values: Iterable[float]) -> float | None:
    """The sample standard deviation (n - 1 in the denominator); None below two values."""
    values = list(values)
    if len(values) < 2:
        return None
    centre = sum(values) / len(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError("a and b must be positive")
    if not 0.0 <= x <= 1.0:
        raise ValueError("x must lie in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    if dof <= 0:
        raise ValueError("degrees of freedom must be positive")
    tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p: the exact inverse of ``t_cdf`` by bisection (to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie strictly between 0 and 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:  # 1 dof and p = 0.9995 needs 636.6; doubling finds any bracket quickly
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean with its sample sd and a two-sided t interval; sd and the bounds are None below two values."""

    mean: float | None
    sd: float | None
    n: int
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean -/+ t_{(1+level)/2, n-1} sd / sqrt(n)."""
    values = list(values)
    n, centre, sd = len(values), mean(values), sample_sd(values)
    if sd is None or centre is None:
        return Interval(centre, None, n, None, None, level)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(centre, sd, n, centre - half, centre + half, level)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The paired difference a - b (a[i] and b[i] from the same seed) with its t interval."""
    if len(a) != len(b):
        raise ValueError("a paired difference needs the same number of values on each side")
    return mean_interval([x - y for x, y in zip(a, b)], level)
