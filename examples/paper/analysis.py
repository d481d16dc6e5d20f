"""The statistics of the report, computed from the sweep's table and F2's profiles only (so a reader can
recompute them). The rules that turn them into verdicts are in ``examples.paper.verdicts``.

F1: over the F1 grid's models that fit their training set, Kendall's tau (with its bootstrap interval) and the
granulated Kendall coefficient of the Jacobian norm and of every baseline against each gap, over the whole grid
and over the models of the small grid within it. Sizes: how the transition counts of those models scale with
their number of piecewise-linear units, raw and normalized. F2: the profiles along the ellipses, binned by the
distance to the nearest anchor and averaged over regions of it; the transitions per unit arc length. F3: the
paired effect of each factor over the pairs whose two models both fit. F4: per-model statistics of the held-out
points, summarized over the fitted true-label models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from examples.paper.grid import AXES, GRIDS, Sweep
from examples.paper.rank_statistics import bootstrap_kendall, granulated_kendall

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

#: The generalization measures compared in F1: the table's column, and how the report names it. Every measure is
#: oriented so that a larger value predicts a larger gap (the held-out confidence enters as ``1 - confidence``).
MEASURES: dict[str, str] = {
    "jacobian_norm": "Jacobian norm (held-out mean)",
    "param_norm": "parameter norm",
    "distance_from_init": "distance from initialization",
    "log_spectral_product": "product of spectral norms",
    "sharpness": "sharpness (random perturbations)",
    "uncertainty": "1 - mean max-softmax (held-out)",
}

#: The gaps, the paper's first: F1's verdict is on the accuracy gap (1 - held-out accuracy for a model that fits),
#: the cross-entropy gap is a further check.
GAPS = {"gap_accuracy": "accuracy gap", "gap_loss": "loss gap"}
HEADLINE_GAP = "gap_accuracy"

#: The quantities of F2's profiles that its verdicts judge: the column, and how the report names it.
QUANTITIES = {"jacobian_norm": "Jacobian norm", "transition_density": "transitions per unit length"}
#: Shown beside them, not judged: the transitions per segment of equal step in t, and the Jacobian norm of the
#: logits (no softmax factor: whether the Jacobian norm's dip is the softmax's saturation).
BESIDE = {"segment_transitions": "transitions per segment", "logit_jacobian_norm": "Jacobian norm of the logits"}
#: The per-point columns of F2's profiles, averaged over a stretch of an ellipse.
POINT_COLUMNS = ("jacobian_norm", "logit_jacobian_norm")

#: The transition counts of F1's models compared across sizes: the column (derived by ``with_measures``) and its
#: name. Every model's count is along the same four ellipses, so per unit length is the raw count over one
#: constant (the same ranks), and per unit and length the count per unit over it.
NORMALIZATIONS = {
    "transitions": "raw count",
    "transition_density": "per unit length",
    "transitions_per_unit": "per unit",
    "transition_density_per_unit": "per unit and length",
}


@dataclass(frozen=True)
class Factor:
    """A factor of F3 and the paper's claim about it.

    Args:
        name: the sweep's name of the factor (a key of ``examples.paper.grid.VARIANTS``).
        paper_direction: +1 if the paper finds higher sensitivity and a larger gap for the variant, -1 if lower.
    """

    name: str
    paper_direction: int


FACTORS = (
    Factor("augmentation", -1),
    Factor("random labels 25%", +1),
    Factor("random labels 100%", +1),
    Factor("full batch", +1),
    Factor("hardtanh", +1),
    Factor("hardsigmoid", +1),
)


def with_measures(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the derived columns of the analysis: ``uncertainty = 1 - confidence``, the transitions per
    piecewise-linear unit (raw and per unit length), and ``units`` (``num_units``, or width x depth in a table
    written before that column existed)."""
    units = table.num_units if "num_units" in table else table.width * table.depth
    return table.assign(uncertainty=1 - table.confidence, units=units, transitions_per_unit=table.transitions / units,
                        transition_density_per_unit=table.transition_density / units)


