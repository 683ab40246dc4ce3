"""engine.stats against printed tables and hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from engine.stats import incomplete_beta, mean, mean_interval, paired_interval, sample_sd, t_cdf, t_quantile


@pytest.mark.parametrize(
    "p, dof, expected",
    [  # any Student's t table, three decimals
        (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
        (0.95, 4, 2.132), (0.995, 9, 3.250), (0.9995, 1, 636.619), (0.975, 120, 1.980),
    ],
)
def test_t_quantile_matches_the_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_tends_to_the_normal_and_inverts_the_cdf():
    assert t_quantile(0.975, 100_000) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_quantile(0.5, 7) == 0.0
    for dof in (1, 3, 12):
        for p in (0.6, 0.9, 0.99):
            assert t_cdf(t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-10)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_cdf_closed_forms():
    # one dof is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi; two dof: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_incomplete_beta_closed_forms():
    assert incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)
    assert incomplete_beta(3, 1, 0.5) == pytest.approx(0.125)  # I_x(a, 1) = x^a
    # I_0.4(2, 3) = P(Binomial(4, 0.4) >= 2) = 0.3456 + 0.1536 + 0.0256
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert incomplete_beta(2, 3, 0.0) == 0.0 and incomplete_beta(2, 3, 1.0) == 1.0


def test_mean_and_sample_sd():
    assert mean([1.0, 2.0, 6.0]) == 3.0 and mean([]) is None
    assert sample_sd([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    assert sample_sd([5.0]) is None


def test_paired_interval_by_hand():
    a, b = [0.80, 0.82, 0.85, 0.90, 0.83], [0.78, 0.80, 0.80, 0.86, 0.84]
    d = [0.02, 0.02, 0.05, 0.04, -0.01]
    interval = paired_interval(a, b)
    sd = math.sqrt(sum((x - 0.024) ** 2 for x in d) / 4)
    assert interval.n == 5 and interval.mean == pytest.approx(0.024)
    assert interval.sd == pytest.approx(sd)
    assert interval.half_width == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-6)
    assert interval.low == pytest.approx(0.024 - interval.half_width)
    assert not interval.excludes_zero  # -0.005 .. 0.053
    single = paired_interval([0.9], [0.8])
    assert single.mean == pytest.approx(0.1) and single.sd is None and single.low is None and single.half_width is None
    assert mean_interval([1.0, 1.0, 1.0]).half_width == 0.0
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0])
