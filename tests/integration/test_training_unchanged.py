"""With every monitor attached, two seeded epochs end exactly where they end without them: weights, batch-norm
buffers, optimizer state, the global torch / NumPy / Python random streams and the dataset's own augmentation
generator are bit-identical."""

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from examples.digits import DigitsDataModule, train
from lightning_sensitivity import JacobianNormMonitor
from tests.integration._helpers import all_monitors, assert_same_training_state
from tests.integration._models import DigitsCNN

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning")]


def run(tmp_path, callbacks):
    """Two epochs of the CNN (dropout, batch norm) on augmented digits, logged to TensorBoard."""
    logger = TensorBoardLogger(tmp_path, name="run")
    pl.seed_everything(0)  # the model's initial weights
    datamodule = DigitsDataModule(augment=True, batch_size=128)
    trainer, model = train(callbacks, max_epochs=2, model=DigitsCNN(), datamodule=datamodule, logger=logger)
    return {
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augmentation": trainer.train_dataloader.dataset.generator.get_state(),
        "training": model.training,
    }


def test_monitors_leave_training_bit_identical(tmp_path):
    plain = run(tmp_path / "plain", [])
    extra = [JacobianNormMonitor(method="projection", num_projections=3, prefix="projected")]
    monitored = run(tmp_path / "monitored", [*all_monitors(TransitionMonitor={"log_figure": True}), *extra])

    assert_same_training_state(plain, monitored)
    assert torch.equal(plain["augmentation"], monitored["augmentation"])
    assert plain["training"] == monitored["training"]
