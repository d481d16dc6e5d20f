"""Each monitor's registry of logged keys is what its docs list, and what a run logs; prefixes name every key, and
the values under them are the direct measurements (``tests/_logged.py``)."""

from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.digits import train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests import _synthetic
from tests._logged import check_logged

ROOT = Path(__file__).resolve().parents[2]
MONITORS = [JacobianNormMonitor, GeneralizationGapMonitor, TransitionMonitor]
PREFIXED_KEYS = {
    "sens/jacobian_norm",
    "sens/transition_density_on_manifold",
    "sens/transition_density_off_manifold",
    *(f"gen/{side}_{what}" for side in ("train", "val", "gap") for what in ("loss", "accuracy")),
}


@pytest.mark.parametrize("monitor", MONITORS, ids=lambda m: m.__name__)
def test_the_docs_list_every_registered_key(monitor):
    docs = (ROOT / "docs" / "callbacks.md").read_text()
    for key in monitor.KEYS:
        assert f"{{prefix}}/{key.name}" in monitor.__doc__, key.name
        assert f"/{key.name}`" in docs, key.name
        if key.watch:  # its watch twin, named with the suffix in the docstring, and in full in the docs' table
            assert f"{{prefix}}/{key.name}_watch" in monitor.__doc__, key.name
            assert f"/{key.name}_watch`" in docs, key.name


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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_log_seconds_logs_each_measurements_wall_time_and_only_then(tmp_path):
    import time

    logger = TensorBoardLogger(tmp_path)
    monitors = [
        JacobianNormMonitor(prefix="a", max_points=32, every_n_epochs=2, log_seconds=True),
        GeneralizationGapMonitor(prefix="b", max_train_points=32, every_n_epochs=2, log_seconds=True),
        TransitionMonitor(prefix="c", num_trajectories=1, num_points=16, every_n_epochs=2, log_seconds=True),
    ]
    seconds = ["a/jacobian_norm_seconds", "b/generalization_gap_seconds", "c/transitions_seconds"]
    assert [key for m in monitors for key in m.logged_keys() if key.endswith("_seconds")] == seconds
    start = time.perf_counter()
    train(monitors, max_epochs=4, limit_train_batches=2, logger=logger)
    elapsed = time.perf_counter() - start
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    total = 0.0
    measured_keys = ["a/jacobian_norm_watch", "b/gap_loss_watch", "c/transition_density_on_manifold_watch"]
    for key, measured in zip(seconds, measured_keys, strict=True):
        points = events.Scalars(key)
        # one time per measurement, of the watch set (epochs 0 and 2) or in full (epochs 1 and 3), at its step
        assert [p.step for p in points] == [p.step for p in events.Scalars(measured)]
        assert len(points) == 4 and all(p.value > 0 for p in points)
        total += sum(p.value for p in points)
    assert total < elapsed
    assert not any(k.endswith("_seconds") for m in MONITORS for k in m().logged_keys())  # off by default


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prefixes_name_every_logged_key(prefixed_run):
    run = prefixed_run
    logged = run.capture.keys()
    assert PREFIXED_KEYS <= logged, sorted(PREFIXED_KEYS - logged)
    assert not [k for k in logged if k.startswith(("sensitivity/", "generalization/"))]
    assert PREFIXED_KEYS <= set(run.events.Tags()["scalars"])
    check_logged(run.capture, run.callbacks, _synthetic.reference(run.model, run.dm), trainer=run.trainer)
