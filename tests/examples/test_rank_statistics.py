"""The statistics of the reproduction against scipy, scikit-learn or a hand computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from examples.paper.rank_statistics import (
    binned_auc,
    bootstrap_kendall,
    granulated_kendall,
    kendall_tau,
    partial_spearman,
)


@pytest.mark.parametrize("seed", range(3))
def test_kendall_tau_is_scipys_tau_b_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 40).astype(float)  # many ties on both sides
    y = x + rng.integers(-3, 4, 40)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bootstrap_interval_covers_the_population_tau() -> None:
    # For a bivariate normal with correlation rho, Kendall's tau is (2 / pi) arcsin(rho).
    rho = 0.6
    population_tau = 2 / math.pi * math.asin(rho)
    rng = np.random.default_rng(0)
    covered = 0
    widths = []
    for _ in range(20):
        x, y = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], 150).T
        low, high = bootstrap_kendall(x, y, num_resamples=200, seed=1)
        point = stats.kendalltau(x, y).statistic
        assert low < point < high
        covered += low <= population_tau <= high
        widths.append(high - low)
    # 95% intervals: at most a couple of 20 should miss (P(>= 4 misses) is about 1.6%).
    assert covered >= 17
    # The width of a 95% interval for tau near 0.41 at n = 150 is roughly 2 * 1.96 * 0.045.
    assert 0.1 < np.median(widths) < 0.25


def test_bootstrap_is_seeded_and_shrinks_with_more_models() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    assert bootstrap_kendall(x, y, 200, seed=5) == bootstrap_kendall(x, y, 200, seed=5)
    assert bootstrap_kendall(x, y, 200, seed=5) != bootstrap_kendall(x, y, 200, seed=6)
    small_low, small_high = bootstrap_kendall(x[:40], y[:40], 200, seed=5)
    low, high = bootstrap_kendall(x, y, 200, seed=5)
    assert high - low < small_high - small_low


def test_granulated_kendall_on_a_constructed_table() -> None:
    # Axes a in {0, 1} and b in {0, 1, 2}; the gap follows the measure along a, and against it along b when a = 1.
    rows = []
    for a, b in itertools.product((0, 1), (0, 1, 2)):
        measure = 10 * a + b
        gap = 10 * a + (b if a == 0 else -b)
        rows.append({"a": a, "b": b, "m": measure, "g": gap})
    table = pd.DataFrame(rows)
    result = granulated_kendall(table, "m", "g", ["a", "b"])
    # Axis a: three groups (b = 0, 1, 2), two models each, both concordant: psi_a = 1.
    # Axis b: group a = 0 is concordant (tau 1), group a = 1 fully discordant (tau -1): psi_b = 0.
    assert result == {"a": 1.0, "b": 0.0, "granulated": 0.5}
    # A group with a tie in the gap has an undefined tau and is left out; one model alone is no group.
    table.loc[(table.a == 1) & (table.b == 0), "g"] = 0  # the pair (a=0,b=0),(a=1,b=0) now ties in g
    partial = granulated_kendall(table.drop(index=5), "m", "g", ["a", "b"])
    assert partial["a"] == 1.0  # b=0 undefined, b=2 has one model, b=1 concordant
    expected_b = np.mean([1.0, stats.kendalltau([10, 11], [0, 9]).statistic])
    assert partial["b"] == pytest.approx(expected_b)


def test_partial_spearman_equals_the_correlation_of_rank_residuals() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(size=200)
    x = z + rng.normal(size=200)
    y = z**3 + 0.5 * x + rng.normal(size=200)
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    residual = [r - np.polyval(np.polyfit(rz, r, 1), rz) for r in (rx, ry)]
    expected = stats.pearsonr(*residual).statistic
    assert partial_spearman(x, y, z) == pytest.approx(expected, abs=1e-10)
    assert partial_spearman(x, y, z) < stats.spearmanr(x, y).statistic  # z explains part of it
    assert math.isnan(partial_spearman(x, y, np.ones_like(z)))


def test_binned_auc_is_the_pair_weighted_mean_of_per_bin_aucs() -> None:
    rng = np.random.default_rng(5)
    covariate = rng.uniform(size=300)
    positive = rng.uniform(size=300) < covariate  # the covariate predicts the class...
    score = covariate + positive * 0.2 + rng.normal(scale=0.3, size=300)  # ...and the score adds a little
    order = np.argsort(covariate, kind="stable")
    bins = np.empty(300, dtype=int)
    bins[order] = np.arange(300) * 5 // 300
    aucs, weights = [], []
    for b in range(5):
        inside = bins == b
        n_pos, n_neg = positive[inside].sum(), (~positive[inside]).sum()
        if n_pos and n_neg:
            aucs.append(roc_auc_score(positive[inside], score[inside]))
            weights.append(n_pos * n_neg)
    assert binned_auc(score, positive, covariate) == pytest.approx(np.average(aucs, weights=weights))
    # With one bin it is the plain AUC.
    assert binned_auc(score, positive, covariate, num_bins=1) == pytest.approx(roc_auc_score(positive, score))
    assert math.isnan(binned_auc(score, np.zeros(300, dtype=bool), covariate))
