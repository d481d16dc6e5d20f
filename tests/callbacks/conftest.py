"""A run that the key and dashboard tests read back together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests import _synthetic
from tests._logged import CapturingLogger, fit
from tests._synthetic import ImageClassifier, SyntheticImages


@dataclass
class PrefixedRun:
    trainer: pl.Trainer
    capture: CapturingLogger
    model: ImageClassifier
    dm: SyntheticImages
    callbacks: list[pl.Callback]
    events: EventAccumulator


@pytest.fixture(scope="session")
def prefixed_run(tmp_path_factory: Any) -> PrefixedRun:
    """All three monitors with ``prefix="sens"`` (the Jacobian norm and the transitions share it) and ``"gen"``,
    logging to TensorBoard as well."""
    tmp_path = tmp_path_factory.mktemp("prefixed")
    pl.seed_everything(0)
    model, dm = ImageClassifier("cnn", size=16), SyntheticImages(size=16)
    callbacks = [
        JacobianNormMonitor(max_points=_synthetic.MAX_POINTS, every_n_epochs=1, prefix="sens"),
        TransitionMonitor(num_trajectories=1, num_points=_synthetic.NUM_POINTS, every_n_epochs=1, prefix="sens"),
        GeneralizationGapMonitor(max_train_points=_synthetic.MAX_TRAIN, every_n_epochs=1, prefix="gen"),
    ]
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    trainer, capture = fit(model, dm, callbacks, tmp_path, loggers=[tensorboard], max_epochs=2)
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return PrefixedRun(trainer, capture, model, dm, callbacks, events)
