"""The statistics of the report, computed from the sweep's table and F2's profiles only (so a reader can
recompute them). The rules that turn them into verdicts are in ``examples.paper.verdicts``.

F1: over the F1 grid's models that fit their training set, Kendall's tau (with its bootstrap interval) and the
granulated Kendall coefficient of the Jacobian norm and of every baseline against each gap. F2: the profiles
along the ellipses, binned by the distance to the nearest anchor and averaged over regions of it. F3: the paired
effect of each factor over the pairs whose two models both fit. F4: per-model statistics of the held-out
points, summarized over the fitted true-label models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from examples.paper.grid import AXES, Sweep
from examples.paper.manifold import ON_MANIFOLD
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

GAPS = {"gap_loss": "loss gap", "gap_accuracy": "accuracy gap"}

#: The quantities of F2's profiles: the column, and how the report names it.
QUANTITIES = {"jacobian_norm": "Jacobian norm", "segment_transitions": "transitions per segment"}


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
    """The table with the derived columns of the analysis (``uncertainty = 1 - confidence``)."""
    return table.assign(uncertainty=1 - table.confidence)


def is_grid(table: pd.DataFrame) -> pd.Series:
    """The F1 grid's models: ReLU, true labels, no augmentation, mini-batches (every F3 variant changes one)."""
    return ((table.activation == "relu") & (table.augment == "none") & (table.random_label_fraction == 0)
            & ~table.full_batch.astype(bool))


def f1_population(table: pd.DataFrame) -> pd.DataFrame:
    """F1's population: the grid's models that reached the fit criterion, sorted by model id (so that the bootstrap
    draws the same resamples whatever the order of the table's rows)."""
    population = table[is_grid(table) & table.reached_target.astype(bool)]
    return with_measures(population.sort_values("model_id", ignore_index=True))


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


def region_of(kind: pd.Series, u: pd.Series, near: float, between: float) -> np.ndarray:
    """Per point of F2's profiles: ``near`` (``u < near``), ``between`` (``u >= between``), ``off`` (an
    off-manifold ellipse, whole) or ``""`` (an on-manifold point in neither region).

    Example:
        >>> kind = pd.Series(["one class"] * 3 + ["off manifold"])
        >>> region_of(kind, pd.Series([0.05, 0.3, 0.7, 0.05]), near=0.1, between=0.5).tolist()
        ['near', '', 'between', 'off']
    """
    on = np.where(u < near, "near", np.where(u >= between, "between", ""))
    return np.where(kind.isin(ON_MANIFOLD), on, "off").astype(object)


def region_means(profiles: pd.DataFrame, near: float, between: float) -> pd.DataFrame:
    """Per (model, kind, ellipse, region) of ``region_of``, the mean Jacobian norm over the region's points and
    the mean transitions over its segments (a segment is placed by its midpoint)."""
    points = profiles.assign(region=region_of(profiles.kind, profiles.u, near, between))
    segments = profiles.assign(region=region_of(profiles.kind, profiles.u_segment, near, between))
    keys = ["model", "kind", "ellipse", "region"]
    jac = points[points.region != ""].groupby(keys, sort=False).jacobian_norm.mean()
    seg = segments[segments.region != ""].groupby(keys, sort=False).segment_transitions.mean()
    return pd.concat([jac, seg], axis=1).reset_index()


def binned_profile(profiles: pd.DataFrame, num_bins: int = 10) -> pd.DataFrame:
    """The mean profile: per (model, kind, bin of ``u``), the Jacobian norm and the transitions per segment, first
    averaged within each ellipse, then over the ellipses."""
    edges = np.linspace(0, 1, num_bins + 1)
    p = profiles.assign(
        bin=np.clip(np.digitize(profiles.u, edges) - 1, 0, num_bins - 1),
        bin_segment=np.clip(np.digitize(profiles.u_segment, edges) - 1, 0, num_bins - 1),
    )
    keys = ["model", "kind", "ellipse"]
    jac = p.groupby([*keys, "bin"]).jacobian_norm.mean().groupby(["model", "kind", "bin"]).mean()
    seg = (p.groupby([*keys, "bin_segment"]).segment_transitions.mean()
           .rename_axis([*keys, "bin"]).groupby(["model", "kind", "bin"]).mean())
    out = pd.concat([jac, seg], axis=1).reset_index()
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
