"""The report: PNG figures and a Markdown file that states, with the numbers, what reproduced and what did not.

Every number in the report is computed from the files beside it (``results.csv``, ``manifold.csv``, the
per-point records), by ``examples.paper.analysis``; the verdicts are fixed rules stated in the report,
applied to those numbers, never tuned to the outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from examples.paper.analysis import f1_correlations, f3_paired_effects, f4_summary  # noqa: E402
from examples.paper.manifold import KINDS, manifold_means  # noqa: E402

FIGURES = {
    "f1": "f1_jacobian_vs_gap.png",
    "f2": "f2_manifold.png",
    "f3": "f3_pairs.png",
    "f4": "f4_points.png",
}

#: Kendall's p-value below which a correlation counts as found.
SIGNIFICANCE = 0.01


def num(value: float, digits: int = 3) -> str:
    """How the report writes a number (fixed decimals); the tests format the table's values the same way."""
    return f"{value:.{digits}f}"


def _group(table: pd.DataFrame) -> pd.Series:
    """What sets a model apart from its base model, for the figures' colours."""
    group = pd.Series("base (ReLU, batch 64)", index=table.index)
    group[table.activation != "relu"] = table.activation[table.activation != "relu"]
    group[table.full_batch] = "full batch"
    group[table.augment] = "augmentation"
    group[table.random_label_fraction > 0] = "random labels"
    return group


