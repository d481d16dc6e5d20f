"""The report: a Markdown file that states, with the numbers, what reproduced and what did not (its figures are
drawn by ``examples.paper.figures``).

Every number in the report is computed from the files beside it (``results.csv``, ``manifold_profiles.csv``,
the per-point records) by ``examples.paper.analysis``, once, into :class:`Statistics`; the verdicts are the rules
of ``examples.paper.verdicts``, stated in the report before the numbers and applied to them, never tuned to the
outcome. Each section of the report is written by one function; the findings table is built once and shown in
the summary and again in the closing note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from examples.paper.analysis import (
    BESIDE,
    GAPS,
    HEADLINE_GAP,
    MEASURES,
    QUANTITIES,
    binned_profile,
    f1_population,
    f1_statistics,
    f3_effects,
    f4_population,
    f4_summary,
    in_grid,
    is_grid,
    jacobian_rank,
    region_means,
    sizes_by_group,
    sizes_statistics,
)
from examples.paper.figures import FIGURES, figure_f1, figure_f2, figure_f3, figure_f4, figure_sizes
from examples.paper.grid import AXES
from examples.paper.manifold import KINDS, LOSS_TARGET, MODELS
from examples.paper.measures import TRANSITION_ELLIPSES, TRANSITION_POINTS
from examples.paper.verdicts import (
    BETWEEN,
    COMPARABLE,
    F2_COMPARISONS,
    NEAR,
    RULES,
    comparable_normalizations,
    f1_found,
    f2_comparisons,
    f3_verdict,
    f4_beyond_confidence,
    f4_found,
    sizes_found,
)

SECTIONS = ("Verdict rules", "Summary", "F1", "Sizes", "F2", "F3", "F4", "Models that did not fit", "Files",
            "Closing note")
#: The small grid's statistics are shown beside the whole grid's when the population holds at least this many of
#: its models and more models besides.
MIN_SMALL_GRID = 10


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
    """What the report is written from: the sweep's table, the F3 pairs, the F2 profiles and curves and how F2's
    model trained, and where and how the run was made.

    Args:
        f2_model: ``epochs``, ``first_fit_epoch`` (``None`` if it never fit), ``train_loss``, ``first_fit_loss``,
            ``train_accuracy``, ``clearance`` and ``radius`` of ``manifold.ManifoldResult``, and its ``model_id``.
    """

    table: pd.DataFrame
    pairs: pd.DataFrame
    profiles: pd.DataFrame
    curves: pd.DataFrame
    command: str
    seeds: str
    setup: Sequence[str]
    wall_time: str
    f2_model: dict[str, Any]


@dataclass
class Statistics:
    """Every statistic the report shows, computed once from a :class:`Run`.

    Args:
        run: what they are computed from.
        grid: the F1 grid's models (fitted or not).
        population: F1's population, with the derived measures.
        f1: ``analysis.f1_statistics`` of the population.
        ranks: per gap, the Jacobian norm's rank among the measures by tau and by the granulated coefficient.
        small: ``analysis.f1_statistics`` over the population's models of the small grid, or ``None`` when the
            population is not larger than that (or holds fewer than ``MIN_SMALL_GRID`` of them).
        small_ranks: ``ranks`` for ``small``.
        sizes: ``analysis.sizes_statistics`` of the population.
        size_groups: ``analysis.sizes_by_group`` of the population.
        profile: F2's binned mean profiles.
        regions: F2's region means.
        f2: F2's comparisons and their verdicts, for the trained and the first-fit model.
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
    small: pd.DataFrame | None
    small_ranks: dict[str, tuple[int, int]] | None
    sizes: pd.DataFrame
    size_groups: pd.DataFrame
    profile: pd.DataFrame
    regions: pd.DataFrame
    f2: pd.DataFrame
    f3: pd.DataFrame
    f4_models: pd.DataFrame
    f4: pd.DataFrame
    example_id: str


def _ranks(f1: pd.DataFrame) -> dict[str, tuple[int, int]]:
    return {gap: (jacobian_rank(f1, gap, "tau"), jacobian_rank(f1, gap, "granulated")) for gap in GAPS}


