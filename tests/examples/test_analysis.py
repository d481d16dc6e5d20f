"""The report's statistics: F2's region means and binned profiles per unit length on a constructed profile, the
sizes statistics, the small grid within the default one, and F3's pairing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from examples.paper.analysis import (
    binned_profile,
    f3_effects,
    in_grid,
    pair_links,
    paired,
    region_means,
    sizes_by_group,
    sizes_statistics,
    with_measures,
)
from examples.paper.grid import VARIANTS, sweep_grid
from examples.paper.verdicts import BETWEEN, NEAR, f3_verdict
from tests.examples._helpers import constant, constructed_profiles, profile, table_rows


def test_f2_region_means_on_a_constructed_profile() -> None:
    regions = region_means(constructed_profiles(), NEAR, BETWEEN).set_index(["model", "kind", "region"])
    # near (u < 0.1): j = 0 once and j = 1..10 twice per third; between (u >= 0.5): j = 53..104 twice, 105 once
    near_u = np.concatenate([[0], np.arange(1, 11), np.arange(1, 11)]) / 105
    between_u = np.concatenate([np.arange(53, 105), np.arange(53, 105), [105]]) / 105
    different = ("trained", "different classes")
    assert regions.loc[(*different, "near"), "jacobian_norm"] == pytest.approx(1 + near_u.mean())
    assert regions.loc[(*different, "between"), "jacobian_norm"] == pytest.approx(1 + between_u.mean())
    # one transition on every segment: per segment the same near and between, per unit length halved near
    assert regions.loc[(*different, "near"), "segment_transitions"] == 1
    assert regions.loc[(*different, "between"), "segment_transitions"] == 1
    assert regions.loc[(*different, "near"), "transition_density"] == pytest.approx(0.5)
    assert regions.loc[(*different, "between"), "transition_density"] == pytest.approx(1.0)
    assert regions.loc[("trained", "random ellipse", "whole"), "transition_density"] == pytest.approx(2.0)
    assert regions.loc[("trained", "same class", "whole"), "jacobian_norm"] == pytest.approx(0.5)


def test_density_per_unit_length_is_transitions_over_length_not_a_mean_of_ratios() -> None:
    # Two kinds of segment in one bin: 3 transitions over length 1, and 1 over length 3: 4 / 4 = 1 per unit
    # length (a mean of the per-segment ratios would say (3 + 1/3) / 2).
    k = 630
    rows = profile("trained", "different classes", k, constant(1.0), lambda u: np.where(np.arange(k) % 2, 3, 1),
                   lambda u: np.where(np.arange(k) % 2, 1.0, 3.0))
    binned = binned_profile(rows, num_bins=1)
    assert binned.transition_density.iloc[0] == pytest.approx(1.0)
    assert binned.segment_transitions.iloc[0] == pytest.approx(2.0)


def test_binned_profile_averages_each_ellipse_first() -> None:
    # Ellipse 0: density 1 everywhere; ellipse 1: density 4 in the near bins only, 1 elsewhere, twice as many
    # segments there would not weigh it more: the mean over ellipses is taken per bin.
    k = 630
    one = profile("trained", "same class", k, constant(1.0), constant(1), constant(1.0), ellipse=0)
    two = profile("trained", "same class", k, constant(3.0), lambda u: np.where(u < 0.1, 4, 1), constant(1.0), ellipse=1)
    binned = binned_profile(pd.concat([one, two], ignore_index=True)).set_index("bin")
    assert binned.loc[0, "transition_density"] == pytest.approx((1 + 4) / 2)
    assert binned.loc[9, "transition_density"] == pytest.approx(1.0)
    assert binned.loc[5, "jacobian_norm"] == pytest.approx(2.0)
    np.testing.assert_allclose(binned.u_mid, np.arange(10) / 10 + 0.05)


def _population() -> pd.DataFrame:
    """Two widths and depths, eight models each: counts that grow with the units, and within each size a
    count that follows the gap exactly."""
    rows = []
    for width in (10, 20):
        for depth in (1, 2):
            for i in range(8):
                gap = 0.1 + 0.01 * i
                rows.append({"width": width, "depth": depth, "num_units": width * depth, "gap_accuracy": gap,
                             "transitions": width * depth * (100 + i), "transition_density": width * depth * (100 + i) / 50,
                             "confidence": 0.9})
    return with_measures(pd.DataFrame(rows))


def test_sizes_statistics_against_scipy() -> None:
    population = _population()
    sizes = sizes_statistics(population).set_index("column")
    raw, per_unit = sizes.loc["transitions"], sizes.loc["transitions_per_unit"]
    assert raw.tau_units == pytest.approx(stats.kendalltau(population.transitions, population.num_units).statistic)
    assert raw.tau_units > 0.5 and raw.p_units < 0.01
    # within each size the count follows the gap exactly, whatever the normalization
    assert raw.within_gap == pytest.approx(1.0) and per_unit.within_gap == pytest.approx(1.0) and raw.groups == 4
    # per unit, the count is the same function of the gap in every group: pooled and within agree
    assert per_unit.tau_gap == pytest.approx(1.0)
    assert abs(per_unit.pooled_minus_within) < 1e-12 and abs(raw.pooled_minus_within) > 0.5
    assert sizes.loc["transition_density", "tau_units"] == pytest.approx(raw.tau_units)
    groups = sizes_by_group(population)
    assert list(groups.units) == [10, 20, 20, 40] and (groups.models == 8).all()
    assert groups["median per unit"].tolist() == pytest.approx([103.5] * 4)


def test_the_small_grid_lies_within_the_default_one() -> None:
    grid = table_rows(list(sweep_grid().grid))
    small_ids = {c.model_id for c in sweep_grid("small").grid}
    assert small_ids <= set(grid.model_id)
    assert set(grid.model_id[in_grid(grid, "small")]) == small_ids
    # whatever the sweep's first seed
    shifted = table_rows(list(sweep_grid(seed=5).grid))
    assert set(shifted.model_id[in_grid(shifted, "small")]) == {c.model_id for c in sweep_grid("small", seed=5).grid}


def test_f3_pairing_excludes_pairs_that_did_not_both_fit() -> None:
    sweep = sweep_grid("quick")
    table = table_rows(sweep.configs)
    rng = np.random.default_rng(0)
    table = table.assign(jacobian_norm=rng.uniform(1, 2, len(table)), transitions=rng.uniform(10, 20, len(table)),
                         gap_loss=rng.uniform(0, 1, len(table)), gap_accuracy=rng.uniform(0, 0.1, len(table)),
                         val_accuracy=rng.uniform(0.9, 1, len(table)), reached_target=True)
    links = pair_links(sweep)
    assert len(links) == len(VARIANTS)
    base_id = links.model_id_base.iloc[0]
    # One variant that did not fit, with a huge Jacobian norm that must not count
    unfit = links[links.factor == "random labels 100%"].model_id_variant.iloc[0]
    table.loc[table.model_id == unfit, ["reached_target", "jacobian_norm"]] = [False, 1e6]
    # The hardtanh variant moves as the paper says
    hardtanh = links[links.factor == "hardtanh"].model_id_variant.iloc[0]
    table.loc[table.model_id == hardtanh, "jacobian_norm"] = 10.0
    pairs = paired(table, links)
    assert list(pairs.both_fit) == [f != "random labels 100%" for f in links.factor]
    effects = f3_effects(pairs).set_index("factor")
    assert effects.loc["random labels 100%", "both_fit"] == 0 and effects.loc["random labels 100%", "pairs"] == 1
    assert effects.loc["random labels 100%", "variant_fit"] == 0
    assert effects.loc["random labels 100%", "jacobian_as_paper"] == 0
    assert math.isnan(effects.loc["random labels 100%", "jacobian_ratio_median"])
    assert f3_verdict(effects.loc["random labels 100%"]) == "undecided"
    expected = 10.0 / table.set_index("model_id").jacobian_norm[base_id]
    assert effects.loc["hardtanh", "jacobian_ratio_median"] == pytest.approx(expected)
    assert effects.loc["hardtanh", "jacobian_as_paper"] == 1
