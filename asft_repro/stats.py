"""Uncertainty of benchmark scores: bootstrap intervals, standard errors, paired tests, Holm, detectable effects.

Pure functions over per-item score arrays, values as fractions (0-1; callers scale to points). A score array
is 1-D (one run: one score per item, 0/1 or an item's mean over its samples) or 2-D ``(runs, items)`` (the
seeds of one cell, scored on the same items). A domain average is a list of such arrays, one per benchmark,
averaged as the paper averages: the mean of the benchmark scores.

* Bootstrap (percentile, ``N_RESAMPLES`` resamples, fixed ``SEED``): items are resampled within each benchmark
  (stratified); with several runs, runs are resampled too (once per resample, shared by all benchmarks: a seed
  is a whole training run), and the resampled items are shared by the resampled runs. In a paired comparison
  the two cells share the resampled items. Resampling n items is drawn as multinomial counts over the distinct
  item patterns (exactly the same distribution), which makes 10,000 resamples of thousands of items cheap.
* Standard error: ``std(x) / sqrt(n)`` (plug-in, = ``sqrt(p (1 - p) / n)`` for 0/1 scores); a domain
  average ``sqrt(sum se_b^2) / K``; with several runs, plus the between-run variance of the mean (``sd^2 / R``).
* Paired test: a two-sided sign-flip permutation test of the mean paired difference over items (each item's
  difference keeps its size, its sign is flipped at random under the null). Exact (enumerated over the counts
  of positive signs per distinct difference size) when that grid has at most ``MAX_EXACT_GRID`` points; for
  0/1 scores it is then the exact McNemar test. Otherwise ``N_FLIPS`` random flips with ``SEED``.
* Holm step-down adjustment; minimum detectable effect of a paired comparison at 80% power, two-sided 5%
  (normal approximation at the observed discordance; for 0/1 scores at least z^2 / n, see ``mde_from_discordance``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

N_RESAMPLES = 10_000
SEED = 0
ALPHA = 0.05
POWER = 0.8
N_FLIPS = 10_000
MAX_EXACT_GRID = 2 ** 20  # exact sign-flip distribution when it has at most this many points
MULTINOMIAL_MAX_PATTERNS = 64  # more distinct item patterns than this: resample by index, in chunks
# The share of items two methods score differently, assumed where no records measure it (asft_repro.plan).
# Two fine-tunes of one base model typically disagree on a fifth to a third of math items; 0.25 is the middle.
DEFAULT_DISCORDANCE = 0.25

Scores = np.ndarray  # (items,) or (runs, items)


@dataclass(frozen=True)
class Interval:
    """A score with its 95% bootstrap interval and analytic standard error (fractions, 0-1)."""

    value: float
    low: float
    high: float
    stderr: float
    n_items: int
    n_runs: int
    seeds_std: float  # std over runs of the run scores (nan for one run)


@dataclass(frozen=True)
class Comparison:
    """a - b with its paired 95% bootstrap interval, sign-flip p-value and minimum detectable effect (0-1)."""

    delta: float
    low: float
    high: float
    p_value: float
    test: str  # "exact" or "random flips"
    n_items: int
    mde: float
    discordance: float  # mean squared paired item difference (= share of discordant items for 0/1 scores)


def _runs(x: Scores) -> np.ndarray:
    """``x`` as a float (runs, items) array."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected (items,) or (runs, items) scores with at least one item, got shape {arr.shape}")
    return arr


def stderr(x: Scores) -> float:
    """Standard error of the mean over items: ``std(x) / sqrt(n)`` (= ``sqrt(p (1 - p) / n)`` for 0/1 scores)."""
    arr = np.asarray(x, dtype=float)
    return float(arr.std() / math.sqrt(arr.size))


def average_stderr(parts: Sequence[Scores]) -> float:
    """Standard error of the mean of independent benchmark scores: ``sqrt(sum se_b^2) / K``."""
    return math.sqrt(sum(stderr(p) ** 2 for p in parts)) / len(parts)


