"""The statistics a generalization measure is judged by (Jiang et al., "Fantastic Generalization Measures and
Where to Find Them", ICLR 2020), and the per-point statistics of F4.

- Kendall's tau-b between a measure and the generalization gap over a population of models, with a seeded
  percentile-bootstrap 95% interval (models resampled with replacement).
- The granulated Kendall coefficient: for each hyper-parameter axis ``i``, ``psi_i`` is the mean, over the groups
  of models that share every other hyper-parameter, of tau over the models of the group (which differ in axis
  ``i`` alone); ``Psi`` is the mean of ``psi_i`` over the axes.
- The rank-partial correlation of F4: Spearman's correlation of ``x`` and ``y`` with ``z`` held fixed,
  ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))`` on the ranks.
- The ROC AUC of a score within bins of a covariate: does the score separate the classes among points that the
  covariate cannot tell apart?
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def _signs(values: np.ndarray) -> np.ndarray:
    return np.sign(values[:, None] - values[None, :])


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b of ``x`` and ``y`` (ties counted as scipy's ``kendalltau`` does); NaN when either is constant.

    ``tau_b = sum_ij sx_ij sy_ij / sqrt(sum_ij sx_ij^2 * sum_ij sy_ij^2)`` with ``sx_ij = sign(x_i - x_j)``.

    Example:
        >>> round(kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]), 4)
        0.6667
    """
    sx, sy = _signs(np.asarray(x, dtype=float)), _signs(np.asarray(y, dtype=float))
    denominator = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    return float((sx * sy).sum() / denominator) if denominator > 0 else math.nan


def bootstrap_kendall(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, num_resamples: int = 2000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile-bootstrap interval of Kendall's tau-b: models resampled with replacement ``num_resamples``
    times by ``numpy.random.default_rng(seed)``; a resample's repeated models are ties, as in tau-b. Each
    resample's tau is scipy's (``O(n log n)``: a population of a thousand models takes seconds, not minutes).

    Example:
        >>> low, high = bootstrap_kendall(range(30), range(30))
        >>> round(low, 9), round(high, 9)
        (1.0, 1.0)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    taus = np.empty(num_resamples)
    for r in range(num_resamples):
        index = rng.integers(0, len(x), len(x))
        a, b = x[index], y[index]
        # scipy warns and returns NaN for a constant resample; such a resample has no tau.
        taus[r] = stats.kendalltau(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
    taus = taus[~np.isnan(taus)]
    tail = (1 - level) / 2
    return float(np.quantile(taus, tail)), float(np.quantile(taus, 1 - tail))


def granulated_kendall(table: pd.DataFrame, measure: str, gap: str, axes: Sequence[str]) -> dict[str, float]:
    """``psi_i`` for every axis in ``axes`` and their mean ``Psi`` (key ``"granulated"``).

    For an axis, the models are grouped by all the other axes; a group of at least two models whose tau is
    defined (neither column constant within it) contributes its tau. An axis with no such group gives NaN and is
    left out of the mean.

    Example:
        >>> t = pd.DataFrame({"a": [0, 1, 0, 1], "b": [0, 0, 1, 1], "m": [1, 2, 3, 4], "g": [1, 2, 4, 3]})
        >>> granulated_kendall(t, "m", "g", ["a", "b"])
        {'a': 0.0, 'b': 1.0, 'granulated': 0.5}
    """
    result: dict[str, float] = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        taus = []
        groups = table.groupby(others, dropna=False) if others else [((), table)]
        for _, group in groups:
            if len(group) >= 2 and group[axis].nunique() >= 2:
                tau = kendall_tau(group[measure], group[gap])
                if not math.isnan(tau):
                    taus.append(tau)
        result[axis] = float(np.mean(taus)) if taus else math.nan
    defined = [v for v in result.values() if not math.isnan(v)]
    result["granulated"] = float(np.mean(defined)) if defined else math.nan
    return result


def partial_spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                     z: Sequence[float] | np.ndarray) -> float:
    """Spearman's correlation of ``x`` and ``y`` with ``z`` held fixed (the partial correlation of the ranks); NaN
    if any of them is constant.

    Example: two variables that share a trend ``z`` and differ by an alternating term ``a``; their ranks agree
    through ``z``, and once ``z`` is held fixed, only the opposite signs of ``a`` are left.

        >>> z, a = np.arange(10.0), np.array([0.0, 1.0] * 5)
        >>> round(float(stats.spearmanr(z + a, z - a).statistic), 3), round(partial_spearman(z + a, z - a, z), 3)
        (0.947, -0.947)
    """
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    if min(np.ptp(rx), np.ptp(ry), np.ptp(rz)) == 0:
        return math.nan  # a constant variable (all points at one max-softmax, say) has no rank correlation
    r_xy, r_xz, r_yz = (float(np.corrcoef(a, b)[0, 1]) for a, b in ((rx, ry), (rx, rz), (ry, rz)))
    denominator = math.sqrt(max((1 - r_xz**2) * (1 - r_yz**2), 0.0))
    return (r_xy - r_xz * r_yz) / denominator if denominator > 0 else math.nan


def binned_auc(score: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray,
               covariate: Sequence[float] | np.ndarray, num_bins: int = 5) -> float:
    """The ROC AUC of ``score`` for ``positive`` within ``num_bins`` quantile bins of ``covariate``, averaged over
    the bins that hold both classes, each weighted by its number of positive-negative pairs (so the result is the
    share of such within-bin pairs that ``score`` orders correctly, ties counting one half); NaN if no bin holds
    both classes.

    Example:
        >>> binned_auc([1, 2, 3, 4], [False, True, False, True], [0, 0, 1, 1], num_bins=2)
        1.0
    """
    score, positive, covariate = (np.asarray(v) for v in (score, positive, covariate))
    ranks = stats.rankdata(covariate, method="ordinal") - 1
    bins = ranks * num_bins // len(covariate)
    correct, total = 0.0, 0
    for b in range(num_bins):
        inside = bins == b
        pos, neg = score[inside & positive], score[inside & ~positive]
        if len(pos) and len(neg):
            greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
            correct += float(greater)
            total += len(pos) * len(neg)
    return correct / total if total else math.nan
