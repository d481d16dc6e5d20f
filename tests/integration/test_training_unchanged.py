"""With monitors attached, two seeded epochs end exactly where they end without them: weights, batch-norm buffers,
optimizer state, the global torch / NumPy / Python random streams, the dataset's own augmentation generator and the
module's train/eval mode are bit-identical.

The set-ups: every monitor on a CNN with dropout and batch norm on augmented digits, logged to TensorBoard (figures
included); every monitor on torchvision's ``resnet18``; every monitor on compiled modules (a compiled submodule, and
``fit(torch.compile(module))``); and each monitor alone in a configuration of its own (the gap's training subset on
augmented data, the Jacobian norm projected and over every point, transitions with shuffled off-manifold anchors).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from examples.digits import DigitsDataModule, MLPClassifier
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests import _synthetic
from tests._logged import fit
from tests._synthetic import ImageClassifier, SyntheticImages
from tests.integration._helpers import all_monitors, assert_same_training_state
from tests.integration._models import DigitsCNN

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
    pytest.mark.filterwarnings("ignore:.*per-point records.*"),
]

#: The key each monitor logs at every measurement.
MEASURED = {
    JacobianNormMonitor: "jacobian_norm",
    GeneralizationGapMonitor: "gap_loss",
    TransitionMonitor: "transition_density_on_manifold",
}


@dataclass
class Setup:
    model: Callable[[], pl.LightningModule]
    datamodule: Callable[[], pl.LightningDataModule]
    monitors: Callable[[], list[pl.Callback]]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``fit(torch.compile(module))``
    compile_fit: bool = False
    #: log to TensorBoard as well (scalars, histograms, figures)
    tensorboard: bool = False


SETUPS = [
    pytest.param(
        Setup(
            DigitsCNN,
            lambda: DigitsDataModule(augment=True, batch_size=128),
            lambda: [
                *all_monitors(TransitionMonitor={"log_figure": True}),
                JacobianNormMonitor(method="projection", num_projections=3, prefix="projected"),
            ],
            tensorboard=True,
        ),
        id="digits_cnn_augmented",
    ),
    pytest.param(
        Setup(lambda: ImageClassifier("resnet18"), SyntheticImages, _synthetic.monitors), id="resnet18"
    ),
    # The Jacobian through a reentrant checkpoint runs `backward` with the parameters not requiring grad meanwhile.
    pytest.param(
        Setup(
            lambda: ImageClassifier("cnn_checkpointed_reentrant", size=16),
            lambda: SyntheticImages(size=16),
            _synthetic.monitors,
        ),
        id="reentrant_checkpointed_cnn",
    ),
    # Not `deterministic=True`: that keeps the compiled backward from donating its buffers, which users' runs do.
    # Two plain runs of this model on a CPU are bit-identical without it.
    pytest.param(
        Setup(
            lambda: ImageClassifier("cnn", size=16, compile_net=True),
            lambda: SyntheticImages(size=16),
            _synthetic.monitors,
            {"deterministic": False},
        ),
        id="compiled_cnn",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Setup(
            MLPClassifier,
            DigitsDataModule,
            lambda: [
                JacobianNormMonitor(max_points=64, every_n_epochs=1),
                GeneralizationGapMonitor(max_train_points=64, every_n_epochs=1),
                TransitionMonitor(num_trajectories=2, num_points=32, every_n_epochs=1, log_figure=False),
            ],
            {"limit_train_batches": 4},
            compile_fit=True,
        ),
        id="fit_compiled_mlp",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Setup(
            MLPClassifier,
            lambda: DigitsDataModule(augment=True, batch_size=32),
            lambda: [GeneralizationGapMonitor(every_n_epochs=1)],
            {"limit_train_batches": 3},
        ),
        id="gap_monitor_augmented",
    ),
    pytest.param(
        Setup(
            MLPClassifier,
            DigitsDataModule,
            lambda: [JacobianNormMonitor(method="projection"), JacobianNormMonitor(max_points=None)],
        ),
        id="jacobian_monitors_projected_and_every_point",
    ),
    pytest.param(
        Setup(
            MLPClassifier,
            DigitsDataModule,
            lambda: [TransitionMonitor(num_trajectories=2, num_points=128, every_n_epochs=1, off_manifold="shuffled")],
        ),
        id="transition_monitor_shuffled",
    ),
]


def run(setup: Setup, callbacks: list[pl.Callback], tmp_path: Any) -> tuple[dict[str, Any], set[str]]:
    """Two seeded epochs; the state they end in, and the keys logged."""
    pl.seed_everything(0)  # the model's initial weights
    model = setup.model()
    trainer, capture = fit(
        model,
        setup.datamodule(),
        callbacks,
        tmp_path,
        fit_target=torch.compile(model) if setup.compile_fit else None,
        loggers=[TensorBoardLogger(tmp_path, name="run")] if setup.tensorboard else [],
        max_epochs=2,
        **{"deterministic": True, **setup.trainer_kwargs},
    )
    dataset = trainer.train_dataloader.dataset
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augmentation": dataset.generator.get_state() if hasattr(dataset, "generator") else None,
        "training": model.training,
    }
    return state, capture.keys()


@pytest.mark.parametrize("setup", SETUPS)
def test_monitors_leave_training_bit_identical(setup, tmp_path):
    plain, _ = run(setup, [], tmp_path / "plain")
    monitors = setup.monitors()
    monitored, logged = run(setup, monitors, tmp_path / "monitored")
    measured = {f"{m.prefix}/{MEASURED[type(m)]}" for m in monitors}
    assert measured <= logged, f"the monitors never measured {sorted(measured - logged)}: nothing to compare"
    assert_same_training_state(plain, monitored)
    if plain["augmentation"] is not None:
        assert torch.equal(plain["augmentation"], monitored["augmentation"])
    assert plain["training"] == monitored["training"]
