"""Every verdict rule of the report, in one place: each rule's thresholds, the function that applies it to the
statistics of ``examples.paper.analysis``, and its statement as the report prints it (before the numbers).

The rules are fixed in advance and applied mechanically: changing how a finding is judged means changing its
function and its statement here, side by side, and nowhere else.
"""

from __future__ import annotations

import math

import pandas as pd

from examples.paper.analysis import QUANTITIES, region_means
from examples.paper.grid import AXES, FULL_BATCH_EPOCH_FACTOR
from examples.paper.manifold import ON_MANIFOLD
from examples.paper.measures import SHARPNESS_DRAWS, SHARPNESS_SCALE
from examples.paper.training import NOISE_STD

#: F1's verdict: tau's two-sided p-value below this, and the bootstrap interval above zero. F4's "beyond
#: confidence" uses it for its sign tests.
SIGNIFICANCE = 0.01
#: F2's regions, as shares u of the largest distance in t to the nearest anchor: near is u < NEAR, between is
#: u >= BETWEEN.
NEAR = 0.1
BETWEEN = 0.5
#: F2's three comparisons for each on-manifold anchor kind and quantity, in the order of the report's rows.
F2_COMPARISONS = (
    "near < between (trained)",
    "between < off manifold (trained)",
    "near / between: trained < untrained",
)
#: F3's verdict needs at least this many pairs in which both models fit.
MIN_CLEAN_PAIRS = 3

FIT_RULE = f"""\
- Fit criterion: a model fits when, in eval mode, it classifies every training point (with the labels it
  learned) correctly. Training stops there, or at its budget: the stated `max_epochs` for mini-batches,
  {FULL_BATCH_EPOCH_FACTOR} times as many epochs for full-batch training (one step per epoch). Models that do
  not fit are listed apart, never silently dropped.
- Gaps: loss gap = held-out minus training cross-entropy; accuracy gap = training minus held-out accuracy; both
  sides in eval mode on the whole training and held-out sets."""

F1_RULE = f"""\
- **F1** is judged over the grid's models (ReLU, true labels, no augmentation, mini-batches) that fit. It
  holds for a gap if Kendall's tau between the mean held-out Jacobian norm and the gap is positive with
  p < {SIGNIFICANCE} and its bootstrap 95% interval (2,000 resamples of the models) lies above zero. The
  granulated coefficient is the mean over the axes ({", ".join(AXES)}) of psi, the mean tau over the groups of
  models that differ in that axis alone. Every baseline gets the same statistics; the Jacobian norm's rank among
  them is reported, not judged. Each measure is oriented so that larger means "predicts a larger gap": parameter
  norm; distance from initialization; log of the product of the weight matrices' spectral norms; sharpness
  (mean training-loss increase over {SHARPNESS_DRAWS} seeded random perturbations of every parameter tensor,
  each of norm {SHARPNESS_SCALE} times the tensor's); 1 - mean max-softmax probability on held-out points."""


def f1_found(row: pd.Series) -> bool:
    """F1's rule for one (measure, gap) row of ``analysis.f1_statistics``: tau > 0 with p < ``SIGNIFICANCE`` and a
    bootstrap interval above zero.

    Example:
        >>> row = pd.Series({"tau": 0.2, "p": 0.001, "ci_low": 0.05})
        >>> f1_found(row), f1_found(row.replace(0.001, 0.02))
        (True, False)
    """
    return bool(row.tau > 0 and row.p < SIGNIFICANCE and row.ci_low > 0)


F2_RULE = f"""\
- **F2** uses one trained model of three ReLU layers (and its initial weights as the untrained model), along
  ellipses through three anchors: three training points of one class, three of any classes, or three
  off-manifold points (matched to the training data's per-feature mean and standard deviation). The distance in
  t to the nearest anchor, as a share u of its largest value: "near" is u < {NEAR}, "between" is u >= {BETWEEN},
  "off" is the whole of an off-manifold ellipse. For the Jacobian norm and for the transitions per segment, for
  each on-manifold anchor kind, three verdicts: near < between (trained; in the mean over ellipses and on more
  than half of the ellipses one by one); between < off (trained, means); and the trained model's near / between
  ratio below the untrained model's (training, not geometry, makes the dip at the anchors)."""


