"""The statistics of the report, computed from the sweep's table only (so a reader can recompute them).

F1: correlations between the log Jacobian norm and the generalization gap over the models. F3: the paired
effect of each factor, over pairs of models that differ in that factor only. F4: the per-model Spearman
correlation between per-point Jacobian norm and loss, and the ROC AUC of the Jacobian norm for the
misclassified held-out points, summarized over the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: The columns that identify a model's configuration: two models with the same values are the same model.
HPARAM_COLUMNS = [
    "dataset",
    "seed",
    "width",
    "depth",
    "activation",
    "optimizer",
    "lr",
    "batch_size",
    "full_batch",
    "augment",
    "random_label_fraction",
    "max_epochs",
]


@dataclass(frozen=True)
class Factor:
    """A factor of F3: the base setting, the variant setting, and the paper's claim about the variant.

    Args:
        name: as the report names it.
        column: the hyper-parameter that changes.
        base: its value in the base model.
        variant: its value in the variant; ``None`` for any value other than ``base``.
        paper_direction: +1 if the paper finds higher sensitivity and a larger gap for the variant, -1 if lower.
        also_differs: other columns that change with it (the batch size with full-batch training).
    """

    name: str
    column: str
    base: Any
    variant: Any
    paper_direction: int
    also_differs: tuple[str, ...] = ()


FACTORS = (
    Factor("augmentation", "augment", False, True, -1),
    Factor("random labels", "random_label_fraction", 0.0, None, +1),
    Factor("full batch", "full_batch", False, True, +1, also_differs=("batch_size",)),
    Factor("hardtanh instead of ReLU", "activation", "relu", "hardtanh", +1),
    Factor("hardsigmoid instead of ReLU", "activation", "relu", "hardsigmoid", +1),
)


def correlations(x: pd.Series, y: pd.Series) -> dict[str, float]:
    """Pearson, Spearman and Kendall correlations of ``x`` and ``y`` (with Kendall's p-value), and ``n``."""
    from scipy import stats

    kendall = stats.kendalltau(x, y)
    return {
        "n": len(x),
        "pearson": float(stats.pearsonr(x, y).statistic),
        "spearman": float(stats.spearmanr(x, y).statistic),
        "kendall": float(kendall.statistic),
        "kendall_p": float(kendall.pvalue),
    }


def f1_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """F1: log10 of the mean held-out Jacobian norm against each gap, over all models and over the models
    that fitted their training set; one row per (population, gap)."""
    rows = []
    for population, models in [("all models", table), ("models at 100% train accuracy", table[table.reached_target])]:
        for gap in ("gap_loss", "gap_accuracy"):
            if len(models) >= 3:
                rows.append({"population": population, "gap": gap,
                             **correlations(np.log10(models.jacobian_norm), models[gap])})
    return pd.DataFrame(rows)


def pairs(table: pd.DataFrame, factor: Factor) -> pd.DataFrame:
    """The pairs of models that differ in ``factor`` and in nothing else: one row per pair, with the base
    model's and the variant's measurements side by side (suffixes ``_base`` and ``_variant``)."""
    keys = [c for c in HPARAM_COLUMNS if c not in (factor.column, *factor.also_differs)]
    is_base = table[factor.column] == factor.base
    is_variant = ~is_base if factor.variant is None else table[factor.column] == factor.variant
    return table[is_base].merge(table[is_variant], on=keys, suffixes=("_base", "_variant"))


def f3_paired_effects(table: pd.DataFrame) -> pd.DataFrame:
    """F3: for each factor, over its pairs, how the Jacobian norm and the gap change from base to variant."""
    rows = []
    for factor in FACTORS:
        p = pairs(table, factor)
        if p.empty:
            continue
        ratio = p.jacobian_norm_variant / p.jacobian_norm_base
        d_loss = p.gap_loss_variant - p.gap_loss_base
        d_acc = p.gap_accuracy_variant - p.gap_accuracy_base
        expected = np.sign(factor.paper_direction)
        rows.append(
            {
                "factor": factor.name,
                "paper": "higher" if expected > 0 else "lower",
                "pairs": len(p),
                "jacobian_ratio_median": float(ratio.median()),
                "jacobian_as_paper": float((np.sign(np.log(ratio)) == expected).mean()),
                "gap_loss_change_median": float(d_loss.median()),
                "gap_loss_as_paper": float((np.sign(d_loss) == expected).mean()),
                "gap_accuracy_change_median": float(d_acc.median()),
                "gap_accuracy_as_paper": float((np.sign(d_acc) == expected).mean()),
                "base_fitted": float(p.reached_target_base.mean()),
                "variant_fitted": float(p.reached_target_variant.mean()),
            }
        )
    return pd.DataFrame(rows)


def f4_summary(table: pd.DataFrame) -> dict[str, float]:
    """F4 over the sweep: the distribution of the per-model Spearman correlations and ROC AUCs."""
    spearman = table.f4_spearman.dropna()
    auc = table.f4_auc_misclassified.dropna()
    return {
        "models": len(spearman),
        "spearman_median": float(spearman.median()),
        "spearman_q25": float(spearman.quantile(0.25)),
        "spearman_q75": float(spearman.quantile(0.75)),
        "spearman_positive": float((spearman > 0).mean()),
        "auc_models": len(auc),
        "auc_median": float(auc.median()),
        "auc_q25": float(auc.quantile(0.25)),
        "auc_q75": float(auc.quantile(0.75)),
        "auc_above_half": float((auc > 0.5).mean()),
    }
