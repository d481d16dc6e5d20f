"""Running the sweep: a re-run trains nothing new, tables of two data sets are not mixed, processes and Ray
trials give the same models as one process, and a model that diverges, raises or kills its worker process is
recorded against that model while the sweep goes on."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from examples.paper.data import DataSpec
from examples.paper.figures import FIGURES
from examples.paper.grid import ModelConfig, sweep_grid
from examples.paper.runner import run_sweep, with_status
from examples.reproduce import main, unfinished
from tests.examples._helpers import dying_worker


@pytest.mark.slow
def test_rerun_trains_nothing_new(quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = pd.read_csv(quick / "out" / "results.csv")
    configs = sweep_grid("quick").configs
    run_sweep(configs, DataSpec(), quick / "out" / "results.csv", quick / "runs", quick / "out" / "points")
    assert f"{len(configs)} already in" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(quick / "out" / "results.csv"), before)


def test_a_table_of_another_data_set_is_not_mixed_in(tmp_path: Path) -> None:
    pd.DataFrame({"model_id": ["m"], "dataset": ["mnist"]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"holds models trained on \['mnist'\], not on 'digits'"):
        run_sweep(sweep_grid("quick").configs, DataSpec(), tmp_path / "results.csv", tmp_path, tmp_path)


def test_a_table_of_other_data_sizes_is_not_mixed_in(tmp_path: Path) -> None:
    """A re-run with another --train-points into the same folder would mix two populations in one table."""
    configs = sweep_grid("quick").configs
    pd.DataFrame(
        {"model_id": ["m"], "dataset": ["digits"], "num_train_points": [250.0], "num_val_points": [539.0]}
    ).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"holds models trained on 250 and 539 training and held-out points, not on "
                                         r"the 1258 and 539 of this command"):
        run_sweep(configs, DataSpec(), tmp_path / "results.csv", tmp_path, tmp_path, train=False)
    spec = DataSpec(train_points=250)  # the options of the sweep it holds: read as it is
    assert run_sweep(configs, spec, tmp_path / "results.csv", tmp_path, tmp_path, train=False).empty


@pytest.mark.slow
def test_jobs_run_models_in_parallel_processes(tmp_path: Path) -> None:
    configs = sweep_grid("quick", max_epochs=2).configs[:3]
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
    configs = sweep_grid("quick").configs
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


#: A model made to diverge (SGD at a learning rate of 1e12: its loss is infinite within the first epoch), one
#: whose worker raises (an activation that does not exist), and one that trains.
DIVERGES = ModelConfig(16, 1, "relu", "sgd", 1e12, 32, "none", 0.0, 0, 3)
RAISES = ModelConfig(16, 1, "no-such-activation", "sgd", 0.1, 32, "none", 0.0, 0, 3)
TRAINS = ModelConfig(16, 1, "relu", "adam", 0.003, 32, "none", 0.0, 0, 2)


def test_a_diverged_or_failed_model_is_recorded_and_the_sweep_goes_on(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    configs = [DIVERGES, RAISES, TRAINS]
    table = run_sweep(configs, DataSpec(), tmp_path / "results.csv", tmp_path / "runs", tmp_path / "points")
    rows = table.set_index("model_id")
    diverged, failed, trained = (rows.loc[c.model_id] for c in configs)
    assert diverged.status == "diverged" and diverged.diverged_epoch == 1 == diverged.epochs_trained
    assert not diverged.reached_target
    # no measures for a model that diverged, and no per-point records
    assert pd.isna(diverged[["jacobian_norm", "log_spectral_product", "gap_accuracy", "transitions"]]).all()
    assert not (tmp_path / "points" / f"{DIVERGES.model_id}.csv").exists()
    assert failed.status == "failed" and "KeyError" in failed.error and "no-such-activation" in failed.error
    assert not failed.reached_target and pd.isna(failed.jacobian_norm)
    assert trained.status in {"fit", "did not fit"} and trained.jacobian_norm > 0 and pd.isna(trained.error)
    # a re-run trains none of them again
    capsys.readouterr()
    before = (tmp_path / "results.csv").read_bytes()
    again = run_sweep(configs, DataSpec(), tmp_path / "results.csv", tmp_path / "runs", tmp_path / "points")
    assert "3 already in" in capsys.readouterr().out
    assert (tmp_path / "results.csv").read_bytes() == before
    assert again.status.tolist() == table.status.tolist() == ["diverged", "failed", trained.status]


def test_an_old_table_gets_its_status_from_the_fit_criterion() -> None:
    old = pd.DataFrame({"model_id": ["a", "b"], "reached_target": [True, False]})
    table = with_status(old)
    assert table.status.tolist() == ["fit", "did not fit"]
    assert table.diverged_epoch.isna().all() and table.error.isna().all()


@pytest.mark.slow
def test_a_worker_process_that_dies_is_recorded_against_its_model(tmp_path: Path) -> None:
    dies = dataclasses.replace(TRAINS, width=13)
    configs = [dies, TRAINS, DIVERGES]
    table = run_sweep(configs, DataSpec(), tmp_path / "results.csv", tmp_path / "runs", tmp_path / "points", jobs=2,
                      worker=dying_worker).set_index("model_id")
    # the model that kills its process, alone too, is failed; the one beside it the first time is trained again
    assert table.loc[dies.model_id, "status"] == "failed"
    assert "worker process died" in table.loc[dies.model_id, "error"]
    assert table.loc[TRAINS.model_id, "status"] in {"fit", "did not fit"}
    assert table.loc[DIVERGES.model_id, "status"] == "diverged"


class _PoolThatBreaksLate:
    """A stand-in for ``ProcessPoolExecutor`` that runs models in this process and replays the race met in CI: the
    process of the model of width 13 dies *after* ``wait`` has returned another model's result, so the pool is
    found broken at the next ``submit``, not through a future. Run alone, that model's process dies at once."""

    #: The models submitted to every pool of the sweep, in order.
    submitted: list[str] = []

    def __init__(self, jobs: int, **_: Any) -> None:
        self.dying: Future | None = None
        self.finished = False  # a model beside it has finished

    def __enter__(self) -> _PoolThatBreaksLate:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def submit(self, fn: Callable[..., Any], config: ModelConfig, *args: Any, **kwargs: Any) -> Future:
        if self.dying is not None and self.finished:  # it died while the other model's result was being read
            self.dying.set_exception(BrokenProcessPool("a process died"))
            raise BrokenProcessPool("a process died")
        future: Future = Future()
        if config.width != 13:
            future.set_result(fn(config, *args, **kwargs))
            self.finished = True
        elif config.model_id in self.submitted:  # the second time, alone: its process dies again
            future.set_exception(BrokenProcessPool("a process died"))
        else:
            self.dying = future  # still running when the other model's result comes back
        self.submitted.append(config.model_id)
        return future


