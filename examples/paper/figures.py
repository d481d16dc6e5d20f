"""The report's figures: one PNG per finding, drawn from the same statistics as the report's tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from examples.paper.analysis import GAPS, HEADLINE_GAP  # noqa: E402
from examples.paper.manifold import KINDS  # noqa: E402
from examples.paper.verdicts import BETWEEN, NEAR  # noqa: E402

#: The figure of each finding: its file name under ``<out>/figures``.
FIGURES = {
    "f1": "f1_measures.png",
    "sizes": "sizes_transitions.png",
    "f2": "f2_profiles.png",
    "f3": "f3_pairs.png",
    "f4": "f4_points.png",
}


def _save(fig: plt.Figure, title: str, path: Path) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f1(population: pd.DataFrame, f1: pd.DataFrame, path: Path) -> None:
    """F1: the Jacobian norm against each gap, and every measure's tau and granulated coefficient."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, gap in zip(axes[:2], GAPS, strict=True):
        scatter = ax.scatter(population[gap], population.jacobian_norm, c=population.depth, s=16, cmap="viridis")
        ax.set_yscale("log")
        ax.set_xlabel(GAPS[gap])
        ax.set_ylabel("mean Jacobian norm on held-out points")
    fig.colorbar(scatter, ax=axes[1], label="depth")
    rows = f1[f1.gap == HEADLINE_GAP].reset_index(drop=True)
    y = np.arange(len(rows))
    axes[2].errorbar(rows.tau, y, xerr=[rows.tau - rows.ci_low, rows.ci_high - rows.tau], fmt="o", label="tau (95% CI)")
    axes[2].scatter(rows.granulated, y, marker="x", color="tab:red", label="granulated")
    axes[2].axvline(0, color="black", linewidth=0.6)
    axes[2].set_yticks(y, rows.measure, fontsize=8)
    axes[2].set_xlabel(f"Kendall with the {GAPS[HEADLINE_GAP]}")
    axes[2].legend(fontsize=8)
    _save(fig, "F1: the Jacobian norm and the baselines over the models that fit their training set", path)


def figure_sizes(population: pd.DataFrame, path: Path) -> None:
    """Sizes: the raw transition count and the count per unit against the number of units, and the raw count
    against the accuracy gap, coloured by depth."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    jitter = np.random.default_rng(0).uniform(0.93, 1.07, len(population))  # models of one size side by side
    for ax, column, label in ((axes[0], "transitions", "transitions (raw count)"),
                              (axes[1], "transitions_per_unit", "transitions per unit")):
        scatter = ax.scatter(population.units * jitter, population[column], c=population.depth, s=10, cmap="viridis")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("piecewise-linear units (width x depth)")
        ax.set_ylabel(label)
    axes[2].scatter(population[HEADLINE_GAP], population.transitions, c=population.depth, s=10, cmap="viridis")
    axes[2].set_yscale("log")
    axes[2].set_xlabel(GAPS[HEADLINE_GAP])
    axes[2].set_ylabel("transitions (raw count)")
    fig.colorbar(scatter, ax=axes[2], label="depth")
    _save(fig, "Sizes: transitions along four fixed ellipses over F1's population", path)


def figure_f2(profile: pd.DataFrame, path: Path) -> None:
    """F2: the mean binned profiles of the Jacobian norm, the transitions per unit length and per segment, for the
    three kinds of ellipses (colour) and the three models (line style); the verdicts' regions shaded."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    colours = dict(zip(KINDS, ("tab:red", "tab:blue", "tab:green"), strict=True))
    styles = {"trained": "-", "first fit": "--", "untrained": ":"}
    for (model, kind), rows in profile.groupby(["model", "kind"], sort=False):
        style = {"color": colours[kind], "linestyle": styles[model], "marker": "o", "markersize": 3}
        for ax, column in zip(axes, ("jacobian_norm", "transition_density", "segment_transitions"), strict=True):
            ax.plot(rows.u_mid, rows[column], label=f"{model}, {kind}", **style)
    for ax in axes:
        ax.axvspan(0, NEAR, color="grey", alpha=0.15)
        ax.axvspan(BETWEEN, 1, color="grey", alpha=0.07)
        ax.set_xlabel("distance in t to the nearest anchor (0: at an anchor, 1: half way)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean Jacobian norm")
    axes[1].set_ylabel("transitions per unit length")
    axes[2].set_ylabel("transitions per segment")
    axes[0].legend(fontsize=6, ncol=1)
    _save(fig, "F2: mean profiles along random ellipses and ellipses through training points "
               "(shaded: 'near' and 'between')", path)


def figure_f3(pairs: pd.DataFrame, path: Path) -> None:
    """F3: every pair as an arrow from the base model to its variant."""
    factors = list(dict.fromkeys(pairs.factor))
    fig, axes = plt.subplots(1, len(factors), figsize=(3.0 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        p = pairs[pairs.factor == factor]
        for pair in p.itertuples():
            ax.annotate("", xy=(pair.gap_loss_variant, pair.jacobian_norm_variant),
                        xytext=(pair.gap_loss_base, pair.jacobian_norm_base),
                        arrowprops={"arrowstyle": "->", "color": "tab:red" if pair.both_fit else "lightgrey"})
        ax.scatter(p.gap_loss_base, p.jacobian_norm_base, s=10, color="tab:blue")
        ax.scatter(p.gap_loss_variant, p.jacobian_norm_variant, s=10, color="tab:red")
        ax.set_yscale("log")
        ax.set_title(factor, fontsize=9)
        ax.set_xlabel("loss gap")
    axes[0][0].set_ylabel("Jacobian norm")
    _save(fig, "F3: base model -> variant (red: both fit; grey: at least one did not)", path)


def figure_f4(models: pd.DataFrame, example: pd.DataFrame, example_id: str, path: Path) -> None:
    """F4: one model's points, and the per-model AUCs of the Jacobian norm and of the confidence."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    wrong = example.label != example.prediction
    axes[0].scatter(example.max_softmax[~wrong], example.jacobian_norm[~wrong], s=6, alpha=0.5, label="correct")
    axes[0].scatter(example.max_softmax[wrong], example.jacobian_norm[wrong], s=10, color="tab:red", label="misclassified")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("max-softmax probability at the test point")
    axes[0].set_ylabel("Jacobian norm at the test point")
    axes[0].set_title(example_id, fontsize=8)
    axes[0].legend(fontsize=8)
    bins = np.linspace(0.3, 1, 29)
    for column, label in (("f4_auc_jacobian", "Jacobian norm"), ("f4_auc_max_softmax", "1 - max-softmax"),
                          ("f4_auc_entropy", "entropy")):
        axes[1].hist(models[column].dropna(), bins=bins, alpha=0.5, label=label)
    axes[1].set_xlabel("ROC AUC for the misclassified points")
    axes[1].legend(fontsize=8)
    axes[2].hist(models.f4_auc_jacobian_within_confidence.dropna(), bins=bins, color="tab:purple")
    axes[2].axvline(0.5, color="black", linewidth=0.6)
    axes[2].set_xlabel("AUC of the Jacobian norm within max-softmax bins")
    _save(fig, "F4: the Jacobian norm at individual test points, beside the model's confidence", path)
