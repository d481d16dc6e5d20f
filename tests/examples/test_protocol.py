"""The parts of the reproduction's protocol: the sweep's design, the baselines, the F2 binning and the F3 pairing."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from examples.paper.analysis import FACTORS, HPARAM_COLUMNS, f3_effects, f3_verdict, pair_links, paired
from examples.paper.manifold import distance_to_anchor, f2_comparisons, region_means
from examples.paper.sweep import AXES, VARIANTS, parameter_measures, sharpness, sweep_grid


def _rows(configs: list) -> pd.DataFrame:
    return pd.DataFrame([
        {**dataclasses.asdict(c), "model_id": c.model_id, "dataset": "digits", "full_batch": c.batch_size is None,
         "batch_size": c.batch_size or 1258}
        for c in configs
    ])


def test_the_default_grid_varies_every_axis() -> None:
    sweep = sweep_grid()
    grid = _rows(list(sweep.grid))
    assert len(grid) == 144 == grid.model_id.nunique()
    # every factor on the 12 bases, random labels on the 6 Adam bases
    assert len({c.model_id for c in sweep.configs}) == len(sweep.configs) == 144 + 12 * (len(VARIANTS) - 2) + 6 * 2
    counts = pd.Series([factor for factor, _, _ in sweep.variants]).value_counts()
    assert counts["random labels 100%"] == counts["random labels 25%"] == 6 and counts["full batch"] == 12
    for column in ("width", "depth", "optimizer", "lr", "batch_size", "seed"):
        assert grid[column].nunique() >= 2, column
    assert set(AXES) >= {"width", "depth", "optimizer", "batch_size", "seed"}
    assert (grid.activation == "relu").all() and (grid.augment == "none").all()
    assert (grid.random_label_fraction == 0).all()
    assert sweep.reference.depth >= 3 and sweep.reference.activation == "relu" and sweep.reference in sweep.grid


def test_each_variant_differs_from_its_base_in_its_factor_only() -> None:
    sweep = sweep_grid()
    factor_columns = {"augmentation": {"augment"}, "random labels 25%": {"random_label_fraction"},
                      "random labels 100%": {"random_label_fraction"},
                      "full batch": {"batch_size", "full_batch", "max_epochs"},
                      "hardtanh": {"activation"}, "hardsigmoid": {"activation"}}
    assert {f.name for f in FACTORS} == set(VARIANTS) == set(factor_columns)
    for factor, base, variant in sweep.variants:
        assert base in sweep.grid
        b, v = (_rows([c]).iloc[0] for c in (base, variant))
        differing = {k for k in HPARAM_COLUMNS if b[k] != v[k]}
        assert differing == factor_columns[factor], (factor, differing)
    full = [v for f, _, v in sweep.variants if f == "full batch"]
    assert all(v.max_epochs == 10 * sweep.grid[0].max_epochs for v in full)


def test_parameter_measures_by_hand() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -2.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    initial = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    out = parameter_measures(net, initial)
    assert out["param_norm"] == pytest.approx(math.sqrt(9 + 4 + 1 + 1))
    assert out["distance_from_init"] == pytest.approx(out["param_norm"])
    assert out["log_spectral_product"] == pytest.approx(math.log10(3 * math.sqrt(2)))
    same = {name: p.detach().clone() for name, p in net.named_parameters()}
    assert parameter_measures(net, same)["distance_from_init"] == 0


def test_sharpness_is_seeded_reproducible_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    before = copy.deepcopy(net.state_dict())
    rng_state = torch.get_rng_state()
    value = sharpness(net, x, y, scale=0.2, draws=4, seed=7)
    assert value == sharpness(net, x, y, scale=0.2, draws=4, seed=7)
    assert value != sharpness(net, x, y, scale=0.2, draws=4, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own generator, not the global stream
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[key])
    # A naive reference: perturb a copy in place, tensor by tensor, with the same draws.
    generator = torch.Generator().manual_seed(7)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        base = loss(net(x), y).item()
        increases = []
        for _ in range(4):
            other = copy.deepcopy(net)
            for p in other.parameters():
                u = torch.randn(p.shape, generator=generator)
                p += 0.2 * p.norm() * u / u.norm()
            increases.append(loss(other(x), y).item() - base)
    assert value == pytest.approx(np.mean(increases), rel=1e-6)
    assert sharpness(net, x, y, scale=0.0, draws=2) == pytest.approx(0.0, abs=1e-7)


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
    table = _rows(sweep.configs)
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
