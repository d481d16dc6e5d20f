"""The loggers a run has: several loggers each receive the scalars; a ``CSVLogger`` alone gets them too, on the
monitor's schedule, with one info line that says the dashboard needs a ``TensorBoardLogger``; and the histogram, the
figure and the per-point records reach W&B and MLflow through their APIs, and any other logger as files, each read
back from what the logger wrote."""

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.digits import train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

KEYS = ["train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"]


def test_every_n_epochs_and_the_last_epoch_with_csv_logger_only(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(
            [GeneralizationGapMonitor(every_n_epochs=2)],
            logger=CSVLogger(tmp_path, name="csv"),
            limit_train_batches=1,
            max_epochs=3,
        )
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert {f"generalization/{k}" for k in KEYS} <= set(header)
    column = header.index("generalization/gap_loss")
    epochs = [row.split(",")[header.index("epoch")] for row in lines[1:] if row.split(",")[column]]
    assert epochs == ["1", "2"]  # every second epoch, and the last; never the sanity check
    assert sum("no TensorBoardLogger" in r.getMessage() for r in caplog.records) == 1


def test_several_loggers_receive_the_scalars(tmp_path):
    tb, csv = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    train([GeneralizationGapMonitor(every_n_epochs=1)], logger=[tb, csv], limit_train_batches=3, max_epochs=2)
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    for key in KEYS:
        assert len(events.Scalars(f"generalization/{key}")) == 2
    assert {f"generalization/{k}" for k in KEYS} <= set(
        (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    )


def test_without_tensorboard_one_info_line_and_nothing_else(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="csv")
    monitors = [
        JacobianNormMonitor(max_points=16),
        GeneralizationGapMonitor(max_train_points=16),
        TransitionMonitor(num_trajectories=1, num_points=16),
    ]
    with caplog.at_level(logging.INFO):  # three monitors, each of which says it at fit start if first
        train(monitors, logger=logger, limit_train_batches=2, max_epochs=2)
    messages = [r.getMessage() for r in caplog.records if "TensorBoardLogger" in r.getMessage()]
    assert len(messages) == 1 and "CSVLogger" in messages[0]


# --- histograms, figures and records in every logger, read back from its files ---------------------------------------

RECORDS_COLUMNS = ["index", "label", "prediction", "loss", "jacobian_norm"]
MAX_POINTS = 16


def _monitors() -> list:
    """The three monitors, small, with the figure drawn at the end of fit and the histogram and records of the full
    measurement at the last pass."""
    return [
        JacobianNormMonitor(max_points=MAX_POINTS),
        TransitionMonitor(num_trajectories=1, num_points=16),
        GeneralizationGapMonitor(max_train_points=MAX_POINTS),
    ]


def _records(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run, read from its ``.wandb`` file: a LevelDB-style log (a 7-byte header,
    then 32 KiB blocks of records, each a 4-byte checksum, a 2-byte length, a 1-byte type: full, first, middle or
    last part) of ``Record`` protocol buffers; nested keys joined with ``/``, values decoded from JSON."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, position, payload, rows = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.HasField("history"):
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_gets_the_histogram_the_figure_and_the_records_through_its_api(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning-sensitivity", save_dir=str(tmp_path), offline=True)
    trainer, _ = train(_monitors(), logger=logger, limit_train_batches=2, max_epochs=2)
    logger.experiment.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = _wandb_history(run_dir)
    # W&B's service process writes the file; on a busy machine its last records can land after `finish` returns
    deadline = time.monotonic() + 60
    while not any("sensitivity/transitions_along_trajectory/_type" in row for row in history):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
        history = _wandb_history(run_dir)
    # the scalars, the watch keys at both passes
    assert len([row for row in history if "sensitivity/jacobian_norm_watch" in row]) == 2
    (scalars,) = [row for row in history if "sensitivity/jacobian_norm" in row]
    # the histogram of the full measurement's per-point values, at its step
    (histogram,) = [row for row in history if "sensitivity/jacobian_norm_per_point/_type" in row]
    assert histogram["sensitivity/jacobian_norm_per_point/_type"] == "histogram"
    assert sum(histogram["sensitivity/jacobian_norm_per_point/values"]) == MAX_POINTS
    assert histogram["trainer/global_step"] == scalars["trainer/global_step"]
    # the figure, an image file of the run
    (figure,) = [row for row in history if "sensitivity/transitions_along_trajectory/_type" in row]
    (filename,) = figure["sensitivity/transitions_along_trajectory/filenames"]
    assert Image.open(run_dir / "files" / filename).size == (640, 280)
    # the per-point records, a table with the rows of the CSV file
    (table,) = [row for row in history if "jacobian_norm_records/fit_epoch=1/_type" in row]
    content = json.loads((run_dir / "files" / table["jacobian_norm_records/fit_epoch=1/path"]).read_text())
    header, *rows = _records(Path(trainer.log_dir) / "jacobian_norm_records" / "fit_epoch=1.csv")
    assert content["columns"] == header == RECORDS_COLUMNS
    assert len(content["data"]) == len(rows) == MAX_POINTS
    assert [[float(cell) for cell in row] for row in content["data"]] == [[float(c) for c in r] for r in rows]


def test_mlflow_gets_the_figure_the_histogram_and_the_records_as_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, which MLflow 3 keeps for this
    logger = MLFlowLogger(experiment_name="sensitivity", tracking_uri=(tmp_path / "mlruns").as_uri())
    trainer, _ = train(_monitors(), logger=logger, limit_train_batches=2, max_epochs=2)
    client = logger.experiment
    run = client.get_run(logger.run_id)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert len(client.get_metric_history(logger.run_id, "sensitivity/jacobian_norm_watch")) == 2
    (step,) = [metric.step for metric in client.get_metric_history(logger.run_id, "sensitivity/jacobian_norm")]
    (figure,) = (artifacts / "sensitivity" / "transitions_along_trajectory").glob("step=*.png")
    assert Image.open(figure).size == (640, 280)
    (histogram,) = (artifacts / "sensitivity" / "jacobian_norm_per_point").glob("step=*.png")
    assert histogram.name == f"step={step:06d}.png" and Image.open(histogram).size == (640, 280)
    written = Path(trainer.log_dir) / "jacobian_norm_records" / "fit_epoch=1.csv"
    assert _records(artifacts / "jacobian_norm_records" / "fit_epoch=1.csv") == _records(written)
    assert len(_records(written)) == 1 + MAX_POINTS


class _FolderLogger(Logger):
    """A logger of another kind, with a directory of its own."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    @property
    def name(self) -> str:
        return "folder"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return str(self.root)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def test_csv_and_any_other_logger_get_png_and_csv_files_under_their_directory(tmp_path, caplog):
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv"), _FolderLogger(tmp_path / "other")]
    with caplog.at_level(logging.INFO):
        trainer, _ = train(_monitors(), logger=loggers, limit_train_batches=2, max_epochs=2)
    written = Path(trainer.log_dir) / "jacobian_norm_records" / "fit_epoch=1.csv"  # beside TensorBoard's run
    for directory in (Path(loggers[1].log_dir), tmp_path / "other"):
        (figure,) = (directory / "sensitivity" / "transitions_along_trajectory").glob("step=*.png")
        (histogram,) = (directory / "sensitivity" / "jacobian_norm_per_point").glob("step=*.png")
        assert Image.open(figure).size == Image.open(histogram).size == (640, 280)
        assert _records(directory / "jacobian_norm_records" / "fit_epoch=1.csv") == _records(written)
    # one info line says where the files of both go; TensorBoard is there, so nothing is said of the dashboard
    (message,) = [r.getMessage() for r in caplog.records if "PNG and CSV files" in r.getMessage()]
    assert loggers[1].log_dir in message and str(tmp_path / "other") in message
    assert "no TensorBoardLogger" not in message