def is_grid(table: pd.DataFrame) -> pd.Series:
    """The F1 grid's models: ReLU, true labels, no augmentation, mini-batches (every F3 variant changes one)."""
    return ((table.activation == "relu") & (table.augment == "none") & (table.random_label_fraction == 0)
            & ~table.full_batch.astype(bool))


def f1_population(table: pd.DataFrame) -> pd.DataFrame:
    """F1's population: the grid's models that reached the fit criterion, sorted by model id (so that the bootstrap
    draws the same resamples whatever the order of the table's rows)."""
    population = table[is_grid(table) & table.reached_target.astype(bool)]
    return with_measures(population.sort_values("model_id", ignore_index=True))


def in_grid(table: pd.DataFrame, grid: str) -> pd.Series:
    """Whether each model's configuration is one of the F1 grid ``GRIDS[grid]``'s (whatever the sweep's first
    seed: the seeds are compared as offsets from the smallest seed in ``table``)."""
    axes = GRIDS[grid]
    rates = [(optimizer, lr) for optimizer, values in axes.learning_rates.items() for lr in values]
    first_seed = table.seed.min()
    return (table.width.isin(axes.widths) & table.depth.isin(axes.depths)
            & pd.Series(list(zip(table.optimizer, table.lr, strict=True)), index=table.index).isin(rates)
            & table.batch_size.isin(axes.batch_sizes) & (table.seed - first_seed).isin(axes.seed_offsets))