def _row(config: ModelConfig, spec: DataSpec, runs_dir: str, points_dir: str) -> dict[str, Any]:
    return {"model_id": config.model_id, "dataset": spec.name, "status": "fit", "reached_target": True}


def test_a_pool_found_broken_at_submit_retries_its_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool can break between ``wait`` and the next ``submit`` (a process dies just after another model
    finished): the model not yet submitted waits for a new pool, the one that was running is tried again alone,
    and the sweep goes on."""
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _PoolThatBreaksLate)
    monkeypatch.setattr(_PoolThatBreaksLate, "submitted", [])  # shared by the pools of one sweep
    dies, first, last = (dataclasses.replace(TRAINS, width=w) for w in (13, 16, 17))
    table = run_sweep([dies, first, last], DataSpec(), tmp_path / "results.csv", tmp_path, tmp_path, jobs=2,
                      worker=_row).set_index("model_id")
    assert table.loc[dies.model_id, "status"] == "failed"
    assert "died twice, the second time alone" in table.loc[dies.model_id, "error"]
    assert table.loc[[first.model_id, last.model_id], "status"].tolist() == ["fit", "fit"]
    # each model was submitted once, apart from the one that died: twice (the second time alone)
    assert _PoolThatBreaksLate.submitted == [dies.model_id, first.model_id, dies.model_id, last.model_id]


@pytest.mark.slow
def test_report_only_trains_nothing_and_the_report_names_the_missing_models(quick: Path, tmp_path: Path) -> None:
    sweep = sweep_grid("quick")
    table = pd.read_csv(quick / "out" / "results.csv")
    # one variant missing: named by its factor
    one = unfinished(sweep, set(table.model_id) - {sweep.variants[-1][2].model_id})
    assert len(one) == 1 and f"0 of the {len(sweep.grid)} models of the F1 grid and 1 of the" in one[0]
    assert f"({sweep.variants[-1][0]} 1)" in one[0] and "Missing grid models: none." in one[0]
    # a grid model and every variant missing: the report is written all the same, without F3
    dropped = [sweep.grid[0].model_id, *(variant.model_id for _, _, variant in sweep.variants)]
    out = tmp_path / "out"
    shutil.copytree(quick / "out" / "points", out / "points")  # the per-point records of the models trained
    table[~table.model_id.isin(dropped)].to_csv(out / "results.csv", index=False)

    held = run_sweep(sweep.configs, DataSpec(), out / "results.csv", tmp_path / "runs", out / "points", train=False)
    assert len(held) == len(sweep.configs) - len(dropped) and not set(dropped) & set(held.model_id)
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing logged
    warning = unfinished(sweep, set(held.model_id))
    assert len(warning) == 1
    n = len(sweep.variants)
    assert f"1 of the {len(sweep.grid)} models of the F1 grid and {n} of the {n} F3 variants" in warning[0]
    assert f"`{dropped[0]}`" in warning[0]
    assert unfinished(sweep, set(table.model_id)) == []

    report = main(["--quick", "--report-only", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]).read_text()
    assert warning[0] in report
    assert "No F3 pair has both of its models in this sweep's table" in report
    assert not (out / "figures" / FIGURES["f3"]).exists() and (out / "figures" / FIGURES["f2"]).exists()
    assert pd.read_csv(out / "results.csv").model_id.tolist() == held.model_id.tolist()  # no model added
