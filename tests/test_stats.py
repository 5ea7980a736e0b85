"""asft_repro/stats.py against closed forms: binomial standard errors and quantiles, exact McNemar, Holm, MDE."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from asft_repro import stats


def zeros_ones(n: int, k: int) -> np.ndarray:
    """n items, the first k right."""
    return (np.arange(n) < k).astype(float)


def paired(b: int, c: int, both: int = 5, neither: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """0/1 paired scores with b items only a gets right, c only b gets right."""
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, dtype=float)
    other = np.array([0] * b + [1] * c + [1] * both + [0] * neither, dtype=float)
    return a, other


def mcnemar_exact(b: int, c: int) -> float:
    """p = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))."""
    m = b + c
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2 ** m)


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q - 1e-12:
            return k
    return n


def test_stderr_is_the_binomial_standard_error():
    for n, k in [(30, 7), (500, 231), (4183, 1500)]:
        p = k / n
        assert stats.stderr(zeros_ones(n, k)) == pytest.approx(math.sqrt(p * (1 - p) / n), rel=1e-12)
    parts = [zeros_ones(30, 7), zeros_ones(500, 231)]
    expected = math.sqrt(sum(stats.stderr(x) ** 2 for x in parts)) / 2
    assert stats.average_stderr(parts) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n,k", [(30, 9), (40, 30), (500, 200)])
def test_bootstrap_interval_of_01_scores_is_the_binomial_quantiles(n, k):
    """Resampling n items of a 0/1 benchmark draws n * mean ~ Binomial(n, k / n): its 2.5% / 97.5% quantiles."""
    low, high = stats.bootstrap_ci(zeros_ones(n, k))
    assert abs(low * n - binomial_quantile(n, k / n, 0.025)) <= 1
    assert abs(high * n - binomial_quantile(n, k / n, 0.975)) <= 1
    assert stats.bootstrap_ci(zeros_ones(n, k)) == (low, high)  # fixed seed


def test_stratified_bootstrap_keeps_each_benchmark_and_matches_the_analytic_error():
    """A 30-item and a 500-item benchmark: the average's bootstrap sd is sqrt(se1^2 + se2^2) / 2, its mean the average."""
    parts = [zeros_ones(30, 6), zeros_ones(500, 300)]
    draws = stats.bootstrap_draws([parts])
    assert draws.mean() == pytest.approx((0.2 + 0.6) / 2, abs=0.002)
    assert draws.std() == pytest.approx(stats.average_stderr(parts), rel=0.03)
    pooled_se = stats.stderr(np.concatenate(parts))  # pooling the items would weigh items, not benchmarks
    assert abs(draws.std() - pooled_se) > 0.01
    iv = stats.score_interval(parts)
    assert iv.value == pytest.approx(0.4) and iv.n_items == 530 and iv.n_runs == 1 and math.isnan(iv.seeds_std)
    assert (iv.low, iv.high) == pytest.approx(stats.stratified_bootstrap_ci(parts))
    assert iv.low < iv.value < iv.high and iv.stderr == pytest.approx(stats.average_stderr(parts))


