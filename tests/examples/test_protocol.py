"""The parts of the reproduction's protocol: the F2 binning and the F3 pairing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from examples.paper.analysis import f3_effects, f3_verdict, pair_links, paired
from examples.paper.grid import VARIANTS, sweep_grid
from examples.paper.manifold import distance_to_anchor, f2_comparisons, region_means
from tests.examples._helpers import table_rows


def _profile(model: str, kind: str, num_points: int, jacobian, transitions) -> pd.DataFrame:
    t = np.arange(num_points) * 2 * np.pi / num_points
    u, u_segment = distance_to_anchor(t), distance_to_anchor(t + np.pi / num_points)
    return pd.DataFrame({"model": model, "kind": kind, "ellipse": 0, "t": t, "u": u, "u_segment": u_segment,
                         "jacobian_norm": jacobian(u), "segment_transitions": transitions(u_segment)})


def test_distance_to_the_nearest_anchor() -> None:
    t = np.array([0, np.pi / 6, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi, 5 * np.pi / 3, 2 * np.pi - 0.01])
    np.testing.assert_allclose(distance_to_anchor(t), [0, 0.5, 1, 0.5, 0, 1, 1, 0.01 / (np.pi / 3)], atol=1e-12)


def test_f2_binning_on_a_constructed_profile() -> None:
    k = 630  # u = j / 105 at point i of each third, j = min(i, 210 - i): no point on a region's boundary
    profiles = pd.concat([
        _profile("trained", "one class", k, lambda u: 1 + u, lambda u: (u >= 0.5).astype(int)),
        _profile("trained", "any classes", k, lambda u: 3 - u, lambda u: np.ones_like(u, dtype=int)),
        _profile("trained", "off manifold", k, lambda u: np.full_like(u, 5.0), lambda u: 2 * np.ones_like(u, dtype=int)),
        _profile("untrained", "one class", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
        _profile("untrained", "any classes", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
        _profile("untrained", "off manifold", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
    ], ignore_index=True)
    regions = region_means(profiles).set_index(["model", "kind", "region"])
    # near (u < 0.1): j = 0 once and j = 1..10 twice per third; between (u >= 0.5): j = 53..104 twice, 105 once
    near_u = np.concatenate([[0], np.arange(1, 11), np.arange(1, 11)]) / 105
    between_u = np.concatenate([np.arange(53, 105), np.arange(53, 105), [105]]) / 105
    assert regions.loc[("trained", "one class", "near"), "jacobian_norm"] == pytest.approx(1 + near_u.mean())
    assert regions.loc[("trained", "one class", "between"), "jacobian_norm"] == pytest.approx(1 + between_u.mean())
    assert regions.loc[("trained", "one class", "near"), "segment_transitions"] == 0
    assert regions.loc[("trained", "one class", "between"), "segment_transitions"] == 1
    assert regions.loc[("trained", "off manifold", "off"), "jacobian_norm"] == 5
    comparisons = f2_comparisons(profiles).set_index(["kind", "quantity", "comparison"]).holds
    assert comparisons[("one class", "Jacobian norm", "near < between (trained)")]
    assert comparisons[("one class", "Jacobian norm", "between < off manifold (trained)")]
    assert comparisons[("one class", "Jacobian norm", "near / between: trained < untrained")]
    assert comparisons[("one class", "transitions per segment", "near < between (trained)")]
    # the any-classes profile falls away from the anchors, and its transitions are flat: neither is "lower near"
    assert not comparisons[("any classes", "Jacobian norm", "near < between (trained)")]
    assert not comparisons[("any classes", "Jacobian norm", "near / between: trained < untrained")]
    assert not comparisons[("any classes", "transitions per segment", "near < between (trained)")]
    assert comparisons[("any classes", "transitions per segment", "between < off manifold (trained)")]


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


def test_f3_verdict_needs_enough_clean_pairs() -> None:
    assert f3_verdict(pd.Series({"both_fit": 2, "jacobian_as_paper": 2})) == "undecided"
    assert f3_verdict(pd.Series({"both_fit": 5, "jacobian_as_paper": 3})) == "yes"
    assert f3_verdict(pd.Series({"both_fit": 6, "jacobian_as_paper": 3})) == "no"
