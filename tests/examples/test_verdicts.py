"""The verdict rules, applied to statistics whose verdict is known by construction."""

from __future__ import annotations

import pandas as pd
import pytest

from examples.paper.analysis import GAPS, HEADLINE_GAP
from examples.paper.verdicts import (
    F2_COMPARISONS,
    comparable_normalizations,
    f1_found,
    f2_comparisons,
    f3_verdict,
    sizes_found,
)
from tests.examples._helpers import constant, constructed_profiles, profile

NEAR_BETWEEN, SAME_RANDOM, DIP = F2_COMPARISONS


@pytest.mark.parametrize("model", ["trained", "first fit"])
def test_f2_comparisons_on_a_constructed_profile(model: str) -> None:
    comparisons = f2_comparisons(constructed_profiles(), model).set_index(["quantity", "comparison"])
    holds = comparisons.holds
    assert (comparisons.model == model).all()
    # the Jacobian norm rises away from the anchors, is lowest on the same-class ellipse, and training made the dip
    assert holds[("Jacobian norm", NEAR_BETWEEN)] and holds[("Jacobian norm", SAME_RANDOM)]
    assert holds[("Jacobian norm", DIP)]
    # one transition per segment everywhere, but longer segments near the anchors: a dip per unit length
    density = "transitions per unit length"
    assert comparisons.loc[(density, NEAR_BETWEEN), "left"] == pytest.approx(0.5)
    assert comparisons.loc[(density, NEAR_BETWEEN), "right"] == pytest.approx(1.0)
    assert holds[(density, NEAR_BETWEEN)] and holds[(density, DIP)]
    assert comparisons.loc[(density, SAME_RANDOM), ["left", "right"]].tolist() == pytest.approx([0.5, 2.0])
    assert holds[(density, SAME_RANDOM)]


def test_f2_comparisons_fail_where_the_profile_does_not_dip() -> None:
    k = 630
    kinds = {"different classes": (lambda u: 3 - u, constant(1)), "same class": (constant(9.0), constant(3)),
             "random ellipse": (constant(5.0), constant(2))}
    frames = [profile(model, kind, k, jac, trans) for model in ("trained", "untrained")
              for kind, (jac, trans) in kinds.items()]
    holds = f2_comparisons(pd.concat(frames, ignore_index=True)).set_index(["quantity", "comparison"]).holds
    # falling away from the anchors, and the same profile untrained: no verdict holds
    assert not holds[("Jacobian norm", NEAR_BETWEEN)] and not holds[("Jacobian norm", DIP)]
    # flat transitions: not lower near; the same-class ellipse is above the random one
    assert not holds[("transitions per unit length", NEAR_BETWEEN)]
    assert not holds[("transitions per unit length", SAME_RANDOM)] and not holds[("Jacobian norm", SAME_RANDOM)]


def test_f1_is_judged_on_the_accuracy_gap_first() -> None:
    assert HEADLINE_GAP == "gap_accuracy" and next(iter(GAPS)) == HEADLINE_GAP
    row = pd.Series({"tau": 0.2, "p": 0.001, "ci_low": 0.05})
    assert f1_found(row) and not f1_found(row.replace(0.001, 0.02))
    assert not f1_found(pd.Series({"tau": 0.2, "p": 0.001, "ci_low": -0.01}))


def test_sizes_rules_on_constructed_tables() -> None:
    sizes = pd.DataFrame({
        "column": ["transitions", "transition_density", "transitions_per_unit", "transition_density_per_unit"],
        "normalization": ["raw count", "per unit length", "per unit", "per unit and length"],
        "tau_units": [0.62, 0.62, 0.05, -0.12],
        "p_units": [1e-30, 1e-30, 0.2, 0.01],
        "pooled_minus_within": [0.3, 0.3, 0.02, 0.01],
    })
    assert sizes_found(sizes)
    # per unit and length: |tau| with the units too large; raw: both too large
    assert comparable_normalizations(sizes) == ["per unit"]
    assert not sizes_found(sizes.assign(p_units=0.05))
    assert not sizes_found(sizes.assign(tau_units=-0.5))
    assert comparable_normalizations(sizes.assign(pooled_minus_within=0.2)) == []


def test_f3_verdict_needs_enough_clean_pairs() -> None:
    assert f3_verdict(pd.Series({"both_fit": 2, "jacobian_as_paper": 2})) == "undecided"
    assert f3_verdict(pd.Series({"both_fit": 5, "jacobian_as_paper": 3})) == "yes"
    assert f3_verdict(pd.Series({"both_fit": 6, "jacobian_as_paper": 3})) == "no"