def f2_comparisons(profiles: pd.DataFrame) -> pd.DataFrame:
    """F2's comparisons, one row per (on-manifold kind, quantity, comparison of ``F2_COMPARISONS``), with the
    compared values ``left`` and ``right`` and whether it ``holds``:

    - ``near < between`` (trained): the mean over ellipses is lower near the anchors, and so it is on more than
      half of the ellipses one by one;
    - ``between < off`` (trained): the on-manifold mean between the anchors is below the off-manifold mean;
    - ``training lowers near / between``: the trained model's ratio near / between is below the untrained one's.
    """
    regions = region_means(profiles, NEAR, BETWEEN)
    near_between, between_off, trained_lower = F2_COMPARISONS
    rows = []
    for kind in ON_MANIFOLD:
        for quantity, label in QUANTITIES.items():
            def values(model: str, kind: str, region: str, quantity: str = quantity) -> pd.Series:
                r = regions[(regions.model == model) & (regions.kind == kind) & (regions.region == region)]
                return r.set_index("ellipse")[quantity]

            near, between = values("trained", kind, "near"), values("trained", kind, "between")
            off = values("trained", "off manifold", "off")
            u_near, u_between = values("untrained", kind, "near"), values("untrained", kind, "between")
            per_ellipse = float((near < between.loc[near.index]).mean())
            ratio = near.mean() / between.mean() if between.mean() > 0 else math.nan
            u_ratio = u_near.mean() / u_between.mean() if u_between.mean() > 0 else math.nan
            rows += [
                {"kind": kind, "quantity": label, "comparison": near_between,
                 "left": near.mean(), "right": between.mean(), "ellipses_agreeing": per_ellipse,
                 "holds": bool(near.mean() < between.mean() and per_ellipse > 0.5)},
                {"kind": kind, "quantity": label, "comparison": between_off,
                 "left": between.mean(), "right": off.mean(), "ellipses_agreeing": math.nan,
                 "holds": bool(between.mean() < off.mean())},
                {"kind": kind, "quantity": label, "comparison": trained_lower,
                 "left": ratio, "right": u_ratio, "ellipses_agreeing": math.nan,
                 "holds": bool(ratio < u_ratio)},
            ]
    return pd.DataFrame(rows)


F3_RULE = f"""\
- **F3** pairs a grid model with a variant that differs in one factor (same seed, initial weights, batch order).
  A factor's verdict uses only the pairs where both models fit; with at least {MIN_CLEAN_PAIRS} such pairs it
  holds if the Jacobian norm moves the paper's way in more than half of them, otherwise it is "undecided". The
  augmentation is Gaussian input noise (standard deviation {NOISE_STD}, drawn anew each epoch); whether it
  improves held-out accuracy here is checked, not assumed."""


def f3_verdict(row: pd.Series) -> str:
    """F3's rule for one factor's row of ``analysis.f3_effects``: with at least ``MIN_CLEAN_PAIRS`` clean pairs, the
    Jacobian norm moves the paper's way in more than half of them; with fewer, no verdict."""
    if row.both_fit < MIN_CLEAN_PAIRS:
        return "undecided"
    return "yes" if row.jacobian_as_paper > row.both_fit / 2 else "no"


F4_RULE = f"""\
- **F4** is judged over every fitted model trained on true labels. It holds if the median per-model Spearman
  correlation between the per-point Jacobian norm and the per-point loss is positive and the median ROC AUC of
  the Jacobian norm for the misclassified points is above 0.5. The Jacobian norm "adds information beyond
  confidence" if both the median partial Spearman correlation (Jacobian norm and loss, max-softmax held fixed,
  on ranks) is above 0 and the median AUC within five max-softmax quantile bins is above 0.5, each on a sign
  test over the models with p < {SIGNIFICANCE}."""


def f4_found(summary: pd.DataFrame) -> bool:
    """F4's rule on ``analysis.f4_summary`` (indexed by statistic): the median per-model Spearman correlation of
    the Jacobian norm with the loss above 0, and its median ROC AUC for the misclassified points above 0.5."""
    return bool(summary.loc["f4_spearman_jacobian", "median"] > 0 and summary.loc["f4_auc_jacobian", "median"] > 0.5)


def f4_beyond_confidence(summary: pd.DataFrame) -> bool:
    """Whether the Jacobian norm adds information beyond confidence, on ``analysis.f4_summary`` (indexed by
    statistic): the median partial Spearman correlation above 0 and the median AUC within max-softmax bins above
    0.5, each with a sign-test p below ``SIGNIFICANCE``."""
    partial, within = summary.loc["f4_partial_spearman"], summary.loc["f4_auc_jacobian_within_confidence"]
    return bool(
        partial["median"] > 0 and partial["sign_test_p"] < SIGNIFICANCE
        and within["median"] > 0.5 and within["sign_test_p"] < SIGNIFICANCE
    )


#: Every rule as the report states it, in its order.
RULES = "\n".join((FIT_RULE, F1_RULE, F2_RULE, F3_RULE, F4_RULE))
