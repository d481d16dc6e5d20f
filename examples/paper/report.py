"""The report: a Markdown file that states, with the numbers, what reproduced and what did not (its figures are
drawn by ``examples.paper.figures``).

Every number in the report is computed from the files beside it (``results.csv``, ``manifold_profiles.csv``,
the per-point records) by ``examples.paper.analysis``, once, into :class:`Statistics`; the verdicts are the rules
of ``examples.paper.verdicts``, stated in the report before the numbers and applied to them, never tuned to the
outcome. Each section of the report is written by one function; the findings table is built once and shown in
the summary and again in the closing note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from examples.paper.analysis import (
    GAPS,
    MEASURES,
    QUANTITIES,
    binned_profile,
    f1_population,
    f1_statistics,
    f3_effects,
    f4_population,
    f4_summary,
    is_grid,
    jacobian_rank,
)
from examples.paper.figures import FIGURES, figure_f1, figure_f2, figure_f3, figure_f4
from examples.paper.grid import AXES
from examples.paper.manifold import ON_MANIFOLD
from examples.paper.verdicts import (
    F2_COMPARISONS,
    RULES,
    f1_found,
    f2_comparisons,
    f3_verdict,
    f4_beyond_confidence,
    f4_found,
)

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


@dataclass
class Statistics:
    """Every statistic the report shows, computed once from a :class:`Run`.

    Args:
        run: what they are computed from.
        grid: the F1 grid's models (fitted or not).
        population: F1's population, with the derived measures.
        f1: ``analysis.f1_statistics`` of the population.
        ranks: per gap, the Jacobian norm's rank among the measures by tau and by the granulated coefficient.
        profile: F2's binned mean profiles.
        f2: F2's comparisons and their verdicts.
        f3: ``analysis.f3_effects``, with each factor's ``verdict``.
        f4_models: F4's models.
        f4: ``analysis.f4_summary``, indexed by statistic.
        example_id: the model with the median held-out accuracy among F4's, shown point by point.
    """

    run: Run
    grid: pd.DataFrame
    population: pd.DataFrame
    f1: pd.DataFrame
    ranks: dict[str, tuple[int, int]]
    profile: pd.DataFrame
    f2: pd.DataFrame
    f3: pd.DataFrame
    f4_models: pd.DataFrame
    f4: pd.DataFrame
    example_id: str


def statistics(run: Run) -> Statistics:
    """The report's statistics of ``run``."""
    table = run.table
    population = f1_population(table)
    f1 = f1_statistics(population)
    f3 = f3_effects(run.pairs)
    f4_models = f4_population(table)
    return Statistics(
        run=run,
        grid=table[is_grid(table)],
        population=population,
        f1=f1,
        ranks={gap: (jacobian_rank(f1, gap, "tau"), jacobian_rank(f1, gap, "granulated")) for gap in GAPS},
        profile=binned_profile(run.profiles),
        f2=f2_comparisons(run.profiles),
        f3=f3.assign(verdict=[f3_verdict(r) for _, r in f3.iterrows()]),
        f4_models=f4_models,
        f4=f4_summary(f4_models).set_index("statistic"),
        example_id=f4_models.sort_values("val_accuracy").model_id.iloc[len(f4_models) // 2],
    )


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """``frame`` as a Markdown table, floats with ``digits`` decimals.

    Example:
        >>> print(markdown_table(pd.DataFrame({"a": [1.23456], "b": ["x"]})))
        | a | b |
        |---|---|
        | 1.235 | x |
    """
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    for _, row in frame.iterrows():
        cells = [num(v, digits) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings_table(s: Statistics) -> str:
    """The findings table: one row per finding with its verdict, and the legend of F2's three verdicts."""
    rows = ["| Finding | Paper | Measured here | Reproduced |", "|---|---|---|---|"]
    num_measures = len(MEASURES)
    for gap, r in s.f1[s.f1.column == "jacobian_norm"].set_index("gap").iterrows():
        rows.append(
            f"| F1 ({GAPS[gap]}) | the Jacobian norm correlates with the gap | Kendall tau {num(r.tau)} "
            f"[{num(r.ci_low)}, {num(r.ci_high)}] (p = {_p(r.p)}), granulated {num(r.granulated)}, {r.n} fitted "
            f"models; rank {s.ranks[gap][0]} of {num_measures} by tau, {s.ranks[gap][1]} by granulated | "
            f"{_yes(f1_found(r))} |"
        )
    f2_by = {(r.kind, r.quantity, r.comparison): r for r in s.f2.itertuples()}
    for kind in ON_MANIFOLD:
        for quantity in QUANTITIES.values():
            near, off, trained = (f2_by[(kind, quantity, comparison)] for comparison in F2_COMPARISONS)
            rows.append(
                f"| F2 ({quantity}, anchors {kind}) | lowest near training points, higher between, highest off "
                f"the manifold | {num(near.left)} near, {num(near.right)} between, {num(off.right)} off; "
                f"near / between {num(trained.left)} trained vs {num(trained.right)} untrained | "
                f"{_yes(near.holds)} / {_yes(off.holds)} / {_yes(trained.holds)} |"
            )
    for r in s.f3.itertuples():
        rows.append(
            f"| F3 ({r.factor}) | {r.paper} sensitivity | Jacobian norm {r.paper} in {r.jacobian_as_paper} of "
            f"{r.both_fit} pairs that both fit (median ratio {num(r.jacobian_ratio_median)}); {r.pairs - r.both_fit} "
            f"pairs apart | {_yes(r.verdict)} |"
        )
    f4 = s.f4
    rows.append(
        f"| F4 | the per-point Jacobian norm predicts the per-point loss | median Spearman "
        f"{num(f4.loc['f4_spearman_jacobian', 'median'])}, median ROC AUC for errors "
        f"{num(f4.loc['f4_auc_jacobian', 'median'])} | {_yes(f4_found(f4))} |"
    )
    rows.append(
        f"| F4 (beyond confidence) | (not in the paper) | median partial Spearman given max-softmax "
        f"{num(f4.loc['f4_partial_spearman', 'median'])}, median AUC within confidence bins "
        f"{num(f4.loc['f4_auc_jacobian_within_confidence', 'median'])}; max-softmax alone AUC "
        f"{num(f4.loc['f4_auc_max_softmax', 'median'])} | {_yes(f4_beyond_confidence(f4))} |"
    )
    rows.append("")
    rows.append("F2's three verdicts per row: near < between (trained) / between < off manifold (trained) / "
                "near-to-between ratio lower trained than untrained.")
    return "\n".join(rows)


def header(run: Run) -> str:
    """The title, what the report does, and how the run was made."""
    return f"""# Sensitivity and generalization: the reproduction, as measured

This report reproduces the four findings of Novak et al., "Sensitivity and Generalization in Neural Networks:
an Empirical Study" (ICLR 2018) on one data set, and judges the Jacobian norm as a generalization measure the
way Jiang et al., "Fantastic Generalization Measures and Where to Find Them" (ICLR 2020), judge one: against
simple baselines, with Kendall's tau, its bootstrap interval and the granulated Kendall coefficient.

Command: `{run.command}`

{run.seeds}

{chr(10).join(f"- {line}" for line in run.setup)}"""


def rules_section() -> str:
    """Every verdict rule, before any number."""
    return f"""## Verdict rules

Fixed before the numbers below were computed, and applied to them mechanically.

{RULES}"""


def summary_section(findings: str) -> str:
    """The findings table."""
    return f"## Summary\n\n{findings}"


def f1_section(s: Statistics) -> str:
    """F1: Kendall's tau, its interval and the granulated coefficient of every measure against each gap."""
    rows = []
    for r in s.f1.itertuples():
        rows.append({
            "measure": r.measure, "gap": GAPS[r.gap], "n": r.n, "Kendall tau": num(r.tau),
            "95% CI": f"[{num(r.ci_low)}, {num(r.ci_high)}]", "p": _p(r.p), "granulated": num(r.granulated),
            **{f"psi {axis}": num(getattr(r, f"psi_{axis}")) for axis in AXES},
        })
    return f"""## F1: the Jacobian norm and the baselines over the fitted models

![F1](figures/{FIGURES["f1"]})

Population: {len(s.population)} of the {len(s.grid)} grid models fitted their training set (the others are listed
under "Models that did not fit"). One row per measure and gap; "psi <axis>" is the mean tau over the groups of
fitted models that differ in that axis alone.

{markdown_table(pd.DataFrame(rows))}

The Jacobian norm ranks {s.ranks["gap_loss"][0]} of {len(MEASURES)} by tau and {s.ranks["gap_loss"][1]} by the
granulated coefficient for the loss gap; {s.ranks["gap_accuracy"][0]} and {s.ranks["gap_accuracy"][1]} for the
accuracy gap."""


def f2_section(s: Statistics) -> str:
    """F2: the comparisons with their verdicts, the binned profile of the Jacobian norm, the transitions'
    convergence evidence."""
    f2 = s.f2.assign(
        left=s.f2.left.map(num), right=s.f2.right.map(num),
        ellipses_agreeing=s.f2.ellipses_agreeing.map(lambda v: "" if np.isnan(v) else num(v)),
        holds=s.f2.holds.map(_yes),
    )
    levels = s.profile.pivot_table(index=["model", "kind"], columns="bin", values="jacobian_norm", sort=False)
    levels.columns = [f"u {b / 10:.1f}-{(b + 1) / 10:.1f}" for b in levels.columns]
    counts = s.run.curves
    half_gap = float((counts.transitions - counts.transitions_half).sum() / max(counts.transitions.sum(), 1))
    return f"""## F2: along ellipses through training points, between them and off the manifold

![F2](figures/{FIGURES["f2"]})

{markdown_table(f2)}

Mean Jacobian norm per bin of u (averaged within each ellipse, then over the ellipses):

{markdown_table(levels.reset_index())}

Transitions are counted on the sampled points of each ellipse; counted on every other point instead, the total
is {num(100 * half_gap, 2)}% lower (the discretization's convergence evidence: the count on all points can only
be closer to the exact one)."""


def f3_section(s: Statistics) -> str:
    """F3: each factor's paired effects and verdict, whether the augmentation helps here, every pair."""
    f3 = s.f3.assign(verdict=s.f3.verdict.map(_yes))[
        ["factor", "paper", "pairs", "base_fit", "variant_fit", "both_fit", "jacobian_ratio_median",
         "jacobian_as_paper", "sign_test_p", "verdict", "transitions_ratio_median", "transitions_as_paper",
         "gap_loss_as_paper", "gap_accuracy_as_paper", "val_accuracy_up", "val_accuracy_change_median"]]
    pairs = s.run.pairs
    pair_list = pairs.assign(
        jacobian_ratio=(pairs.jacobian_norm_variant / pairs.jacobian_norm_base),
        transitions_ratio=(pairs.transitions_variant / pairs.transitions_base),
        val_accuracy_change=pairs.val_accuracy_variant - pairs.val_accuracy_base,
        epochs_trained_variant=pairs.epochs_trained_variant.astype(int),
    )[["factor", "model_id_base", "both_fit", "epochs_trained_variant", "jacobian_ratio", "transitions_ratio",
       "val_accuracy_change"]]
    augmentation = s.f3[s.f3.factor == "augmentation"]
    aug_text = (
        f"The augmentation raised held-out accuracy in {int(augmentation.val_accuracy_up.iloc[0])} of "
        f"{int(augmentation.both_fit.iloc[0])} clean pairs (median change "
        f"{num(float(augmentation.val_accuracy_change_median.iloc[0]), 4)}): "
        + ("on this data it does help generalization." if augmentation.val_accuracy_up.iloc[0] > augmentation.both_fit.iloc[0] / 2
           else "on this data it does not clearly help generalization, so its pairs test the paper's premise only weakly.")
        if len(augmentation) and augmentation.both_fit.iloc[0] else "No augmentation pair fitted on both sides."
    )
    return f"""## F3: paired factors, on pairs that both fit

{markdown_table(f3)}

Counts ("as paper", "val_accuracy_up") are over the "both_fit" pairs; the sign test is two-sided. Ratios
are variant / base; transitions are the mean over four fixed ellipses through training points (sampled count).
{aug_text}

![F3](figures/{FIGURES["f3"]})

Every pair (the verdicts use the rows with both_fit True):

{markdown_table(pair_list)}"""


def f4_section(s: Statistics) -> str:
    """F4: the per-model statistics of the held-out points, summarized, beside the max-softmax probability."""
    auc_difference = (s.f4_models.f4_auc_jacobian - s.f4_models.f4_auc_max_softmax).dropna()
    return f"""## F4: individual test points, beside the model's confidence

Over {len(s.f4_models)} fitted models on true labels: per-model statistics of the held-out points, summarized.
"spearman_*": Spearman correlation with the per-point loss; "auc_*": ROC AUC for the misclassified points (the
max-softmax enters as 1 - max p); "partial_spearman": Jacobian norm and loss with the max-softmax held fixed;
"auc_jacobian_within_confidence": the Jacobian norm's AUC within five quantile bins of the max-softmax.
"above_null" is the share of models above 0 (correlations) or 0.5 (AUCs), with its two-sided sign test.
Most held-out points sit at a max-softmax near 1, so the lowest quantile bin spans a wide range of confidence
and holds most errors: within it the Jacobian norm still tracks the confidence, which inflates the within-bin
AUC. The partial rank correlation has no such bins, and is the stricter of the two tests.

{markdown_table(s.f4.reset_index())}

Model by model, the Jacobian norm's AUC minus the max-softmax probability's: median
{num(float(auc_difference.median()), 4)}, positive in {int((auc_difference > 0).sum())} of {len(auc_difference)}
models. The left panel shows the model with the median held-out accuracy, `{s.example_id}`.

![F4](figures/{FIGURES["f4"]})"""


def unfitted_section(s: Statistics) -> str:
    """The models that did not reach the fit criterion, listed apart."""
    table = s.run.table
    unfitted = table[~table.reached_target.astype(bool)]
    rows = unfitted[["model_id", "epochs_trained", "max_epochs", "train_accuracy", "val_accuracy"]].astype(
        {"epochs_trained": int, "max_epochs": int})
    variants = table[~is_grid(table)]
    by_part = (f"{int((~s.grid.reached_target.astype(bool)).sum())} of {len(s.grid)} grid models and "
               f"{int((~variants.reached_target.astype(bool)).sum())} of {len(variants)} variants")
    return f"""## Models that did not fit

{len(unfitted)} models did not reach the fit criterion within their budget ({by_part}); F1 and F3 leave them
out, and they are listed here.

{markdown_table(rows) if len(unfitted) else "(none)"}"""


def files_section() -> str:
    """The files beside the report."""
    return """## Files

- `results.csv`: one row per model, every hyper-parameter and measurement (all numbers above).
- `manifold_profiles.csv`: every point and segment of F2's ellipses; `manifold.csv`: one row per ellipse.
- `points/<model_id>.csv`: per held-out point records of every model.
- TensorBoard logs of every run: `tensorboard --logdir runs`."""


def closing_section(s: Statistics, findings: str) -> str:
    """The findings again, the Jacobian norm's ranks and the wall time."""
    ranks = s.ranks
    return f"""## Closing note

{findings}

The Jacobian norm's rank among the {len(MEASURES)} measures of F1: {ranks["gap_loss"][0]} by tau and
{ranks["gap_loss"][1]} by the granulated coefficient (loss gap), {ranks["gap_accuracy"][0]} and
{ranks["gap_accuracy"][1]} (accuracy gap). Wall time: {s.run.wall_time}."""


def write_figures(s: Statistics, out_dir: Path) -> None:
    """Every figure of the report into ``out_dir/figures``."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    example = pd.read_csv(out_dir / "points" / f"{s.example_id}.csv")
    figure_f1(s.population, s.f1, figures / FIGURES["f1"])
    figure_f2(s.profile, figures / FIGURES["f2"])
    figure_f3(s.run.pairs, figures / FIGURES["f3"])
    figure_f4(s.f4_models, example, s.example_id, figures / FIGURES["f4"])


def write_report(out_dir: Path, run: Run) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md``; return the report's path."""
    s = statistics(run)
    write_figures(s, out_dir)
    findings = findings_table(s)
    sections = [
        header(run), rules_section(), summary_section(findings), f1_section(s), f2_section(s), f3_section(s),
        f4_section(s), unfitted_section(s), files_section(), closing_section(s, findings),
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
