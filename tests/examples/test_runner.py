"""Running the sweep: a re-run trains nothing new, tables of two data sets are not mixed, and processes and Ray
trials give the same models as one process."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from examples.paper.data import DataSpec
from examples.paper.grid import sweep_grid
from examples.paper.runner import run_sweep


@pytest.mark.slow
def test_rerun_trains_nothing_new(quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = pd.read_csv(quick / "out" / "results.csv")
    configs = sweep_grid(quick=True).configs
    run_sweep(configs, DataSpec(), quick / "out" / "results.csv", quick / "runs", quick / "out" / "points")
    assert f"{len(configs)} already in" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(quick / "out" / "results.csv"), before)


def test_a_table_of_another_data_set_is_not_mixed_in(tmp_path: Path) -> None:
    pd.DataFrame({"model_id": ["m"], "dataset": ["mnist"]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"holds models trained on \['mnist'\], not on 'digits'"):
        run_sweep(sweep_grid(quick=True).configs, DataSpec(), tmp_path / "results.csv", tmp_path, tmp_path)


@pytest.mark.slow
def test_jobs_run_models_in_parallel_processes(tmp_path: Path) -> None:
    configs = sweep_grid(quick=True, max_epochs=2).configs[:3]
    table = run_sweep(
        configs, DataSpec(), tmp_path / "results.csv", tmp_path / "runs", tmp_path / "points", jobs=2
    )
    assert list(table.model_id) == [c.model_id for c in configs]
    serial = run_sweep(
        configs[:1], DataSpec(), tmp_path / "serial.csv", tmp_path / "runs-serial", tmp_path / "points-serial"
    )
    # the same seed gives the same model, whichever process trains it
    for column in ("jacobian_norm", "gap_loss", "val_accuracy", "sharpness", "transitions"):
        assert serial[column].iloc[0] == pytest.approx(table[column].iloc[0], rel=1e-6)


@pytest.mark.slow
def test_quick_sweep_on_a_local_ray_instance(quick: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.tune")
    configs = sweep_grid(quick=True).configs
    table = run_sweep(
        configs,
        DataSpec(),
        tmp_path / "results.csv",
        tmp_path / "runs",
        tmp_path / "points",
        jobs=2,
        use_ray=True,
    )
    serial = pd.read_csv(quick / "out" / "results.csv")
    assert list(table.model_id) == list(serial.model_id)
    # Ray trials train the same models: the measurements equal those of the serial run
    for column in ("jacobian_norm", "gap_loss", "gap_accuracy", "f4_spearman_jacobian", "epochs_trained", "sharpness"):
        np.testing.assert_allclose(table[column].astype(float), serial[column].astype(float), rtol=1e-6)
    assert (tmp_path / "runs" / "reproduce-digits" / configs[0].model_id).is_dir()
    assert re.fullmatch(r"[\w.\-]+", configs[0].model_id)
