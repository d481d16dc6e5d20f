"""The loggers a run has: several loggers each receive the scalars; a ``CSVLogger`` alone gets them too, on the
monitor's schedule, with one info line that says the dashboard needs a ``TensorBoardLogger``."""

import logging

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
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
