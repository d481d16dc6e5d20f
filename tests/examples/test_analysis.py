"""The report's statistics: F2's region means on a constructed profile and F3's pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from examples.paper.analysis import f3_effects, pair_links, paired, region_means
from examples.paper.grid import VARIANTS, sweep_grid
from examples.paper.verdicts import BETWEEN, NEAR, f3_verdict
from tests.examples._helpers import constructed_profiles, table_rows


def test_f2_region_means_on_a_constructed_profile() -> None:
    regions = region_means(constructed_profiles(), NEAR, BETWEEN).set_index(["model", "kind", "region"])
    # near (u < 0.1): j = 0 once and j = 1..10 twice per third; between (u >= 0.5): j = 53..104 twice, 105 once
    near_u = np.concatenate([[0], np.arange(1, 11), np.arange(1, 11)]) / 105
    between_u = np.concatenate([np.arange(53, 105), np.arange(53, 105), [105]]) / 105
    assert regions.loc[("trained", "one class", "near"), "jacobian_norm"] == pytest.approx(1 + near_u.mean())
    assert regions.loc[("trained", "one class", "between"), "jacobian_norm"] == pytest.approx(1 + between_u.mean())
    assert regions.loc[("trained", "one class", "near"), "segment_transitions"] == 0
    assert regions.loc[("trained", "one class", "between"), "segment_transitions"] == 1
    assert regions.loc[("trained", "off manifold", "off"), "jacobian_norm"] == 5


def test_f3_pairing_excludes_pairs_that_did_not_both_fit() -> None:
    sweep = sweep_grid(quick=True)
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
