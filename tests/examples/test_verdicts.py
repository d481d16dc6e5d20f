"""The verdict rules, applied to statistics whose verdict is known by construction."""

from __future__ import annotations

import pandas as pd

from examples.paper.verdicts import f2_comparisons, f3_verdict
from tests.examples._helpers import constructed_profiles


def test_f2_comparisons_on_a_constructed_profile() -> None:
    comparisons = f2_comparisons(constructed_profiles()).set_index(["kind", "quantity", "comparison"]).holds
    assert comparisons[("one class", "Jacobian norm", "near < between (trained)")]
    assert comparisons[("one class", "Jacobian norm", "between < off manifold (trained)")]
    assert comparisons[("one class", "Jacobian norm", "near / between: trained < untrained")]
    assert comparisons[("one class", "transitions per segment", "near < between (trained)")]
    # the any-classes profile falls away from the anchors, and its transitions are flat: neither is "lower near"
    assert not comparisons[("any classes", "Jacobian norm", "near < between (trained)")]
    assert not comparisons[("any classes", "Jacobian norm", "near / between: trained < untrained")]
    assert not comparisons[("any classes", "transitions per segment", "near < between (trained)")]
    assert comparisons[("any classes", "transitions per segment", "between < off manifold (trained)")]


def test_f3_verdict_needs_enough_clean_pairs() -> None:
    assert f3_verdict(pd.Series({"both_fit": 2, "jacobian_as_paper": 2})) == "undecided"
    assert f3_verdict(pd.Series({"both_fit": 5, "jacobian_as_paper": 3})) == "yes"
    assert f3_verdict(pd.Series({"both_fit": 6, "jacobian_as_paper": 3})) == "no"
