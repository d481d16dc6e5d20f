"""The report: PNG figures and a Markdown file that states, with the numbers, what reproduced and what did not.

Every number in the report is computed from the files beside it (``results.csv``, ``manifold_profiles.csv``,
the per-point records) by ``examples.paper.analysis`` and ``examples.paper.manifold``; the verdicts are rules
stated in the report before the numbers and applied to them, never tuned to the outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from examples.paper.analysis import (  # noqa: E402
    GAPS,
    MEASURES,
    binned_profile,
    f1_population,
    f1_statistics,
    f3_effects,
    f4_population,
    f4_summary,
    is_grid,
    jacobian_rank,
)
from examples.paper.grid import AXES  # noqa: E402
from examples.paper.manifold import KINDS  # noqa: E402
from examples.paper.verdicts import (  # noqa: E402
    BETWEEN,
    NEAR,
    RULES,
    f1_found,
    f2_comparisons,
    f3_verdict,
    f4_beyond_confidence,
    f4_found,
)

FIGURES = {
    "f1": "f1_measures.png",
    "f2": "f2_profiles.png",
    "f3": "f3_pairs.png",
    "f4": "f4_points.png",
}

SECTIONS = ("Verdict rules", "Summary", "F1", "F2", "F3", "F4", "Models that did not fit", "Files", "Closing note")


def num(value: float, digits: int = 3) -> str:
    """How the report writes a number (fixed decimals); the tests format the table's values the same way."""
    return f"{value:.{digits}f}"


def _p(value: float) -> str:
    return f"{value:.2g}"


def _yes(flag: bool | str) -> str:
    if isinstance(flag, str):
        return f"**{flag}**"
    return "**yes**" if flag else "**no**"


@dataclass
class Run:
    """What the report is written from: the sweep's table, the F3 pairs, the F2 profiles and curves, and where
    and how the run was made."""

    table: pd.DataFrame
    pairs: pd.DataFrame
    profiles: pd.DataFrame
    curves: pd.DataFrame
    command: str
    seeds: str
    setup: Sequence[str]
    wall_time: str


