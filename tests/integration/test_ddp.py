"""Two CPU processes (gloo) log what one process logs: ``ddp`` and ``ddp_spawn``, every monitor attached; and the
gap monitor alone under ``ddp_spawn`` started from the test's own process.

The DDP run trains in a subprocess (``_ddp_script.py``) under a timeout, so a deadlock fails the test instead of
hanging it. The reference is one process measuring the DDP run's final weights with the DDP run's trajectory
anchors and training subset (restored through the monitors' ``state_dict``), with a zero learning rate so that
its one epoch leaves the weights as they are. Digits has 539 validation points: the validation sampler pads the
second rank's share with a repeat of point 0, which the monitors must skip.
"""

import csv
import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor
from tests._logged import gap_values
from tests.integration._ddp_script import GAP_MAX_TRAIN_POINTS, JACOBIAN_MAX_POINTS, monitors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch"),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_ddp_script.py")
TIMEOUT_S = 300
RECORDS = "jacobian_norm_records"
MONITOR_PREFIXES = ("sensitivity/", "all_points/", "generalization/")


def run_ddp(strategy: str, out: Path, without: list[str]) -> None:
    """The script in its own process group, killed whole (both ranks) when it outlives the timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--strategy", strategy, "--out", str(out), "--without", *without]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"DDP run with strategy={strategy!r} did not finish in {TIMEOUT_S} s (deadlock?)")
    assert process.returncode == 0, output.decode()[-6000:]


def one_process_reference(out: Path, without: list[str]) -> dict[str, float]:
    """The monitors' values of one process on the DDP run's final weights; its TensorBoard logs and per-point
    records go to ``out / "reference"``."""
    model = MLPClassifier(lr=0.0)
    model.load_state_dict(torch.load(out / "weights.pt"))
    states = torch.load(out / "rank0.pt", weights_only=False)
    watched = monitors(without)
    for monitor in watched:
        monitor.load_state_dict(states[type(monitor).__name__ + "/" + monitor.state_key])
    trainer, trained = train(
        watched,
        max_epochs=1,
        model=model,
        datamodule=DigitsDataModule(),
        limit_train_batches=1,
        logger=TensorBoardLogger(out, name="reference"),
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(MONITOR_PREFIXES)}


@pytest.mark.parametrize(
    ("strategy", "without"),
    [
        ("ddp", []),
        ("ddp_spawn", []),
    ],
)
def test_two_processes_log_the_one_process_values(tmp_path, strategy, without):
    run_ddp(strategy, tmp_path, without)
    logged = json.loads((tmp_path / "metrics.json").read_text())
    logged = {k: v for k, v in logged.items() if k.startswith(MONITOR_PREFIXES)}
    expected = one_process_reference(tmp_path, without)

    assert set(logged) == set(expected)
    # each key with its watch twin (the watch values of the last pass come from its full measurement), and the
    # transitions' two resolutions, logged with the full measurement only
    transitions = "TransitionMonitor" not in without
    assert len(expected) == 2 * (2 + 1 + 4 * transitions + 6) + 2 * transitions
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # `trainer.validate` on the same weights: the Jacobian monitors measure again, under inference mode
    validated = json.loads((tmp_path / "validate.json").read_text())
    # (under ddp_spawn the main process's `callback_metrics` still hold the values of `fit` beside them)
    validated = {k: v for k, v in validated.items() if k.startswith(MONITOR_PREFIXES) and "jacobian" in k}
    assert set(validated) == {k for k in expected if "jacobian" in k}
    for key, value in validated.items():
        assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key

    # every rank measures the same trajectories and the same training subset
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key, state in rank0.items():
        if "anchors" in state:
            assert all(torch.equal(state["anchors"][k], rank1[key]["anchors"][k]) for k in state["anchors"])
        if "train_indices" in state:
            assert len(state["train_indices"]) == GAP_MAX_TRAIN_POINTS
            assert state["train_indices"] == rank1[key]["train_indices"]

    # each validation point is measured once, none twice, with the one-process value: records and histograms
    # (ddp_spawn's `validate` starts a second TensorBoard version: each file is looked for in every version)
    (fit_records,) = glob.glob(str(tmp_path / "tensorboard" / "version_*" / RECORDS / "fit_epoch=1.csv"))
    (validate_records,) = glob.glob(
        str(tmp_path / "tensorboard" / "version_*" / RECORDS / "validate_epoch=*.csv")
    )
    (reference_dir,) = glob.glob(str(tmp_path / "reference" / "version_*"))
    reference = read_records(os.path.join(reference_dir, RECORDS, "fit_epoch=0.csv"))
    assert reference["index"] == list(range(JACOBIAN_MAX_POINTS))
    for path in (fit_records, validate_records):
        records = read_records(path)
        assert records["index"] == reference["index"], path
        assert records["label"] == reference["label"] and records["prediction"] == reference["prediction"]
        for column in ("loss", "jacobian_norm"):  # written with 6 significant digits
            assert records[column] == pytest.approx(reference[column], rel=2e-5), (path, column)
    log_dir = os.path.dirname(os.path.dirname(fit_records))
    num_validation = len(DigitsDataModule().x_val)
    assert num_validation % 2 == 1  # so the sampler pads
    for key, num_points in [("sensitivity", JACOBIAN_MAX_POINTS), ("all_points", num_validation)]:
        tag = f"{key}/jacobian_norm_per_point"
        ddp, one = (last_histogram(directory, tag) for directory in (log_dir, reference_dir))
        assert ddp.num == one.num == num_points, key
        assert (ddp.sum, ddp.min, ddp.max) == pytest.approx((one.sum, one.min, one.max), rel=1e-5), key


def test_the_gap_monitor_combines_the_ranks_into_the_one_process_result():
    """``ddp_spawn`` in the test's own process: each rank evaluates its share of the training subset (unequal shares
    of 101 points) and of the validation set (padded by the sampler); the combined values are the one-process ones."""
    dm = DigitsDataModule()
    monitor = GeneralizationGapMonitor(max_train_points=101, seed=5)
    trainer, model = train(
        [monitor], datamodule=dm, strategy="ddp_spawn", devices=2, limit_train_batches=2, max_epochs=1
    )
    indices = torch.randperm(len(dm.x_train), generator=torch.Generator().manual_seed(5))[:101]
    expected = gap_values(model.eval(), (dm.x_train[indices], dm.y_train[indices]), (dm.x_val, dm.y_val))
    logged = {key: float(trainer.callback_metrics[f"generalization/{key}"]) for key in expected}
    assert logged == pytest.approx(expected, abs=1e-5)


def read_records(path: str) -> dict[str, list]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {
        column: [(int if column in ("index", "label", "prediction") else float)(row[column]) for row in rows]
        for column in rows[0]
    }


def last_histogram(log_dir: str, tag: str):
    events = EventAccumulator(log_dir, size_guidance={"histograms": 0})
    events.Reload()
    return events.Histograms(tag)[-1].histogram_value