def _resampled_means(x: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, runs): each run's mean over the same resampled items (items with replacement)."""
    runs, n = x.shape
    patterns, inverse = np.unique(x.T, axis=0, return_inverse=True)  # (K, runs): the distinct item columns
    if len(patterns) <= max(MULTINOMIAL_MAX_PATTERNS, n // 5):  # counts per pattern: cheaper than per item
        freq = np.bincount(inverse.ravel(), minlength=len(patterns)) / n
        counts = rng.multinomial(n, freq / freq.sum(), size=n_resamples)  # (resamples, K)
        return counts @ patterns / n
    out = np.empty((n_resamples, runs))
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
        counts = np.bincount(idx.ravel(), minlength=m * n).reshape(m, n)  # each item's count in each resample
        out[start:start + m] = counts.astype(float) @ x.T / n
    return out


def bootstrap_draws(cells: Sequence[Sequence[Scores]], coefs: Sequence[float] | None = None,
                    n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap draws of ``sum_c coefs[c] * mean_b mean_runs mean_items cells[c][b]``.

    ``cells[c][b]``: cell c's scores on benchmark b, (items,) or (runs_c, items); all cells share each benchmark's
    items in the same order (paired). Items are resampled per benchmark and shared by the cells; each cell's runs
    are resampled once per draw and shared by its benchmarks.
    """
    coefs = [1.0] * len(cells) if coefs is None else list(coefs)
    rng = np.random.default_rng(seed)
    arrays = [[_runs(x) for x in cell] for cell in cells]
    n_runs = [cell[0].shape[0] for cell in arrays]
    n_bench = len(arrays[0])
    if any(len(cell) != n_bench for cell in arrays) or any(x.shape[0] != r for cell, r in zip(arrays, n_runs) for x in cell):
        raise ValueError("every cell needs the same benchmarks, and the same runs on each")
    if any(len({cell[b].shape[1] for cell in arrays}) != 1 for b in range(n_bench)):
        raise ValueError("the cells are scored on different numbers of items")
    if all(r == 1 for r in n_runs):  # one run per cell: resample each item's signed contribution directly
        return sum(_resampled_means(sum(coef * cell[b] for coef, cell in zip(coefs, arrays)), n_resamples, rng)[:, 0]
                   for b in range(n_bench)) / n_bench
    run_means = [np.zeros((n_resamples, r)) for r in n_runs]
    edges = np.cumsum([0, *n_runs])
    for b in range(n_bench):
        means = _resampled_means(np.vstack([cell[b] for cell in arrays]), n_resamples, rng)
        for c in range(len(arrays)):
            run_means[c] += means[:, edges[c]:edges[c + 1]] / n_bench
    total = np.zeros(n_resamples)
    for coef, means, r in zip(coefs, run_means, n_runs):
        weights = rng.multinomial(r, [1.0 / r] * r, size=n_resamples) / r if r > 1 else np.ones((n_resamples, 1))
        total += coef * (means * weights).sum(axis=1)
    return total


def percentile_interval(draws: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    low, high = np.percentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_ci(x: Scores, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of one benchmark's item scores (runs resampled too)."""
    return percentile_interval(bootstrap_draws([[x]], n_resamples=n_resamples, seed=seed))


def stratified_bootstrap_ci(parts: Sequence[Scores], n_resamples: int = N_RESAMPLES,
                            seed: int = SEED) -> tuple[float, float]:
    """95% interval of a domain average (mean of benchmark means), items resampled within each benchmark."""
    return percentile_interval(bootstrap_draws([list(parts)], n_resamples=n_resamples, seed=seed))


def score_interval(parts: Sequence[Scores], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """The score (mean of the benchmark means of ``parts``) with its interval and standard error."""
    arrays = [_runs(x) for x in parts]
    runs = arrays[0].shape[0]
    per_run = np.mean([x.mean(axis=1) for x in arrays], axis=0)  # (runs,): each run's score
    item_se = average_stderr([x.mean(axis=0) for x in arrays])
    seeds_std = float(per_run.std(ddof=1)) if runs > 1 else math.nan
    se = math.sqrt(item_se ** 2 + (seeds_std ** 2 / runs if runs > 1 else 0.0))
    low, high = percentile_interval(bootstrap_draws([arrays], n_resamples=n_resamples, seed=seed))
    return Interval(float(per_run.mean()), low, high, se, sum(x.shape[1] for x in arrays), runs, seeds_std)


def _weighted_differences(a_parts: Sequence[Scores], b_parts: Sequence[Scores]) -> np.ndarray:
    """Each item's contribution to the mean difference of the domain average: (mean_a - mean_b) / (K n_b)."""
    k = len(a_parts)
    return np.concatenate([(_runs(a).mean(axis=0) - _runs(b).mean(axis=0)) / (k * _runs(a).shape[1])
                           for a, b in zip(a_parts, b_parts)])


def _log_binomial_half(c: int) -> np.ndarray:
    """log P(J = j), j = 0..c, for J ~ Binomial(c, 1/2)."""
    j = np.arange(c + 1)
    lg = np.array([math.lgamma(v + 1) for v in range(c + 1)])
    return lg[c] - lg[j] - lg[c - j] - c * math.log(2)


def sign_flip_pvalue(w: np.ndarray, n_flips: int = N_FLIPS, seed: int = SEED,
                     max_exact: int = MAX_EXACT_GRID) -> tuple[float, str]:
    """Two-sided p-value of ``|sum w|`` under random signs of each ``w_i``, and how it was computed.

    Items of equal ``|w|`` are exchangeable: the statistic depends only on how many of each size are positive
    (binomial counts), so the null distribution is enumerated over that grid when it has at most ``max_exact``
    points (for 0/1 paired scores: one size, the exact McNemar test). Otherwise ``n_flips`` random flips, with
    p = (1 + #{|T*| >= |T|}) / (1 + n_flips).
    """
    mags = np.abs(np.asarray(w, dtype=float))
    mags = mags[mags > 0]
    if mags.size == 0:
        return 1.0, "exact"
    observed = abs(float(np.sum(w)))
    tol = 1e-9 * float(mags.sum())
    scale = float(mags.max())
    sizes, counts = np.unique(np.round(mags / scale, 12), return_counts=True)
    sizes = sizes * scale
    if math.prod(int(c) + 1 for c in counts) <= max_exact:
        total, logp = np.zeros(1), np.zeros(1)
        for size, c in zip(sizes, counts):
            j = np.arange(c + 1)
            total = (total[:, None] + size * (2 * j - c)[None, :]).ravel()
            logp = (logp[:, None] + _log_binomial_half(int(c))[None, :]).ravel()
        return float(min(1.0, np.exp(logp[np.abs(total) >= observed - tol]).sum())), "exact"
    rng = np.random.default_rng(seed)
    if len(sizes) <= 4 * MULTINOMIAL_MAX_PATTERNS:  # how many of each size are positive (cheaper than per item)
        stats = np.abs((2 * rng.binomial(counts, 0.5, size=(n_flips, len(counts))) - counts) @ sizes)
    else:  # one sign per item, in chunks
        chunk = max(1, 4_000_000 // mags.size)
        stats = np.concatenate([np.abs((rng.random((min(chunk, n_flips - start), mags.size)) < 0.5) @ (2 * mags) - mags.sum())
                                for start in range(0, n_flips, chunk)])
    return float((1 + np.count_nonzero(stats >= observed - tol)) / (1 + n_flips)), "random flips"


def mde_from_discordance(n_items: Sequence[int], discordance: float | Sequence[float] = DEFAULT_DISCORDANCE,
                         alpha: float = ALPHA, power: float = POWER, binary: bool = True) -> float:
    """Minimum detectable paired difference of the mean of benchmark scores (``n_items`` items each) at a
    discordance (mean squared item difference: the share of discordant items for 0/1 scores; one for all, or one
    per benchmark): the smallest δ with ``δ = (z_{1-α/2} + z_power) * sqrt(sum_b ψ_b / n_b) / K``.

    With ``binary`` (0/1 scores) an effect δ needs a discordant share of at least δ on each benchmark, so
    ``ψ_b`` is ``max(ψ_b, δ)``: one benchmark's MDE is ``max(z sqrt(ψ/n), z^2/n)``, never 0 when the two sides
    happen to agree on every item; ``inf`` when not even a difference of 1 (100 points) is detectable."""
    shares = [discordance] * len(n_items) if isinstance(discordance, (int, float)) else list(discordance)
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)

    def needed(delta: float) -> float:
        return z * math.sqrt(sum(max(d, delta if binary else 0.0) / n for n, d in zip(n_items, shares))) / len(n_items)

    if needed(1.0) > 1.0:
        return math.inf  # no difference on the 0-1 scale is detectable
    low, high = 0.0, 1.0  # δ - needed(δ) is convex and not positive at 0: bisect for where it turns positive
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if needed(mid) > mid else (low, mid)
    return high


def paired_comparison(a_parts: Sequence[Scores], b_parts: Sequence[Scores], n_resamples: int = N_RESAMPLES,
                      seed: int = SEED) -> Comparison:
    """Cell a minus cell b on the same items (per benchmark, same order): bootstrap interval, p-value, MDE.

    The test and the MDE use each item's mean over the cell's runs; the interval resamples runs too."""
    a_arrays, b_arrays = [_runs(x) for x in a_parts], [_runs(x) for x in b_parts]
    if [x.shape[1] for x in a_arrays] != [x.shape[1] for x in b_arrays]:
        raise ValueError("a paired comparison needs the same items on both sides")
    w = _weighted_differences(a_arrays, b_arrays)
    draws = bootstrap_draws([a_arrays, b_arrays], [1.0, -1.0], n_resamples=n_resamples, seed=seed)
    low, high = percentile_interval(draws)
    p_value, test = sign_flip_pvalue(w, seed=seed)
    diffs = [a.mean(axis=0) - b.mean(axis=0) for a, b in zip(a_arrays, b_arrays)]
    shares = [float(np.mean(np.square(d))) for d in diffs]
    binary = all(np.isin(d, (-1.0, 0.0, 1.0)).all() for d in diffs)
    mde = mde_from_discordance([len(d) for d in diffs], shares, binary=binary)
    return Comparison(float(w.sum()), low, high, p_value, test, sum(len(d) for d in diffs), mde,
                      float(np.mean(shares)))  # discordance: the mean over benchmarks, for a domain average


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1); NaN entries stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
