"""Every verdict rule of the report, in one place: each rule's thresholds, the function that applies it to the
statistics of ``examples.paper.analysis``, and its statement as the report prints it (before the numbers).

The rules are fixed in advance and applied mechanically: changing how a finding is judged means changing its
function and its statement here, side by side, and nowhere else.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from examples.paper.analysis import NORMALIZATIONS, QUANTITIES, region_means
from examples.paper.grid import AXES, FULL_BATCH_EPOCH_FACTOR
from examples.paper.manifold import TRAINING_RULE
from examples.paper.measures import SHARPNESS_DRAWS, SHARPNESS_SCALE, TRANSITION_ELLIPSES
from examples.paper.training import NOISE_STD

#: F1's verdict: tau's two-sided p-value below this, and the bootstrap interval above zero. F4's "beyond
#: confidence" uses it for its sign tests.
SIGNIFICANCE = 0.01
#: F2's regions, as shares u of the largest distance in t to the nearest anchor: near is u < NEAR, between is
#: u >= BETWEEN.
NEAR = 0.1
BETWEEN = 0.5
#: F2's three comparisons for each quantity, in the order of the report's rows.
F2_COMPARISONS = (
    "different classes: near < between",
    "same class < random ellipse",
    "different classes, near / between: trained < untrained",
)
#: The sizes finding: a normalization makes counts comparable across sizes if its |tau| with the number of units
#: is below this, and its tau with the gap over all models is within this of the mean tau within groups of one
#: width and depth.
COMPARABLE = 0.1
#: F3's verdict needs at least this many pairs in which both models fit.
MIN_CLEAN_PAIRS = 3

FIT_RULE = f"""\
- Fit criterion: a model fits when, in eval mode, it classifies every training point (with the labels it
  learned) correctly. Training stops there, or at its budget: the stated `max_epochs` for mini-batches,
  {FULL_BATCH_EPOCH_FACTOR} times as many epochs for full-batch training (one step per epoch). A model whose loss
  or weights become NaN or infinite stops at once and is recorded as diverged (with the epoch), and is not
  measured; a model whose training or measuring raised is recorded as failed. Models that do not fit, diverged
  or failed are listed apart, never silently dropped.
