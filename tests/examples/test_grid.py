"""The sweep's design: the F1 grid varies every axis, on many groups each; the small grid of earlier versions lies
within it; and each F3 variant differs from its base in its factor alone."""

from __future__ import annotations

import pandas as pd
import pytest

from examples.paper.analysis import FACTORS, HPARAM_COLUMNS
from examples.paper.grid import AXES, GRIDS, VARIANTS, sweep_grid
from tests.examples._helpers import table_rows


def test_the_default_grid_varies_every_axis_on_many_groups() -> None:
    sweep = sweep_grid()
    grid = table_rows(list(sweep.grid)).assign(
        lr_level=[GRIDS["default"].learning_rates[c.optimizer].index(c.lr) for c in sweep.grid])
    assert len(grid) == GRIDS["default"].size == 1152 == grid.model_id.nunique()
    # every factor on the 12 bases, random labels on the 6 Adam bases
    assert len({c.model_id for c in sweep.configs}) == len(sweep.configs) == 1152 + 12 * (len(VARIANTS) - 2) + 6 * 2
    for column in ("width", "depth", "lr", "batch_size", "seed"):
        assert grid[column].nunique() >= 3, column
    assert set(AXES) == {"width", "depth", "optimizer", "lr_level", "batch_size", "seed"}
    # each axis of the granulated coefficient rests on many groups of models that differ in it alone
    for axis in AXES:
        groups = grid.groupby([a for a in AXES if a != axis]).size()
        assert len(groups) >= 1152 // 4 and (groups >= 2).all(), axis
    assert (grid.activation == "relu").all() and (grid.augment == "none").all()
    assert (grid.random_label_fraction == 0).all()
    assert sweep.reference.depth == 3 and sweep.reference.activation == "relu" and sweep.reference in sweep.grid


def test_the_small_grid_is_the_earlier_one_and_lies_within_the_default() -> None:
    small, default = sweep_grid("small"), sweep_grid()
    assert len(small.grid) == 144
    assert {c.model_id for c in small.grid} <= {c.model_id for c in default.grid}
    # the same variants and the same F2 model, so the two sweeps' F3 and F2 are the same
    assert [v.model_id for _, _, v in small.variants] == [v.model_id for _, _, v in default.variants]
    assert small.reference == default.reference
    with pytest.raises(ValueError, match="Unknown grid 'huge'"):
        sweep_grid("huge")


def test_each_variant_differs_from_its_base_in_its_factor_only() -> None:
    sweep = sweep_grid()
    factor_columns = {"augmentation": {"augment"}, "random labels 25%": {"random_label_fraction"},
                      "random labels 100%": {"random_label_fraction"},
                      "full batch": {"batch_size", "full_batch", "max_epochs"},
                      "hardtanh": {"activation"}, "hardsigmoid": {"activation"}}
    assert {f.name for f in FACTORS} == set(VARIANTS) == set(factor_columns)
    counts = pd.Series([factor for factor, _, _ in sweep.variants]).value_counts()
    assert counts["random labels 100%"] == counts["random labels 25%"] == 6 and counts["full batch"] == 12
    for factor, base, variant in sweep.variants:
        assert base in sweep.grid
        b, v = (table_rows([c]).iloc[0] for c in (base, variant))
        differing = {k for k in HPARAM_COLUMNS if b[k] != v[k]}
        assert differing == factor_columns[factor], (factor, differing)
    full = [v for f, _, v in sweep.variants if f == "full batch"]
    assert all(v.max_epochs == 10 * sweep.grid[0].max_epochs for v in full)