def f1_statistics(population: pd.DataFrame, num_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (measure, gap): ``n``, Kendall's ``tau`` and its ``p`` value (scipy), the bootstrap 95%
    interval ``ci_low``/``ci_high``, the granulated coefficient ``granulated`` and its per-axis ``psi_<axis>``."""
    rows = []
    for measure, label in MEASURES.items():
        for gap in GAPS:
            x, y = population[measure].to_numpy(float), population[gap].to_numpy(float)
            if len(x) < 3:
                continue
            tau = stats.kendalltau(x, y)
            low, high = bootstrap_kendall(x, y, num_resamples, seed)
            granulated = granulated_kendall(population, measure, gap, AXES)
            rows.append({
                "measure": label, "column": measure, "gap": gap, "n": len(x),
                "tau": float(tau.statistic), "p": float(tau.pvalue), "ci_low": low, "ci_high": high,
                "granulated": granulated["granulated"], **{f"psi_{axis}": granulated[axis] for axis in AXES},
            })
    return pd.DataFrame(rows)


def jacobian_rank(f1: pd.DataFrame, gap: str, column: str) -> int:
    """The Jacobian norm's rank (1 = best) among the measures, by ``column`` (``tau`` or ``granulated``)."""
    rows = f1[f1.gap == gap].sort_values(column, ascending=False).reset_index(drop=True)
    return int(rows.index[rows.column == "jacobian_norm"][0]) + 1


def sizes_statistics(population: pd.DataFrame, gap: str = HEADLINE_GAP) -> pd.DataFrame:
    """How the transition counts of F1's population compare across network sizes, one row per normalization of
    ``NORMALIZATIONS``: ``tau_units`` (Kendall's tau with the number of piecewise-linear units) and its ``p_units``;
    ``tau_gap`` with ``gap`` over the whole population and its ``p_gap``; ``within_gap``, the mean tau with the gap
    within the groups of one width and depth (``groups`` of at least 3 models where it is defined): the
    association that no difference of size can make; ``pooled_minus_within`` = ``tau_gap - within_gap``."""
    rows = []
    for column, label in NORMALIZATIONS.items():
        values = population[column].to_numpy(float)
        by_units = stats.kendalltau(values, population.units.to_numpy(float))
        by_gap = stats.kendalltau(values, population[gap].to_numpy(float))
        within = [stats.kendalltau(g[column], g[gap]).statistic for _, g in population.groupby(["width", "depth"])
                  if len(g) >= 3]
        within = [t for t in within if np.isfinite(t)]
        within_gap = float(np.mean(within)) if within else np.nan
        rows.append({"normalization": label, "column": column, "n": len(values),
                     "tau_units": float(by_units.statistic), "p_units": float(by_units.pvalue),
                     "tau_gap": float(by_gap.statistic), "p_gap": float(by_gap.pvalue), "within_gap": within_gap,
                     "groups": len(within), "pooled_minus_within": float(by_gap.statistic) - within_gap})
    return pd.DataFrame(rows)


def sizes_by_group(population: pd.DataFrame, gap: str = HEADLINE_GAP) -> pd.DataFrame:
    """One row per (width, depth) of F1's population: its piecewise-linear units, models, the median raw count,
    median count per unit, and the Kendall tau of the count with ``gap`` within the group."""
    rows = []
    for (width, depth), g in population.groupby(["width", "depth"]):
        tau = stats.kendalltau(g.transitions, g[gap]).statistic if len(g) >= 3 else np.nan
        rows.append({"width": int(width), "depth": int(depth), "units": int(g.units.iloc[0]), "models": len(g),
                     "median transitions": float(g.transitions.median()),
                     "median per unit": float(g.transitions_per_unit.median()),
                     f"tau with the {GAPS[gap]}": float(tau)})
    return pd.DataFrame(rows)


def region_of(u: pd.Series, near: float, between: float) -> np.ndarray:
    """Per point (or segment) of F2's profiles: ``near`` (``u < near``), ``between`` (``u >= between``), or ``""``.

    Example:
        >>> region_of(pd.Series([0.05, 0.3, 0.7]), near=0.1, between=0.5).tolist()
        ['near', '', 'between']
    """
    return np.where(u < near, "near", np.where(u >= between, "between", "")).astype(object)


def _stretch_means(points: pd.DataFrame, segments: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group of ``keys``: the mean Jacobian norms over the points (``POINT_COLUMNS``), the mean transitions per
    segment, and the transition density (the segments' transitions over their length)."""
    jac = points.groupby(keys, sort=False)[[c for c in POINT_COLUMNS if c in points]].mean()
    seg = segments.groupby(keys, sort=False)[["segment_transitions", "segment_length"]].sum()
    counts = segments.groupby(keys, sort=False).segment_transitions.size()
    out = pd.concat([jac, (seg.segment_transitions / counts).rename("segment_transitions"),
                     (seg.segment_transitions / seg.segment_length).rename("transition_density")], axis=1)
    return out.reset_index()


def region_means(profiles: pd.DataFrame, near: float, between: float) -> pd.DataFrame:
    """Per (model, kind, ellipse, region): the mean Jacobian norm over the region's points, the mean transitions
    per segment over its segments (a segment is placed by its midpoint), and its transition density per unit arc
    length (its segments' transitions over their summed length). Regions: ``near`` and ``between`` of
    ``region_of``, and ``whole`` (the whole ellipse)."""
    keys = ["model", "kind", "ellipse", "region"]
    points = profiles.assign(region=region_of(profiles.u, near, between))
    segments = profiles.assign(region=region_of(profiles.u_segment, near, between))
    parts = _stretch_means(points[points.region != ""], segments[segments.region != ""], keys)
    whole = _stretch_means(profiles.assign(region="whole"), profiles.assign(region="whole"), keys)
    return pd.concat([parts, whole], ignore_index=True)


def binned_profile(profiles: pd.DataFrame, num_bins: int = 10) -> pd.DataFrame:
    """The mean profile: per (model, kind, bin of ``u``), the Jacobian norm, the transitions per segment and the
    transition density per unit length, first within each ellipse (the density as the bin's transitions over its
    length), then averaged over the ellipses."""
    edges = np.linspace(0, 1, num_bins + 1)
    points = profiles.assign(bin=np.clip(np.digitize(profiles.u, edges) - 1, 0, num_bins - 1))
    segments = profiles.assign(bin=np.clip(np.digitize(profiles.u_segment, edges) - 1, 0, num_bins - 1))
    per_ellipse = _stretch_means(points, segments, ["model", "kind", "ellipse", "bin"])
    columns = [c for c in (*POINT_COLUMNS, "segment_transitions", "transition_density") if c in per_ellipse]
    out = per_ellipse.groupby(["model", "kind", "bin"], sort=False)[columns].mean().reset_index()
    return out.assign(u_mid=(edges[out.bin] + edges[out.bin + 1]) / 2)


def pair_links(sweep: Sweep) -> pd.DataFrame:
    """The pairs of F3 as model ids: ``factor``, ``model_id_base``, ``model_id_variant``."""
    return pd.DataFrame(
        [(factor, base.model_id, variant.model_id) for factor, base, variant in sweep.variants],
        columns=["factor", "model_id_base", "model_id_variant"],
    )


def paired(table: pd.DataFrame, links: pd.DataFrame) -> pd.DataFrame:
    """Each F3 pair with the base model's and the variant's columns side by side (suffixes ``_base`` and
    ``_variant``), and ``both_fit``: whether both models reached the fit criterion."""
    base = table.add_suffix("_base")
    variant = table.add_suffix("_variant")
    p = links.merge(base, on="model_id_base").merge(variant, on="model_id_variant")
    return p.assign(both_fit=p.reached_target_base.astype(bool) & p.reached_target_variant.astype(bool))


def f3_effects(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per factor: its pairs, how many fit on both sides, and over those clean pairs how the Jacobian
    norm, the transitions, the gaps and the held-out accuracy change from base to variant (share in the paper's
    direction, with the two-sided sign-test p-value of the Jacobian's share)."""
    rows = []
    for factor in FACTORS:
        p = pairs[pairs.factor == factor.name]
        if p.empty:
            continue
        clean = p[p.both_fit]
        expected = factor.paper_direction
        ratio = clean.jacobian_norm_variant / clean.jacobian_norm_base
        moves = int((np.sign(np.log(ratio)) == expected).sum())
        transitions = clean.transitions_variant / clean.transitions_base
        d_loss = clean.gap_loss_variant - clean.gap_loss_base
        d_acc = clean.gap_accuracy_variant - clean.gap_accuracy_base
        d_val = clean.val_accuracy_variant - clean.val_accuracy_base
        n = len(clean)
        rows.append({
            "factor": factor.name,
            "paper": "higher" if expected > 0 else "lower",
            "pairs": len(p),
            "both_fit": n,
            "base_fit": int(p.reached_target_base.sum()),
            "variant_fit": int(p.reached_target_variant.sum()),
            "jacobian_ratio_median": float(ratio.median()) if n else np.nan,
            "jacobian_as_paper": moves,
            "sign_test_p": float(stats.binomtest(moves, n).pvalue) if n else np.nan,
            "transitions_ratio_median": float(transitions.median()) if n else np.nan,
            "transitions_as_paper": int((np.sign(np.log(transitions)) == expected).sum()),
            "gap_loss_as_paper": int((np.sign(d_loss) == expected).sum()),
            "gap_accuracy_as_paper": int((np.sign(d_acc) == expected).sum()),
            "val_accuracy_up": int((d_val > 0).sum()),
            "val_accuracy_change_median": float(d_val.median()) if n else np.nan,
        })
    return pd.DataFrame(rows)


def f4_population(table: pd.DataFrame) -> pd.DataFrame:
    """F4's models: every fitted model trained on true labels (its held-out errors are the model's own)."""
    return table[table.reached_target.astype(bool) & (table.random_label_fraction == 0)]


def f4_summary(models: pd.DataFrame) -> pd.DataFrame:
    """F4 over ``models``: for each per-model statistic, the number of models where it is defined, its median
    and quartiles, and the share of models above its no-information value (0 for correlations, 0.5 for AUCs)."""
    columns = {
        "f4_spearman_jacobian": 0.0, "f4_spearman_max_softmax": 0.0, "f4_spearman_entropy": 0.0,
        "f4_auc_jacobian": 0.5, "f4_auc_max_softmax": 0.5, "f4_auc_entropy": 0.5,
        "f4_partial_spearman": 0.0, "f4_auc_jacobian_within_confidence": 0.5,
    }
    rows = []
    for column, null in columns.items():
        values = models[column].dropna()
        above = int((values > null).sum())
        rows.append({
            "statistic": column, "models": len(values), "median": float(values.median()),
            "q25": float(values.quantile(0.25)), "q75": float(values.quantile(0.75)),
            "above_null": above / len(values) if len(values) else np.nan,
            "sign_test_p": float(stats.binomtest(above, len(values)).pvalue) if len(values) else np.nan,
        })
    return pd.DataFrame(rows)
