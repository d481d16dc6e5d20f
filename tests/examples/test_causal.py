"""``python -m examples.causal``: the quick causal test end to end, its data-file loader, its verdict rules, and the
training hook it uses (at strength 0 a model trains bit-identically to the reproduction's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from examples.causal import main, parse_args
from examples.paper.causal import (
    QUANTITIES,
    CausalData,
    causal_design,
    load_data,
    paired_effects,
    pairs,
    sign_test,
    verdicts,
)
from examples.paper.data import DataSpec, load_tensors
from examples.paper.grid import ModelConfig
from examples.paper.training import build_network, fit
from lightning_sensitivity.functional import jacobian_penalty

SECTIONS = ("Design", "Verdict rules", "Verdicts", "Jacobian penalty against its unregularized twin",
            "Weight decay against its unregularized twin", "Models that did not fit", "Run")


def test_quick_causal_test_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "causal"
    report = main(["--quick", "--out", str(out), "--jobs", "1"])
    table = pd.read_csv(out / "results.csv")
    design = causal_design(quick=True)
    assert list(table.model_id) == [m.model_id for m in design]
    assert set(table.regularizer) == {"none", "jacobian", "weight_decay"}
    assert table.reached_target.all()  # the quick base fits its 100 points in about 35 epochs
    assert not table[[column for column, _, _ in QUANTITIES]].isna().any().any()
    text = report.read_text()
    positions = [text.index(f"\n## {title}\n") for title in SECTIONS]
    assert positions == sorted(positions)  # the design and the rules come before any number
    assert "too few pairs" in text and "**undecided (too few pairs)**" in text  # two seeds: two pairs per strength
    # each regularized model against its twin: the same base and seed, one pair per regularized model
    assert len(pairs(table)) == len(table) - 2

    # a re-run trains nothing and writes the same table
    main(["--quick", "--out", str(out), "--jobs", "1"])
    again = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(again, table)


def test_at_strength_zero_the_penalized_training_is_bit_identical_to_the_reproductions() -> None:
    """The ``penalty`` hook of ``fit`` with ``0 * jacobian_penalty``: the penalty's forward pass runs in eval mode
    and draws from its own generator, so the weights end exactly where the plain training ends."""
    x, y, _, _ = load_tensors(DataSpec("digits", train_points=200))
    config = ModelConfig(64, 2, "relu", "sgd", 0.02, 32, "noise", 0.0, 0, 3)  # noise: the global stream is drawn
    runs = []
    for penalty in (None, lambda net, inputs: 0.0 * jacobian_penalty(net, inputs, num_projections=2)):
        net = build_network(config, 64, 10)
        torch.manual_seed(5)
        fit(net, x, y, config, penalty=penalty)
        runs.append((net.state_dict(), torch.get_rng_state()))
    (plain, plain_rng), (zero, zero_rng) = runs
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert torch.equal(plain_rng, zero_rng)


def test_a_data_file_is_read_as_images_in_zero_one_with_its_test_split_held_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (12, 3, 4, 4), dtype=np.uint8),
        train_labels=rng.integers(0, 3, 12),
        test_images=rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8),
        test_labels=rng.integers(0, 3, 5),
    )
    x, y, x_val, y_val = load_data(CausalData(str(path)))
    assert x.shape == (12, 3, 4, 4) and x_val.shape == (5, 3, 4, 4) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and y.dtype == torch.long
    assert torch.equal(x_val, torch.as_tensor(np.load(path)["test_images"]).float() / 255)
    subset, _, _, _ = load_data(CausalData(str(path), train_points=7))
    assert len(subset) == 7
    assert CausalData(str(path)).name == "tiny"
    with pytest.raises(SystemExit):
        parse_args(["--data-file", str(tmp_path / "missing.npz")])


def test_sign_tests_count_the_pairs_that_fell_without_ties() -> None:
    fell, n, p_fell, p_rose = sign_test([-1.0] * 9 + [1.0] + [0.0] * 3)
    assert (fell, n) == (9, 10)
    assert p_fell == pytest.approx(11 / 1024) and p_rose == pytest.approx(1 - 1 / 1024)  # P(>= 9 fell), P(>= 1 rose)


def constructed(changes: dict[tuple[str, float], dict[str, float]], pairs_per_strength: int = 8) -> pd.DataFrame:
    """A table of twins and regularized models on 8 seeds, each regularized model's quantities the twin's plus the
    given change (the same in every pair)."""
    rows = []
    for seed in range(pairs_per_strength):
        twin = {"model_id": f"s{seed}", "base_id": "b", "seed": seed, "regularizer": "none", "strength": 0.0,
                "reached_target": True, **{column: 1.0 + 0.01 * seed for column, _, _ in QUANTITIES}}
        rows.append(twin)
        for (kind, strength), change in changes.items():
            model = {**twin, "model_id": f"s{seed}-{kind}{strength}", "regularizer": kind, "strength": strength}
            for column, delta in change.items():
                model[column] = twin[column] + delta
            rows.append(model)
    return pd.DataFrame(rows)


def test_verdicts_the_penalty_lowers_the_norm_and_the_gap_but_weight_decay_does_not() -> None:
    down = {"jacobian_norm_train": -0.5, "jacobian_norm": -0.3, "gap_loss": -0.02, "gap_accuracy": 0.01}
    table = constructed({("jacobian", 0.1): down, ("weight_decay", 0.001): {"param_norm": -0.2}})
    found = verdicts(paired_effects(pairs(table)))
    assert found["v1a"] == found["v1b"] == "yes" and found["v1b_strengths"] == [0.1]
    assert found["v2"] == {"gap_loss": "yes", "gap_accuracy": "no, it rose"}
    assert found["special"] == {"gap_loss": "yes", "gap_accuracy": "neither"}


def test_verdicts_a_penalty_that_lowers_no_norm_is_broken_and_few_pairs_decide_nothing() -> None:
    flat = constructed({("jacobian", 0.1): {"gap_loss": -0.02}, ("weight_decay", 0.001): {"gap_loss": -0.02}})
    found = verdicts(paired_effects(pairs(flat)))
    assert found["v1a"] == "no: the penalty is broken" and found["v1b"] == "no"
    assert found["v2"]["gap_loss"] == "not judged (V1 b fails)"
    few = constructed({("jacobian", 0.1): {"jacobian_norm_train": -0.5}}, pairs_per_strength=4)
    found = verdicts(paired_effects(pairs(few)))
    assert found["v1a"] == "undecided (too few pairs)"


def test_pairs_where_a_model_did_not_fit_are_left_out_of_the_statistics() -> None:
    table = constructed({("jacobian", 0.1): {"jacobian_norm_train": -0.5}})
    table.loc[table.model_id == "s0-jacobian0.1", "reached_target"] = False
    effects = paired_effects(pairs(table))
    assert set(effects.pairs) == {7}