def figure_f1(population: pd.DataFrame, f1: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, gap in zip(axes[:2], GAPS, strict=True):
        scatter = ax.scatter(population[gap], population.jacobian_norm, c=population.depth, s=16, cmap="viridis")
        ax.set_yscale("log")
        ax.set_xlabel(GAPS[gap])
        ax.set_ylabel("mean Jacobian norm on held-out points")
    fig.colorbar(scatter, ax=axes[1], label="depth")
    rows = f1[f1.gap == "gap_loss"].reset_index(drop=True)
    y = np.arange(len(rows))
    axes[2].errorbar(rows.tau, y, xerr=[rows.tau - rows.ci_low, rows.ci_high - rows.tau], fmt="o", label="tau (95% CI)")
    axes[2].scatter(rows.granulated, y, marker="x", color="tab:red", label="granulated")
    axes[2].axvline(0, color="black", linewidth=0.6)
    axes[2].set_yticks(y, rows.measure, fontsize=8)
    axes[2].set_xlabel("Kendall with the loss gap")
    axes[2].legend(fontsize=8)
    fig.suptitle("F1: the Jacobian norm and the baselines over the models that fit their training set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f2(profile: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    colours = dict(zip(KINDS, ("tab:blue", "tab:green", "tab:red"), strict=True))
    for (model, kind), rows in profile.groupby(["model", "kind"], sort=False):
        style = {"color": colours[kind], "linestyle": "-" if model == "trained" else ":", "marker": "o", "markersize": 3}
        axes[0].plot(rows.u_mid, rows.jacobian_norm, label=f"{model}, {kind}", **style)
        axes[1].plot(rows.u_mid, rows.segment_transitions, label=f"{model}, {kind}", **style)
    for ax in axes:
        ax.axvspan(0, NEAR, color="grey", alpha=0.15)
        ax.axvspan(BETWEEN, 1, color="grey", alpha=0.07)
        ax.set_xlabel("distance in t to the nearest anchor (0: at an anchor, 1: half way between two)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean Jacobian norm")
    axes[1].set_ylabel("mean transitions per segment")
    axes[0].legend(fontsize=7)
    fig.suptitle("F2: mean profiles along the ellipses (shaded: the 'near' and 'between' regions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f3(pairs: pd.DataFrame, path: Path) -> None:
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
    fig.suptitle("F3: base model -> variant (red: both fit; grey: at least one did not)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_f4(models: pd.DataFrame, example: pd.DataFrame, example_id: str, path: Path) -> None:
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
    fig.suptitle("F4: the Jacobian norm at individual test points, beside the model's confidence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """``frame`` as a Markdown table, floats with ``digits`` decimals."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    for _, row in frame.iterrows():
        cells = [num(v, digits) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def f1_table(f1: pd.DataFrame) -> pd.DataFrame:
    """The F1 table of the report: one row per (measure, gap)."""
    rows = []
    for r in f1.itertuples():
        rows.append({
            "measure": r.measure, "gap": GAPS[r.gap], "n": r.n, "Kendall tau": num(r.tau),
            "95% CI": f"[{num(r.ci_low)}, {num(r.ci_high)}]", "p": _p(r.p), "granulated": num(r.granulated),
            **{f"psi {axis}": num(getattr(r, f"psi_{axis}")) for axis in AXES},
        })
    return pd.DataFrame(rows)


def write_report(out_dir: Path, run: Run) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md``; return the report's path."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    table = run.table
    population = f1_population(table)
    f1 = f1_statistics(population)
    f3 = f3_effects(run.pairs)
    f4_models = f4_population(table)
    f4 = f4_summary(f4_models).set_index("statistic")
    profile = binned_profile(run.profiles)
    f2 = f2_comparisons(run.profiles)
    example_id = f4_models.sort_values("val_accuracy").model_id.iloc[len(f4_models) // 2]
    example = pd.read_csv(out_dir / "points" / f"{example_id}.csv")
    figure_f1(population, f1, figures / FIGURES["f1"])
    figure_f2(profile, figures / FIGURES["f2"])
    figure_f3(run.pairs, figures / FIGURES["f3"])
    figure_f4(f4_models, example, example_id, figures / FIGURES["f4"])

    grid = table[is_grid(table)]
    unfitted = table[~table.reached_target.astype(bool)]
    jac = f1[f1.column == "jacobian_norm"].set_index("gap")
    ranks = {gap: (jacobian_rank(f1, gap, "tau"), jacobian_rank(f1, gap, "granulated")) for gap in GAPS}
    num_measures = len(MEASURES)
    f2_by = {(r.kind, r.quantity, r.comparison): r for r in f2.itertuples()}
    auc_difference = (f4_models.f4_auc_jacobian - f4_models.f4_auc_max_softmax).dropna()

    findings = ["| Finding | Paper | Measured here | Reproduced |", "|---|---|---|---|"]
    for gap, r in jac.iterrows():
        findings.append(
            f"| F1 ({GAPS[gap]}) | the Jacobian norm correlates with the gap | Kendall tau {num(r.tau)} "
            f"[{num(r.ci_low)}, {num(r.ci_high)}] (p = {_p(r.p)}), granulated {num(r.granulated)}, {r.n} fitted "
            f"models; rank {ranks[gap][0]} of {num_measures} by tau, {ranks[gap][1]} by granulated | "
            f"{_yes(f1_found(r))} |"
        )
    for kind in KINDS[:2]:
        for quantity in ("Jacobian norm", "transitions per segment"):
            near = f2_by[(kind, quantity, "near < between (trained)")]
            off = f2_by[(kind, quantity, "between < off manifold (trained)")]
            trained = f2_by[(kind, quantity, "near / between: trained < untrained")]
            findings.append(
                f"| F2 ({quantity}, anchors {kind}) | lowest near training points, higher between, highest off "
                f"the manifold | {num(near.left)} near, {num(near.right)} between, {num(off.right)} off; "
                f"near / between {num(trained.left)} trained vs {num(trained.right)} untrained | "
                f"{_yes(near.holds)} / {_yes(off.holds)} / {_yes(trained.holds)} |"
            )
    for r in f3.itertuples():
        findings.append(
            f"| F3 ({r.factor}) | {r.paper} sensitivity | Jacobian norm {r.paper} in {r.jacobian_as_paper} of "
            f"{r.both_fit} pairs that both fit (median ratio {num(r.jacobian_ratio_median)}); {r.pairs - r.both_fit} "
            f"pairs apart | {_yes(f3_verdict(pd.Series(r._asdict())))} |"
        )
    findings.append(
        f"| F4 | the per-point Jacobian norm predicts the per-point loss | median Spearman "
        f"{num(f4.loc['f4_spearman_jacobian', 'median'])}, median ROC AUC for errors "
        f"{num(f4.loc['f4_auc_jacobian', 'median'])} | {_yes(f4_found(f4))} |"
    )
    findings.append(
        f"| F4 (beyond confidence) | (not in the paper) | median partial Spearman given max-softmax "
        f"{num(f4.loc['f4_partial_spearman', 'median'])}, median AUC within confidence bins "
        f"{num(f4.loc['f4_auc_jacobian_within_confidence', 'median'])}; max-softmax alone AUC "
        f"{num(f4.loc['f4_auc_max_softmax', 'median'])} | {_yes(f4_beyond_confidence(f4))} |"
    )
    findings.append("")
    findings.append("F2's three verdicts per row: near < between (trained) / between < off manifold (trained) / "
                    "near-to-between ratio lower trained than untrained.")
    findings_table = "\n".join(findings)

    f2_rows = f2.assign(
        left=f2.left.map(num), right=f2.right.map(num),
        ellipses_agreeing=f2.ellipses_agreeing.map(lambda v: "" if np.isnan(v) else num(v)),
        holds=f2.holds.map(_yes),
    )
    levels = profile.pivot_table(index=["model", "kind"], columns="bin", values="jacobian_norm", sort=False)
    levels.columns = [f"u {b / 10:.1f}-{(b + 1) / 10:.1f}" for b in levels.columns]
    counts = run.curves
    half_gap = float((counts.transitions - counts.transitions_half).sum() / max(counts.transitions.sum(), 1))

    f3_rows = f3.assign(verdict=[_yes(f3_verdict(r)) for _, r in f3.iterrows()])
    f3_rows = f3_rows[["factor", "paper", "pairs", "base_fit", "variant_fit", "both_fit", "jacobian_ratio_median",
                       "jacobian_as_paper", "sign_test_p", "verdict", "transitions_ratio_median",
                       "transitions_as_paper", "gap_loss_as_paper", "gap_accuracy_as_paper", "val_accuracy_up",
                       "val_accuracy_change_median"]]
    pair_list = run.pairs.assign(
        jacobian_ratio=(run.pairs.jacobian_norm_variant / run.pairs.jacobian_norm_base),
        transitions_ratio=(run.pairs.transitions_variant / run.pairs.transitions_base),
        val_accuracy_change=run.pairs.val_accuracy_variant - run.pairs.val_accuracy_base,
        epochs_trained_variant=run.pairs.epochs_trained_variant.astype(int),
    )[["factor", "model_id_base", "both_fit", "epochs_trained_variant", "jacobian_ratio", "transitions_ratio",
       "val_accuracy_change"]]
    augmentation = f3[f3.factor == "augmentation"]
    aug_text = (
        f"The augmentation raised held-out accuracy in {int(augmentation.val_accuracy_up.iloc[0])} of "
        f"{int(augmentation.both_fit.iloc[0])} clean pairs (median change "
        f"{num(float(augmentation.val_accuracy_change_median.iloc[0]), 4)}): "
        + ("on this data it does help generalization." if augmentation.val_accuracy_up.iloc[0] > augmentation.both_fit.iloc[0] / 2
           else "on this data it does not clearly help generalization, so its pairs test the paper's premise only weakly.")
        if len(augmentation) and augmentation.both_fit.iloc[0] else "No augmentation pair fitted on both sides."
    )

    f4_rows = f4.reset_index()
    unfitted_rows = unfitted[["model_id", "epochs_trained", "max_epochs", "train_accuracy", "val_accuracy"]].astype(
        {"epochs_trained": int, "max_epochs": int})
    by_part = (f"{int((~grid.reached_target.astype(bool)).sum())} of {len(grid)} grid models and "
               f"{int((~table[~is_grid(table)].reached_target.astype(bool)).sum())} of {int((~is_grid(table)).sum())} "
               "variants")
    text = f"""# Sensitivity and generalization: the reproduction, as measured

This report reproduces the four findings of Novak et al., "Sensitivity and Generalization in Neural Networks:
an Empirical Study" (ICLR 2018) on one data set, and judges the Jacobian norm as a generalization measure the
way Jiang et al., "Fantastic Generalization Measures and Where to Find Them" (ICLR 2020), judge one: against
simple baselines, with Kendall's tau, its bootstrap interval and the granulated Kendall coefficient.

Command: `{run.command}`

{run.seeds}

{chr(10).join(f"- {line}" for line in run.setup)}

## Verdict rules

Fixed before the numbers below were computed, and applied to them mechanically.

{RULES}

## Summary

{findings_table}

## F1: the Jacobian norm and the baselines over the fitted models

![F1](figures/{FIGURES["f1"]})

Population: {len(population)} of the {len(grid)} grid models fitted their training set (the others are listed
under "Models that did not fit"). One row per measure and gap; "psi <axis>" is the mean tau over the groups of
fitted models that differ in that axis alone.

{markdown_table(f1_table(f1))}

The Jacobian norm ranks {ranks["gap_loss"][0]} of {num_measures} by tau and {ranks["gap_loss"][1]} by the
granulated coefficient for the loss gap; {ranks["gap_accuracy"][0]} and {ranks["gap_accuracy"][1]} for the
accuracy gap.

## F2: along ellipses through training points, between them and off the manifold

![F2](figures/{FIGURES["f2"]})

{markdown_table(f2_rows)}

Mean Jacobian norm per bin of u (averaged within each ellipse, then over the ellipses):

{markdown_table(levels.reset_index())}

Transitions are counted on the sampled points of each ellipse; counted on every other point instead, the total
is {num(100 * half_gap, 2)}% lower (the discretization's convergence evidence: the count on all points can only
be closer to the exact one).

## F3: paired factors, on pairs that both fit

{markdown_table(f3_rows)}

Counts ("as paper", "val_accuracy_up") are over the {'"both_fit"'} pairs; the sign test is two-sided. Ratios
are variant / base; transitions are the mean over four fixed ellipses through training points (sampled count).
{aug_text}

![F3](figures/{FIGURES["f3"]})

Every pair (the verdicts use the rows with both_fit True):

{markdown_table(pair_list)}

## F4: individual test points, beside the model's confidence

Over {len(f4_models)} fitted models on true labels: per-model statistics of the held-out points, summarized.
"spearman_*": Spearman correlation with the per-point loss; "auc_*": ROC AUC for the misclassified points (the
max-softmax enters as 1 - max p); "partial_spearman": Jacobian norm and loss with the max-softmax held fixed;
"auc_jacobian_within_confidence": the Jacobian norm's AUC within five quantile bins of the max-softmax.
"above_null" is the share of models above 0 (correlations) or 0.5 (AUCs), with its two-sided sign test.
Most held-out points sit at a max-softmax near 1, so the lowest quantile bin spans a wide range of confidence
and holds most errors: within it the Jacobian norm still tracks the confidence, which inflates the within-bin
AUC. The partial rank correlation has no such bins, and is the stricter of the two tests.

{markdown_table(f4_rows)}

Model by model, the Jacobian norm's AUC minus the max-softmax probability's: median
{num(float(auc_difference.median()), 4)}, positive in {int((auc_difference > 0).sum())} of {len(auc_difference)}
models. The left panel shows the model with the median held-out accuracy, `{example_id}`.

![F4](figures/{FIGURES["f4"]})

## Models that did not fit

{len(unfitted)} models did not reach the fit criterion within their budget ({by_part}); F1 and F3 leave them
out, and they are listed here.

{markdown_table(unfitted_rows) if len(unfitted) else "(none)"}

## Files

- `results.csv`: one row per model, every hyper-parameter and measurement (all numbers above).
- `manifold_profiles.csv`: every point and segment of F2's ellipses; `manifold.csv`: one row per ellipse.
- `points/<model_id>.csv`: per held-out point records of every model.
- TensorBoard logs of every run: `tensorboard --logdir runs`.

## Closing note

{findings_table}

The Jacobian norm's rank among the {num_measures} measures of F1: {ranks["gap_loss"][0]} by tau and
{ranks["gap_loss"][1]} by the granulated coefficient (loss gap), {ranks["gap_accuracy"][0]} and
{ranks["gap_accuracy"][1]} (accuracy gap). Wall time: {run.wall_time}.
"""
    path = out_dir / "report.md"
    path.write_text(text)
    return path