def statistics(run: Run) -> Statistics:
    """The report's statistics of ``run``."""
    table = run.table
    population = f1_population(table)
    f1 = f1_statistics(population)
    small_population = population[in_grid(population, "small")].reset_index(drop=True)
    small = (f1_statistics(small_population)
             if MIN_SMALL_GRID <= len(small_population) < len(population) else None)
    f3 = f3_effects(run.pairs)
    f4_models = f4_population(table)
    return Statistics(
        run=run,
        grid=table[is_grid(table)],
        population=population,
        f1=f1,
        ranks=_ranks(f1),
        small=small,
        small_ranks=_ranks(small) if small is not None else None,
        sizes=sizes_statistics(population),
        size_groups=sizes_by_group(population),
        profile=binned_profile(run.profiles),
        regions=region_means(run.profiles, NEAR, BETWEEN),
        f2=pd.concat([f2_comparisons(run.profiles, model) for model in ("trained", "first fit")], ignore_index=True),
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
    # Column by column, so that an integer column stays integer in a row that also holds floats.
    columns = [frame[c].tolist() for c in frame.columns]
    for row in zip(*columns, strict=True):
        cells = [num(v, digits) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f1_cells(r: Any, ranks: tuple[int, int]) -> str:
    return (f"Kendall tau {num(r.tau)} [{num(r.ci_low)}, {num(r.ci_high)}] (p = {_p(r.p)}), granulated "
            f"{num(r.granulated)}, {r.n} fitted models; rank {ranks[0]} of {len(MEASURES)} by tau, {ranks[1]} by "
            f"granulated")


def findings_table(s: Statistics) -> str:
    """The findings table: one row per finding with its verdict (F1's on the accuracy gap first), the further
    checks beside them, and the legend of F2's three verdicts."""
    rows = ["| Finding | Paper | Measured here | Reproduced |", "|---|---|---|---|"]
    jacobian = s.f1[s.f1.column == "jacobian_norm"].set_index("gap")
    head = jacobian.loc[HEADLINE_GAP]
    rows.append(f"| F1 | the Jacobian norm correlates with the generalization gap (1 - test accuracy of models that "
                f"fit) | {_f1_cells(head, s.ranks[HEADLINE_GAP])} | {_yes(f1_found(head))} |")
    for gap in GAPS:
        if gap == HEADLINE_GAP:
            continue
        r = jacobian.loc[gap]
        rows.append(f"| F1, further check: the {GAPS[gap]} | (not the paper's gap) | {_f1_cells(r, s.ranks[gap])} "
                    f"| check, not a verdict: {'consistent' if f1_found(r) else 'not consistent'} |")
    if s.small is not None and s.small_ranks is not None:
        small = s.small[s.small.column == "jacobian_norm"].set_index("gap").loc[HEADLINE_GAP]
        rows.append(f"| F1 on the small grid's models within it | (population size) | "
                    f"{_f1_cells(small, s.small_ranks[HEADLINE_GAP])} | reported, not judged |")
    raw = s.sizes.set_index("column").loc["transitions"]
    comparable = comparable_normalizations(s.sizes)
    rows.append(
        f"| Sizes | transition counts alone do not compare networks of different sizes | raw count's Kendall tau "
        f"with the number of units {num(raw.tau_units)} (p = {_p(raw.p_units)}), {int(s.population.units.min())} to "
        f"{int(s.population.units.max())} units; normalizations that make counts comparable: "
        f"{', '.join(comparable) if comparable else 'none of those tried'} | {_yes(sizes_found(s.sizes))} |"
    )
    f2_by = {(r.model, r.quantity, r.comparison): r for r in s.f2.itertuples()}
    for quantity in QUANTITIES.values():
        near, same, dip = (f2_by[("trained", quantity, comparison)] for comparison in F2_COMPARISONS)
        first = [f2_by[("first fit", quantity, comparison)].holds for comparison in F2_COMPARISONS]
        rows.append(
            f"| F2 ({quantity}) | different classes: far lower at the anchors than between; same class below random "
            f"ellipses; the dip made by training | different classes {num(near.left)} near vs {num(near.right)} "
            f"between; same class {num(same.left)} vs random {num(same.right)}; near / between {num(dip.left)} "
            f"trained vs {num(dip.right)} untrained; first-fit model: {' / '.join(_yes(f) for f in first)} | "
            f"{_yes(near.holds)} / {_yes(same.holds)} / {_yes(dip.holds)} |"
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
    rows.append("F2's three verdicts per row, for the model trained by F2's rule (the first-fit model's in the "
                "measured column): different classes near < between / same class < random ellipse / the "
                "different-class near-to-between ratio lower trained than untrained.")
    return "\n".join(rows)


def header(run: Run) -> str:
    """The title, what the report does, and how the run was made."""
    return f"""# Sensitivity and generalization: the reproduction, as measured

This report reproduces the four findings of Novak et al., "Sensitivity and Generalization in Neural Networks:
an Empirical Study" (ICLR 2018), and their caveat on network sizes, on one data set, and judges the Jacobian norm as a generalization measure the
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


def _f1_rows(f1: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for gap in GAPS:
        for r in f1[f1.gap == gap].itertuples():
            rows.append({
                "measure": r.measure, "gap": GAPS[r.gap], "n": r.n, "Kendall tau": num(r.tau),
                "95% CI": f"[{num(r.ci_low)}, {num(r.ci_high)}]", "p": _p(r.p), "granulated": num(r.granulated),
                **{f"psi {axis}": num(getattr(r, f"psi_{axis}")) for axis in AXES},
            })
    return pd.DataFrame(rows)


def _scale_text(s: Statistics) -> str:
    if s.small is None or s.small_ranks is None:
        return ("The population holds no more than the small grid's models (or too few of them), so there is no "
                "comparison of population sizes in this run.")
    rows = []
    for gap in GAPS:
        for column, label in MEASURES.items():
            small = s.small[(s.small.column == column) & (s.small.gap == gap)].iloc[0]
            full = s.f1[(s.f1.column == column) & (s.f1.gap == gap)].iloc[0]
            rows.append({"measure": label, "gap": GAPS[gap], f"tau, {small.n} models": num(small.tau),
                         f"tau, {full.n} models": num(full.tau),
                         f"granulated, {small.n}": num(small.granulated), f"granulated, {full.n}": num(full.granulated)})
    n_small, n_full = int(s.small.n.iloc[0]), int(s.f1.n.iloc[0])
    ranks = "; ".join(
        f"{GAPS[gap]}: rank {s.small_ranks[gap][0]} by tau and {s.small_ranks[gap][1]} by granulated over the "
        f"{n_small}, {s.ranks[gap][0]} and {s.ranks[gap][1]} over the {n_full}" for gap in GAPS)
    return f"""### From the small grid to the whole grid

The same statistics over the fitted models of the small grid (`--grid small`: the 144 models of earlier
versions) that this sweep holds, beside the whole population: how the Jacobian norm's tau and rank move with the
population's size. The Jacobian norm's rank among the {len(MEASURES)} measures: {ranks}.

{markdown_table(pd.DataFrame(rows))}"""


def f1_section(s: Statistics) -> str:
    """F1: Kendall's tau, its interval and the granulated coefficient of every measure against each gap, the
    accuracy gap first; the small grid beside the whole."""
    groups = {axis: sum(1 for _, g in s.population.groupby([a for a in AXES if a != axis])
                        if len(g) >= 2 and g[axis].nunique() >= 2) for axis in AXES}
    head, other = HEADLINE_GAP, next(g for g in GAPS if g != HEADLINE_GAP)
    return f"""## F1: the Jacobian norm and the baselines over the fitted models

![F1](figures/{FIGURES["f1"]})

Population: {len(s.population)} of the {len(s.grid)} grid models fitted their training set (the others are listed
under "Models that did not fit"). One row per measure and gap, the accuracy gap (F1's verdict) first, the loss
gap (a further check) after; "psi <axis>" is the mean tau over the groups of fitted models that differ in that
axis alone. The groups behind each axis's psi (two or more fitted models that share every other axis): {", ".join(
        f"{axis} {n}" for axis, n in groups.items())}.

{markdown_table(_f1_rows(s.f1))}

The Jacobian norm ranks {s.ranks[head][0]} of {len(MEASURES)} by tau and {s.ranks[head][1]} by the granulated
coefficient for the {GAPS[head]}; {s.ranks[other][0]} and {s.ranks[other][1]} for the {GAPS[other]}.

{_scale_text(s)}"""


def sizes_section(s: Statistics) -> str:
    """The paper's caveat on sizes: how the transition counts scale with the number of units, raw and
    normalized, and the counts within groups of one width and depth."""
    comparable = set(comparable_normalizations(s.sizes))
    table = s.sizes.assign(
        comparable=[_yes(n in comparable) for n in s.sizes.normalization],
        p_units=s.sizes.p_units.map(_p), p_gap=s.sizes.p_gap.map(_p),
    )[["normalization", "n", "tau_units", "p_units", "tau_gap", "p_gap", "within_gap", "groups",
       "pooled_minus_within", "comparable"]]
    raw = s.sizes.set_index("column").loc["transitions"]
    verdict = ("so raw counts do not compare networks of different sizes here, as the paper says"
               if sizes_found(s.sizes) else "so by the rule this data does not show raw counts growing with size")
    chosen = (f"{', '.join(sorted(comparable))} made the counts comparable by the rule" if comparable
              else "none of the normalizations tried made the counts comparable by the rule")
    return f"""## Sizes: transition counts across networks of different sizes

![Sizes](figures/{FIGURES["sizes"]})

Over F1's {len(s.population)} fitted models ({int(s.population.units.min())} to {int(s.population.units.max())}
piecewise-linear units: width x depth), the transitions along {TRANSITION_ELLIPSES} fixed ellipses through
training points, {TRANSITION_POINTS} points each, the same ellipses for every model. The raw count's Kendall tau with the number of units is
{num(raw.tau_units)} (p = {_p(raw.p_units)}): {verdict}; {chosen} (|tau| with the units below {COMPARABLE}, and
the pooled tau with the {GAPS[HEADLINE_GAP]} within {COMPARABLE} of the mean tau within groups of one width and
depth). Per unit length is the raw count over one constant here (all models share the ellipses), so it ranks the
models as the raw count does; it matters between curves, not between models (see F2).

"tau_units": Kendall's tau with the number of units; "tau_gap": with the {GAPS[HEADLINE_GAP]} over all models;
"within_gap": the mean tau with it within the {int(raw.groups)} groups of one width and depth (where the
normalization changes nothing, since all the group's models have the same size).

{markdown_table(table)}

Within each group of one width and depth:

{markdown_table(s.size_groups)}"""


def _f2_levels(s: Statistics) -> str:
    columns = {c: label for c, label in {**QUANTITIES, **BESIDE}.items() if c in s.regions}
    regions = s.regions.pivot_table(index=["model", "kind"], columns="region", values=list(columns),
                                    aggfunc="mean", sort=False)
    rows = []
    for model in MODELS:
        for kind in KINDS:
            row = {"model": model, "kind": kind}
            for column, label in columns.items():
                for region in ("near", "between", "whole"):
                    row[f"{label}, {region}"] = float(regions.loc[(model, kind), (column, region)])
            rows.append(row)
    return markdown_table(pd.DataFrame(rows))


def _f2_binned(s: Statistics, column: str) -> str:
    levels = s.profile.pivot_table(index=["model", "kind"], columns="bin", values=column, sort=False)
    levels = levels.reindex([(m, k) for m in MODELS for k in KINDS])
    levels.columns = [f"u {b / 10:.1f}-{(b + 1) / 10:.1f}" for b in levels.columns]
    return markdown_table(levels.reset_index())


def _ratio(regions: pd.DataFrame, model: str, column: str) -> float:
    """The different-class near / between ratio of ``column``'s means over the ellipses."""
    near = regions.loc[(model, "different classes", "near"), column].mean()
    between = regions.loc[(model, "different classes", "between"), column].mean()
    return float(near / between) if between > 0 else math.nan


def _f2_dip_text(s: Statistics) -> str:
    """Whether the paper's transition dip at the anchors of different-class ellipses appears, and the measured
    facts that bear on why when it does not."""
    trained = s.f2[s.f2.model == "trained"].set_index(["quantity", "comparison"])
    near_between, _, dip = F2_COMPARISONS
    density = QUANTITIES["transition_density"]
    near, between = trained.loc[(density, near_between), "left"], trained.loc[(density, near_between), "right"]
    ratio, untrained_ratio = trained.loc[(density, dip), "left"], trained.loc[(density, dip), "right"]
    if trained.loc[(density, near_between), "holds"] and trained.loc[(density, dip), "holds"]:
        return (f"The paper's dip in transition density at the anchors of different-class ellipses appears here: "
                f"{num(near)} per unit length near the anchors against {num(between)} between them (near / between "
                f"{num(ratio)} trained, {num(untrained_ratio)} untrained).")
    regions = s.regions.set_index(["model", "kind", "region"])
    ratios = {column: {model: _ratio(regions, model, column) for model in MODELS}
              for column in ("jacobian_norm", "logit_jacobian_norm", "transition_density")
              if column in regions}
    lines = [f"- {label}: " + ", ".join(f"{model} {num(ratios[column][model])}" for model in MODELS)
             for column, label in {**QUANTITIES, "logit_jacobian_norm": BESIDE["logit_jacobian_norm"]}.items()
             if column in ratios]
    return f"""**The paper's dip in transition density at the anchors of different-class ellipses does not appear
here**: the trained model crosses {num(near)} boundaries per unit length near the anchors against {num(between)}
between them (near / between {num(ratio)}; untrained {num(untrained_ratio)}). What the measurements show about
why, as near / between ratios on the different-class ellipses (1: no dip):

{chr(10).join(lines)}

The Jacobian norm of the softmax carries the factor `diag(p) - p p^T`, which vanishes where the model is
confident; the Jacobian norm of the logits has no such factor and changes within a linear region only through the
region's own map. Where the softmax's ratio is far below the logits', its dip at the anchors is the softmax's
saturation near confidently classified points, which needs no fewer linear regions there; the transition density
measures the regions alone. The paper's networks see 784 (MNIST) or 3,072 (CIFAR-10) inputs; the reports of
this reproduction on digits (64 inputs) and on the CIFAR-10 subset (3,072) measure the same at both scales."""


def f2_section(s: Statistics) -> str:
    """F2: how its model trained, the random ellipses' construction, the comparisons with their verdicts for the
    trained and the first-fit model, the region means, the binned profiles, the transitions' convergence evidence,
    and what the report says if the paper's transition dip does not appear."""
    f2 = s.f2.assign(
        left=s.f2.left.map(num), right=s.f2.right.map(num),
        ellipses_agreeing=s.f2.ellipses_agreeing.map(lambda v: "" if np.isnan(v) else num(v)),
        holds=s.f2.holds.map(_yes),
    )
    m = s.run.f2_model
    first = m["first_fit_epoch"]
    ended = ("it never fit its training set, so it trained to its budget and the first-fit model is the final one"
             if first is None else
             f"it first fit at epoch {first} (training loss {m['first_fit_loss']:.2e}) and stopped at epoch "
             f"{m['epochs']} (training loss {m['train_loss']:.2e}: "
             + ("the loss target" if m["train_loss"] < LOSS_TARGET else "the budget past the first fit") + ")")
    curves = s.run.curves
    random = curves[(curves.kind == "random ellipse") & (curves.model == "trained")]
    convergence = curves.groupby(["model", "kind"], sort=False)[["transitions", "transitions_half"]].sum()
    convergence = convergence.assign(
        lower_on_every_other_point=(convergence.transitions - convergence.transitions_half)
        / convergence.transitions.clip(lower=1)).reset_index()
    return f"""## F2: along random ellipses and ellipses through training points

![F2](figures/{FIGURES["f2"]})

F2's model, `{m['model_id']}`: {ended}; final training accuracy {num(m['train_accuracy'])}. The random ellipses are
circles of radius {num(m['radius'])} (the training points' root-mean-square distance from their mean) around the
data's mean; each keeps at least the clearance {num(m['clearance'])} (the median distance from a training point to
its nearest neighbour) from every training point: the least distance of the {len(random)} drawn is
{num(float(random.min_distance.min()))} (exact, from the circle's closed form). Arc lengths (mean over the
ellipses): {", ".join(f"{k} {num(float(curves[(curves.kind == k) & (curves.model == 'trained')].arc_length.mean()), 2)}"
                      for k in KINDS)}.

The verdicts, for the model trained by the rule and for its first-fit weights (values: "left" against "right"; the
ratio rows compare the model's near / between with the untrained model's; "ellipses_agreeing": the share of
different-class ellipses lower near than between, or of same-class ellipses below the random ellipses' median):

{markdown_table(f2)}

Means over the ellipses, near the anchors (u < {NEAR}), between them (u >= {BETWEEN}) and over the whole ellipse
(the density per unit length: a stretch's transitions over its length; the transitions per segment: per step of
equal t, beside it):

{_f2_levels(s)}

Mean Jacobian norm per bin of u (averaged within each ellipse, then over the ellipses):

{_f2_binned(s, "jacobian_norm")}

Transitions per unit length per bin of u (each ellipse's transitions in the bin over its length there, then
averaged over the ellipses):

{_f2_binned(s, "transition_density")}

{_f2_dip_text(s)}

The transitions are counted on the sampled points of each ellipse; the count on every other point, as a share
below the count on all points (the discretization's convergence evidence: the count on all points can only be
closer to the exact one):

{markdown_table(convergence, digits=4)}"""


def f3_section(s: Statistics) -> str:
    """F3: each factor's paired effects and verdict, whether the augmentation helps here, every pair."""
    if s.f3.empty:  # a sweep stopped before any variant was trained beside its base (`--report-only`)
        return """## F3: paired factors, on pairs that both fit

No F3 pair has both of its models in this sweep's table (see the top of the report): F3 is not tested here."""
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
    """The models that did not reach the fit criterion, diverged or failed, listed apart."""
    table = s.run.table
    apart = table[~table.reached_target.astype(bool)]
    variants = table[~is_grid(table)]
    by_part = (f"{int((~s.grid.reached_target.astype(bool)).sum())} of {len(s.grid)} grid models and "
               f"{int((~variants.reached_target.astype(bool)).sum())} of {len(variants)} variants")
    counts = apart.status.value_counts()
    by_status = ", ".join(f"{int(counts.get(status, 0))} {status}" for status in ("did not fit", "diverged", "failed"))

    def whole(v: Any) -> str:
        return "" if pd.isna(v) else str(int(v))

    rows = pd.DataFrame({
        "model_id": apart.model_id, "status": apart.status,
        "epochs_trained": apart.epochs_trained.map(whole), "max_epochs": apart.max_epochs.map(whole),
        "diverged_epoch": apart.diverged_epoch.map(whole),
        "train_accuracy": apart.train_accuracy.map(lambda v: "" if pd.isna(v) else num(v)),
        "val_accuracy": apart.val_accuracy.map(lambda v: "" if pd.isna(v) else num(v)),
        "error": apart.error.map(lambda v: "" if pd.isna(v) else str(v).replace("|", "/")),
    })
    return f"""## Models that did not fit

{len(apart)} models did not reach the fit criterion ({by_part}): {by_status}. A model that diverged stopped
at the epoch its loss or a weight became NaN or infinite and has no measures; a model that failed raised while it
trained or was measured (or its worker process died), and its error is kept. F1, F3 and F4 leave them all out, and
they are listed here.

{markdown_table(rows) if len(apart) else "(none)"}"""


def files_section() -> str:
    """The files beside the report."""
    return """## Files

- `results.csv`: one row per model, every hyper-parameter and measurement (all numbers above).
- `manifold_profiles.csv`: every point and segment of F2's ellipses (three models, three kinds);
  `manifold.csv`: one row per ellipse, with its arc length and least distance to a training point.
- `points/<model_id>.csv`: per held-out point records of every model.
- TensorBoard logs of every run: `tensorboard --logdir runs`."""


def closing_section(s: Statistics) -> str:
    """The Jacobian norm's ranks and the wall time (the findings are the summary's table, printed once)."""
    ranks = s.ranks
    head, other = HEADLINE_GAP, next(g for g in GAPS if g != HEADLINE_GAP)
    return f"""## Closing note

The findings are the [summary](#summary)'s table. The Jacobian norm's rank among the {len(MEASURES)} measures of F1:
{ranks[head][0]} by tau and {ranks[head][1]} by the granulated coefficient ({GAPS[head]}, the verdict's),
{ranks[other][0]} and {ranks[other][1]} ({GAPS[other]}, the further check). Wall time: {s.run.wall_time}."""


def write_figures(s: Statistics, out_dir: Path) -> None:
    """Every figure of the report into ``out_dir/figures``."""
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    example = pd.read_csv(out_dir / "points" / f"{s.example_id}.csv")
    figure_f1(s.population, s.f1, figures / FIGURES["f1"])
    figure_sizes(s.population, figures / FIGURES["sizes"])
    figure_f2(s.profile, figures / FIGURES["f2"])
    if not s.run.pairs.empty:
        figure_f3(s.run.pairs, figures / FIGURES["f3"])
    figure_f4(s.f4_models, example, s.example_id, figures / FIGURES["f4"])


def write_report(out_dir: Path, run: Run) -> Path:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md``; return the report's path."""
    s = statistics(run)
    write_figures(s, out_dir)
    findings = findings_table(s)
    sections = [
        header(run), rules_section(), summary_section(findings), f1_section(s), sizes_section(s), f2_section(s),
        f3_section(s), f4_section(s), unfitted_section(s), files_section(), closing_section(s),
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(sections) + "\n")
    return path