- Gaps: accuracy gap = training minus held-out accuracy (for a model that fits, 1 - held-out accuracy: the
  paper's gap); loss gap = held-out minus training cross-entropy; both sides in eval mode on the whole training
  and held-out sets."""

F1_RULE = f"""\
- **F1** is judged over the grid's models (ReLU, true labels, no augmentation, mini-batches) that fit, on the
  paper's gap, the accuracy gap. It holds if Kendall's tau between the mean held-out Jacobian norm and the
  accuracy gap is positive with p < {SIGNIFICANCE} and its bootstrap 95% interval (2,000 resamples of the
  models) lies above zero. The cross-entropy (loss) gap is a further check with the same statistics, shown in
  its own row, not a verdict of F1. The granulated coefficient is the mean over the axes ({", ".join(AXES)})
  of psi, the mean tau over the groups of models that differ in that axis alone. Every baseline gets the same
  statistics; the Jacobian norm's rank among them is reported, not judged. Each measure is oriented so that
  larger means "predicts a larger gap": parameter norm; distance from initialization; log of the product of the
  weight matrices' spectral norms; sharpness (mean training-loss increase over {SHARPNESS_DRAWS} seeded random
  perturbations of every parameter tensor, each of norm {SHARPNESS_SCALE} times the tensor's); 1 - mean
  max-softmax probability on held-out points. Where the sweep holds the small grid's models, the same
  statistics over them show how the result moves with the population's size (reported, not judged)."""

SIZES_RULE = f"""\
- **Sizes** (the paper's caveat: transition counts alone do not compare networks of different sizes). Over
  F1's population, the transitions along {TRANSITION_ELLIPSES} fixed ellipses through training points (the same
  for every model).
  The caveat holds here if the raw count's Kendall tau with the number of piecewise-linear units is positive with
  p < {SIGNIFICANCE}. A normalization ({", ".join(NORMALIZATIONS.values())}) makes counts comparable across sizes
  if its |tau| with the number of units is below {COMPARABLE} and its tau with the accuracy gap over all models is
  within {COMPARABLE} of the mean tau within the groups of one width and depth (where size cannot act)."""
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
- **F2**: {TRAINING_RULE}. It is measured as trained by that rule ("trained"), with its weights at its
  first fit ("first fit", shown so that a reader sees whether the result depends on the rule), and at its
  initial weights ("untrained"), along ellipses of the paper's three kinds: random ellipses that pass nowhere
  near the data (a circle around the data's mean, of the data's root-mean-square radius, in a random plane,
  redrawn until it keeps at least the median nearest-neighbour distance of the training points from every
  training point), ellipses through three training points of three different classes, and through three of one
  class. The distance in t to the nearest anchor, as a share u of its largest value: "near" is u < {NEAR},
  "between" is u >= {BETWEEN}; "whole" is the whole ellipse. Two quantities are judged: the Jacobian norm (mean
  over the points) and the transition density per unit arc length (the segments' transitions over their length);
  the transitions per segment are shown beside them. For each quantity and model, three verdicts: (1) different
  classes, near < between: lower near the anchors in the mean over ellipses and on more than half of the
  ellipses one by one; (2) same class < random ellipse: the mean over the same-class ellipses' whole-ellipse
  values is below the random ellipses', and so is their median; (3) the dip is training's: the different-class
  near / between ratio (of the means over ellipses) is lower for the model than untrained. The findings table
  judges the trained model; the first-fit model's verdicts are given beside them."""


def f2_comparisons(profiles: pd.DataFrame, model: str = "trained") -> pd.DataFrame:
    """F2's comparisons for ``model`` (``trained`` or ``first fit``), one row per (quantity of ``QUANTITIES``,
    comparison of ``F2_COMPARISONS``), with the compared values ``left`` and ``right``, the share of ellipses that
    agree where it applies, and whether it ``holds``:

    - ``different classes: near < between``: the mean over ellipses is lower near the anchors, and so it is on
      more than half of the ellipses one by one;
    - ``same class < random ellipse``: the same-class ellipses' whole-ellipse values, in mean and in median, are
      below the random ellipses';
    - ``near / between: trained < untrained``: the model's different-class ratio near / between is below the
      untrained model's.
    """
    regions = region_means(profiles, NEAR, BETWEEN)
    near_between, same_random, dip = F2_COMPARISONS
    rows = []
    for quantity, label in QUANTITIES.items():
        def values(who: str, kind: str, region: str, quantity: str = quantity) -> pd.Series:
            r = regions[(regions.model == who) & (regions.kind == kind) & (regions.region == region)]
            return r.set_index("ellipse")[quantity]

        near, between = values(model, "different classes", "near"), values(model, "different classes", "between")
        same, random = values(model, "same class", "whole"), values(model, "random ellipse", "whole")
        u_near = values("untrained", "different classes", "near")
        u_between = values("untrained", "different classes", "between")
        per_ellipse = float((near < between.loc[near.index]).mean())
        ratio = near.mean() / between.mean() if between.mean() > 0 else math.nan
        u_ratio = u_near.mean() / u_between.mean() if u_between.mean() > 0 else math.nan
        rows += [
            {"model": model, "quantity": label, "comparison": near_between, "left": near.mean(),
             "right": between.mean(), "ellipses_agreeing": per_ellipse,
             "holds": bool(near.mean() < between.mean() and per_ellipse > 0.5)},
            {"model": model, "quantity": label, "comparison": same_random, "left": same.mean(), "right": random.mean(),
             "ellipses_agreeing": float((same < random.median()).mean()),
             "holds": bool(same.mean() < random.mean() and same.median() < random.median())},
            {"model": model, "quantity": label, "comparison": dip, "left": ratio, "right": u_ratio,
             "ellipses_agreeing": math.nan, "holds": bool(ratio < u_ratio)},
        ]
    return pd.DataFrame(rows)


def sizes_found(sizes: pd.DataFrame) -> bool:
    """The sizes rule on ``analysis.sizes_statistics``: the raw count's tau with the number of units is positive
    with p below ``SIGNIFICANCE`` (counts grow with size, so raw counts do not compare sizes).

    Example:
        >>> sizes_found(pd.DataFrame({"column": ["transitions"], "tau_units": [0.6], "p_units": [1e-9]}))
        True
    """
    raw = sizes.set_index("column").loc["transitions"]
    return bool(raw.tau_units > 0 and raw.p_units < SIGNIFICANCE)


def comparable_normalizations(sizes: pd.DataFrame) -> list[str]:
    """The normalizations of ``analysis.sizes_statistics`` that make counts comparable across sizes: |tau| with
    the number of units below ``COMPARABLE``, and the pooled tau with the gap within ``COMPARABLE`` of the mean
    tau within groups of one width and depth.

    Example:
        >>> comparable_normalizations(pd.DataFrame({"normalization": ["raw", "per unit"], "tau_units": [0.7, 0.05],
        ...                                         "pooled_minus_within": [0.3, -0.02]}))
        ['per unit']
    """
    ok = (sizes.tau_units.abs() < COMPARABLE) & (sizes.pooled_minus_within.abs() < COMPARABLE)
    return [str(n) for n in sizes.normalization[ok & np.isfinite(sizes.pooled_minus_within)]]


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
RULES = "\n".join((FIT_RULE, F1_RULE, SIZES_RULE, F2_RULE, F3_RULE, F4_RULE))