def figure_f1(table: pd.DataFrame, path: Path) -> None:
    groups = _group(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, gap, label in zip(axes, ("gap_loss", "gap_accuracy"), ("loss gap (val - train)", "accuracy gap (train - val)"), strict=True):
        for name in sorted(groups.unique()):
            rows = table[groups == name]
            ax.scatter(rows[gap], rows.jacobian_norm, label=name, s=22, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"generalization gap: {label}")
        ax.set_ylabel("mean Jacobian norm on held-out points")
    axes[0].legend(fontsize=8)
    fig.suptitle("F1: Jacobian norm against the generalization gap, one point per model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f3(table: pd.DataFrame, path: Path) -> None:
    from examples.paper.analysis import FACTORS, pairs

    factors = [f for f in FACTORS if not pairs(table, f).empty]
    fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        p = pairs(table, factor)
        for _, pair in p.iterrows():
            ax.annotate("", xy=(pair.gap_loss_variant, pair.jacobian_norm_variant),
                        xytext=(pair.gap_loss_base, pair.jacobian_norm_base),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.7})
        ax.scatter(p.gap_loss_base, p.jacobian_norm_base, s=12, color="tab:blue", label="base")
        ax.scatter(p.gap_loss_variant, p.jacobian_norm_variant, s=12, color="tab:red", label="variant")
        ax.set_yscale("log")
        ax.set_title(factor.name, fontsize=9)
        ax.set_xlabel("loss gap")
    axes[0][0].set_ylabel("Jacobian norm")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("F3: each arrow goes from a base model to its variant (one factor changed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f2(profiles: pd.DataFrame, means: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"trained": "tab:red", "untrained": "tab:gray"}
    for (model, kind), rows in profiles.groupby(["model", "kind"], sort=False):
        axes[0].plot(rows.t, rows.jacobian_norm, color=styles[model], linestyle="-" if kind == KINDS[0] else ":",
                     label=f"{model}, {kind}")
        if kind == KINDS[0]:
            axes[1].plot(rows.t, rows.segment_transitions, color=styles[model], label=model, linewidth=0.8)
    for ax in axes[:2]:
        for anchor in (0, 2 * np.pi / 3, 4 * np.pi / 3):
            ax.axvline(anchor, color="black", linewidth=0.6)
        ax.set_xlabel("t along the ellipse (vertical lines: the anchors)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("Jacobian norm")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Jacobian norm along one ellipse of each kind")
    axes[1].set_ylabel("transitions per segment")
    axes[1].set_title("transitions along the on-manifold ellipse")
    axes[1].legend(fontsize=8)
    labels = ["at training points", "on manifold", "off manifold"]
    width = 0.38
    for shift, model in ((-width / 2, "trained"), (width / 2, "untrained")):
        rows = means[means.model == model].set_index("kind")
        values = [rows.jacobian_norm_anchors[KINDS[0]], rows.jacobian_norm_along[KINDS[0]],
                  rows.jacobian_norm_along[KINDS[1]]]
        axes[2].bar(np.arange(3) + shift, values, width, color=styles[model], label=model)
    axes[2].set_xticks(np.arange(3), labels)
    axes[2].set_yscale("log")
    axes[2].set_title("mean Jacobian norm over all ellipses")
    axes[2].legend(fontsize=8)
    fig.suptitle("F2: sensitivity at, between and away from the training points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f4(table: pd.DataFrame, example: pd.DataFrame, example_id: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    wrong = example.label != example.prediction
    axes[0].scatter(example.jacobian_norm[~wrong], example.loss[~wrong], s=6, alpha=0.5, label="correct")
    axes[0].scatter(example.jacobian_norm[wrong], example.loss[wrong], s=10, color="tab:red", label="misclassified")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("Jacobian norm at the test point")
    axes[0].set_ylabel("cross-entropy loss at the test point")
    axes[0].set_title(example_id, fontsize=8)
    axes[0].legend(fontsize=8)
    axes[1].hist(table.f4_spearman.dropna(), bins=20, color="tab:blue")
    axes[1].set_xlabel("Spearman(Jacobian norm, loss) over test points")
    axes[1].set_ylabel("models")
    axes[2].hist(table.f4_auc_misclassified.dropna(), bins=20, color="tab:green")
    axes[2].axvline(0.5, color="black", linewidth=0.6)
    axes[2].set_xlabel("ROC AUC of the Jacobian norm for misclassified points")
    fig.suptitle("F4: at individual test points, the Jacobian norm tracks the loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for _, row in frame.iterrows():
        cells = [num(v, digits) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "**no**"


def write_report(out_dir: Path, table: pd.DataFrame, curves: pd.DataFrame, profiles: pd.DataFrame,
                 command: str, seeds: str, setup: Sequence[str]) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md``; return the report's path."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    f1 = f1_correlations(table)
    f3 = f3_paired_effects(table)
    f4 = f4_summary(table)
    means = manifold_means(curves)
    example_id = table.sort_values("val_accuracy").model_id.iloc[len(table) // 2]  # the median model
    example = pd.read_csv(out_dir / "points" / f"{example_id}.csv")
    figure_f1(table, figures / FIGURES["f1"])
    figure_f2(profiles, means, figures / FIGURES["f2"])
    figure_f3(table, figures / FIGURES["f3"])
    figure_f4(table, example, example_id, figures / FIGURES["f4"])

    headline = f1[(f1.population == "all models")].set_index("gap")
    f1_found = {gap: bool(r.kendall > 0 and r.kendall_p < SIGNIFICANCE) for gap, r in headline.iterrows()}
    trained = means[means.model == "trained"].set_index("kind")
    at_points = trained.jacobian_norm_anchors[KINDS[0]]
    between = trained.jacobian_norm_along[KINDS[0]]
    off = trained.jacobian_norm_along[KINDS[1]]
    density_on, density_off = trained.transition_density[KINDS[0]], trained.transition_density[KINDS[1]]
    f2_jacobian = bool(at_points < between < off)
    f2_transitions = bool(density_on < density_off)
    f4_found = f4["spearman_median"] > 0 and f4["auc_median"] > 0.5
    # A sampled count can only miss crossings, so it can never exceed a correct exact count.
    over = curves[curves.transitions_sampled > curves.transitions]
    check = (
        f"On {len(over)} of {len(curves)} ellipses the sampled count exceeds the exact count (by "
        f"{int((over.transitions_sampled - over.transitions).sum())} transitions in all), which a correct exact "
        "count cannot allow: there the exact count misses crossings, and the densities above inherit the error."
        if len(over)
        else "On every ellipse the sampled count is at most the exact count, as it must be."
    )

    f3_rows = [
        f"| {r.factor} | {r.paper} | {r.pairs} | {num(r.jacobian_ratio_median)} | {num(r.jacobian_as_paper)} | "
        f"{_yes(r.jacobian_as_paper > 0.5)} | {num(r.gap_loss_as_paper)} | {num(r.gap_accuracy_as_paper)} | "
        f"{num(r.base_fitted)} / {num(r.variant_fitted)} |"
        for r in f3.itertuples()
    ]
    gaps = {"gap_loss": "loss gap", "gap_accuracy": "accuracy gap"}
    summary = [
        "| Finding | Paper | Measured here | Reproduced |",
        "|---|---|---|---|",
        *[
            f"| F1 ({gaps[gap]}) | log Jacobian norm correlates with the gap | Kendall tau = {num(r.kendall)} "
            f"(p = {r.kendall_p:.2g}), Spearman = {num(r.spearman)}, Pearson = {num(r.pearson)}, {r.n} models | "
            f"{_yes(f1_found[gap])} |"
            for gap, r in headline.iterrows()
        ],
        f"| F2 (Jacobian) | trained: lowest at training points, higher between them, highest off the manifold | "
        f"{num(at_points)} at training points, {num(between)} on-manifold ellipses, {num(off)} off-manifold | "
        f"{_yes(f2_jacobian)} |",
        f"| F2 (transitions) | fewer transitions on than off the manifold | density {num(density_on)} on, "
        f"{num(density_off)} off (per unit length) | {_yes(f2_transitions)} |",
        *[
            f"| F3 ({r.factor}) | {r.paper} sensitivity | Jacobian norm {r.paper} in "
            f"{round(r.jacobian_as_paper * r.pairs)} of {r.pairs} pairs (median ratio "
            f"{num(r.jacobian_ratio_median)}) | {_yes(r.jacobian_as_paper > 0.5)} |"
            for r in f3.itertuples()
        ],
        f"| F4 | per-point Jacobian norm predicts the per-point loss | median Spearman {num(f4['spearman_median'])}, "
        f"median ROC AUC for misclassified points {num(f4['auc_median'])} | {_yes(f4_found)} |",
    ]
    text = f"""# Sensitivity and generalization: the reproduction, as measured

Command: `{command}`

{seeds}

{chr(10).join(f"- {line}" for line in setup)}

Verdict rules, fixed before looking at the numbers: F1 holds if Kendall's tau is positive with p < {SIGNIFICANCE}.
F2 holds for the Jacobian if, for the trained model, the mean norm at the training points < along the
on-manifold ellipses < along the off-manifold ellipses; for transitions if the mean density on the manifold is
below the density off it. F3 holds for a factor if the Jacobian norm moves the paper's way in more than half of
its pairs. F4 holds if the median per-model Spearman correlation is positive and the median ROC AUC is above 0.5.

## Summary

{chr(10).join(summary)}

## F1: Jacobian norm and generalization gap over the sweep

![F1](figures/{FIGURES["f1"]})

Correlations of log10(mean Jacobian norm on the held-out points) with the generalization gap. Loss gap:
held-out minus training cross-entropy; accuracy gap: training minus held-out accuracy (SPEC section 4: both
sides in eval mode; the training side is the labels the model learned, random ones included).

{_markdown_table(f1)}

## F3: paired factors

Each pair is two models that differ in this factor only (same width, depth, optimizer, learning rate, seed and
so on). "as paper" is the share of pairs that move in the paper's direction (Jacobian ratio = variant / base).
"fitted" is the share of base / variant models that reached 100% training accuracy: where a variant did not
(full batch and random labels within the epoch cap, typically), its pairs compare a model that is still
training with one that has fitted its data.

| factor | paper: variant has | pairs | median Jacobian ratio | Jacobian as paper | reproduced | loss gap as paper | accuracy gap as paper | fitted (base / variant) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(f3_rows)}

![F3](figures/{FIGURES["f3"]})

## F2: on and off the data manifold

{_markdown_table(means)}

Means over the ellipses: `transitions` counted exactly along each closed ellipse, `transitions_sampled` counted
on its sampled points (a check: a sampled count can only miss crossings); density = exact transitions per unit
of Euclidean arc length. The untrained model is the trained one at its initial weights.
{check}

![F2](figures/{FIGURES["f2"]})

## F4: individual test points

Over {f4["models"]} models: Spearman correlation between the per-point Jacobian norm and the per-point
cross-entropy, median {num(f4["spearman_median"])} (quartiles {num(f4["spearman_q25"])} to
{num(f4["spearman_q75"])}), positive in {num(f4["spearman_positive"])} of the models. ROC AUC of the Jacobian
norm alone (no labels) for telling misclassified test points from the rest, over {f4["auc_models"]} models
with at least one misclassified point: median {num(f4["auc_median"])} (quartiles {num(f4["auc_q25"])} to
{num(f4["auc_q75"])}), above 0.5 in {num(f4["auc_above_half"])} of them. The left panel shows the model with
the median held-out accuracy, `{example_id}`.

![F4](figures/{FIGURES["f4"]})

## Files

- `results.csv`: one row per model, every hyper-parameter and measurement (the numbers above).
- `manifold.csv`: one row per ellipse of F2; `points/<model_id>.csv`: per held-out point records.
- TensorBoard logs of every run: `tensorboard --logdir runs`.
"""
    path = out_dir / "report.md"
    path.write_text(text)
    return path
