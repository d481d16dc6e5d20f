"""Each monitor's registry of logged keys is what its docs list, and what a run logs."""

from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.digits import train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

ROOT = Path(__file__).resolve().parents[2]
MONITORS = [JacobianNormMonitor, GeneralizationGapMonitor, TransitionMonitor]


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_the_docs_list_every_registered_key(monitor):
    docs = (ROOT / "docs" / "callbacks.md").read_text()
    for key in monitor.KEYS:
        assert f"{{prefix}}/{key.name}" in monitor.__doc__, key.name
        assert f"/{key.name}`" in docs, key.name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_logs_exactly_the_registered_keys_under_each_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    monitors = [
        JacobianNormMonitor(prefix="a", max_points=32, every_n_epochs=1),
        GeneralizationGapMonitor(prefix="b", max_train_points=32, every_n_epochs=1),
        TransitionMonitor(prefix="c", num_trajectories=1, num_points=16, every_n_epochs=1, log_figure=True),
    ]
    train(monitors, max_epochs=1, limit_train_batches=2, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    logged = {
        "scalar": {t for t in tags["scalars"] if t.startswith(("a/", "b/", "c/"))},
        "histogram": set(tags["histograms"]),
        "image": set(tags["images"]),
    }
    for kind, found in logged.items():
        assert found == {key for m in monitors for key in m.logged_keys(kind)}, kind