def test_mean_acc_scores_resample_items_not_samples():
    """Items' means over 4 samples: the interval is the items' bootstrap, sd close to std / sqrt(n)."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=300) / 4
    draws = stats.bootstrap_draws([[x]])
    assert draws.std() == pytest.approx(x.std() / math.sqrt(300), rel=0.04)


def test_seeds_add_their_variation():
    rng = np.random.default_rng(0)
    one = (rng.random(200) < 0.4).astype(float)
    same = stats.score_interval([np.vstack([one, one, one])])
    single = stats.score_interval([one])
    assert same.value == pytest.approx(single.value) and same.seeds_std == pytest.approx(0.0, abs=1e-12) and same.n_runs == 3
    assert same.high - same.low == pytest.approx(single.high - single.low, rel=0.1)
    shifted = np.vstack([one, (rng.random(200) < 0.6).astype(float), (rng.random(200) < 0.2).astype(float)])
    wide = stats.score_interval([shifted])
    per_seed = shifted.mean(axis=1)
    assert wide.value == pytest.approx(per_seed.mean()) and wide.seeds_std == pytest.approx(per_seed.std(ddof=1))
    assert wide.stderr == pytest.approx(math.sqrt(stats.stderr(shifted.mean(axis=0)) ** 2 + per_seed.var(ddof=1) / 3))
    assert wide.high - wide.low > 2 * (single.high - single.low)  # the seeds disagree by 20 points


@pytest.mark.parametrize("b,c", [(0, 0), (3, 3), (1, 9), (12, 4), (37, 18), (150, 110)])
def test_sign_flip_on_01_scores_is_the_exact_mcnemar_test(b, c):
    a, other = paired(b, c)
    comparison = stats.paired_comparison([a], [other])
    assert comparison.p_value == pytest.approx(mcnemar_exact(b, c), rel=1e-9, abs=1e-300)
    assert comparison.test == "exact"
    n = len(a)
    assert comparison.delta == pytest.approx((b - c) / n) and comparison.n_items == n
    assert comparison.discordance == pytest.approx((b + c) / n)


def test_exact_enumeration_matches_brute_force_and_random_flips_approximate_it():
    w = np.array([0.3, -0.1, 0.25, 0.3, -0.05, 0.1, 0.2, -0.3, 0.15, 0.1])
    observed = abs(w.sum())
    brute = np.mean([abs(np.dot(signs, np.abs(w))) >= observed - 1e-12
                     for signs in itertools.product([-1, 1], repeat=len(w))])
    p, how = stats.sign_flip_pvalue(w)
    assert how == "exact" and p == pytest.approx(brute, rel=1e-9)
    approx, how = stats.sign_flip_pvalue(w, max_exact=4)
    assert how == "random flips" and approx == pytest.approx(brute, abs=0.02)
    assert stats.sign_flip_pvalue(w, max_exact=4) == (approx, how)  # seeded
    assert stats.sign_flip_pvalue(np.zeros(5)) == (1.0, "exact")


def test_paired_bootstrap_interval_and_identical_sides():
    a, other = paired(40, 10, both=100, neither=60)
    comparison = stats.paired_comparison([a], [other])
    assert comparison.low < comparison.delta < comparison.high and comparison.low > 0
    d = a - other  # the paired bootstrap of the mean difference: sd close to std(d) / sqrt(n)
    assert (comparison.high - comparison.low) / (2 * 1.96) == pytest.approx(d.std() / math.sqrt(len(d)), rel=0.08)
    same = stats.paired_comparison([a], [a])
    assert (same.delta, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same items"):
        stats.paired_comparison([a], [other[:-1]])


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # 2 x 0.5 capped at 1; step-down keeps it monotone
    adjusted = stats.holm([0.01, float("nan"), 0.02])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)


def test_minimum_detectable_effect():
    z = 1.959963984540054 + 0.8416212335729143
    assert stats.mde_from_discordance([500], 0.25) == pytest.approx(z * math.sqrt(0.25 / 500))
    assert stats.mde_from_discordance([500, 675], 0.2) == pytest.approx(z * math.sqrt(0.2 / 500 + 0.2 / 675) / 2)
    # an effect needs its own discordant items: with few items the floor z^2 / n decides (AIME24: 26 points)
    assert stats.mde_from_discordance([30], 0.25) == pytest.approx(max(z * math.sqrt(0.25 / 30), z ** 2 / 30))
    assert stats.mde_from_discordance([24], 0.0) == pytest.approx(z ** 2 / 24) and z ** 2 / 24 > 0.3
    assert stats.mde_from_discordance([30], 0.25, binary=False) == pytest.approx(z * math.sqrt(0.25 / 30))
    assert stats.mde_from_discordance([2], 0.5) == math.inf
    a, other = paired(6, 3, both=10, neither=11)  # 30 items, 9 discordant
    comparison = stats.paired_comparison([a], [other])
    assert comparison.mde == pytest.approx(stats.mde_from_discordance([30], 9 / 30))
    assert comparison.mde > 0.25  # AIME24-sized: a quarter of the scale cannot be told apart
    agree = stats.paired_comparison([a], [a])
    assert agree.discordance == 0.0 and agree.mde == pytest.approx(z ** 2 / 30)
    samples = stats.paired_comparison([np.full(400, 0.5)], [np.full(400, 0.25)])  # mean_acc: no 0/1 floor
    assert samples.mde == pytest.approx(z * math.sqrt(0.0625 / 400))
