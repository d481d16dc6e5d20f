"""The data a fit is given: datasets that are streams without a length, several validation dataloaders (the
Jacobian norm logged per dataloader, the gap's validation side the first), and batches whose input is not one tensor
(``((image, metadata), y)``). Logged values are checked against a direct
measurement of the weights they were logged on (``tests/_logged.py``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from examples.digits import DigitsDataModule, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor
from tests import _synthetic
from tests._logged import CapturingLogger, Reference, check_last_pass_measured, check_logged, fit
from tests._synthetic import ALL_KEYS, ImageClassifier, SyntheticImages
from tests.integration import _models
from tests.integration._helpers import CountSteps

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]


def test_iterable_datasets(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("cnn", size=16), SyntheticImages(size=16, iterable=True)
    callbacks = _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    check_last_pass_measured(capture, ALL_KEYS)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)


def test_several_validation_dataloaders_are_logged_per_dataloader():
    pl.seed_everything(0)
    model, dm = _models.TwoValidationSetsMLP(), _models.TwoValidationSets()
    watched = _models.monitors({})
    capture = CapturingLogger(model)
    trainer, _ = train(watched, max_epochs=1, model=model, datamodule=dm, logger=capture)
    assert "sensitivity/jacobian_norm" not in trainer.callback_metrics
    assert "sensitivity/jacobian_norm" not in capture.keys()
    reference = Reference.of(model, dm, splits=[slice(0, 200), slice(200, None)])
    check_logged(capture, watched, reference, rel=1e-5, trainer=trainer)


# --- an input that is not one tensor: ((image, metadata), y) ---------------------------------------------------------


class ImageAndMetadata(pl.LightningModule):
    """A digits classifier over an image and three numbers about it, called as ``module((image, metadata))``."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32 + 3, 10)

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        image, metadata = inputs
        return self.head(torch.cat([self.image(image), metadata], dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, y = batch
        return F.cross_entropy(self(inputs), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, y = batch
        self.log("val_loss", F.cross_entropy(self(inputs), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _metadata(x: Tensor) -> Tensor:
    """Three numbers per image: its mean, its spread and its top row's mean."""
    return torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), x[:, :, 0].mean(dim=(1, 2))], dim=1)


class DigitsWithMetadata(DigitsDataModule):
    def _loader(self, x: Tensor, y: Tensor, shuffle: bool) -> DataLoader:
        points = list(zip(zip(x, _metadata(x), strict=True), y, strict=True))
        return DataLoader(points, batch_size=64, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.x_train, self.y_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.x_val, self.y_val, shuffle=False)


def _packed(batch: Any) -> Tensor:
    """The documented route: the image and the metadata packed into one tensor per point."""
    (image, metadata), _ = batch
    return torch.cat([image.flatten(1), metadata], dim=1)


def _unpacked(module: pl.LightningModule, x: Tensor) -> Tensor:
    """The module called on a packed batch; the metadata detached, so the Jacobian is with respect to the image."""
    return module((x[:, :64].view(-1, 1, 8, 8), x[:, 64:].detach()))


def test_an_input_of_several_tensors_fails_saying_the_way_out():
    steps = CountSteps()
    with pytest.raises(TypeError, match=r"is a list, not a tensor.*get_input=.*forward_fn="):
        train([JacobianNormMonitor(), steps], max_epochs=1, model=ImageAndMetadata(), datamodule=DigitsWithMetadata())
    assert steps.steps == 0


def test_an_input_of_several_tensors_through_get_input_and_forward_fn():
    """``((image, metadata), y)`` batches, measured through the route the error names: the image's Jacobian with each
    point's own metadata held, and the gap's losses, each against a direct computation on the returned model."""
    reading = {"get_input": _packed, "forward_fn": _unpacked}
    jacobian = JacobianNormMonitor(max_points=64, every_n_epochs=1, **reading)
    gap = GeneralizationGapMonitor(max_train_points=64, every_n_epochs=1, **reading)
    trainer, model = train([jacobian, gap], max_epochs=2, model=ImageAndMetadata(), datamodule=DigitsWithMetadata())
    dm = DigitsDataModule()
    model.eval()
    image, metadata = dm.x_val[:64], _metadata(dm.x_val[:64])
    rows = torch.func.vmap(
        torch.func.jacrev(lambda v, m: model((v[None], m[None])).softmax(dim=1)[0])
    )(image, metadata)
    logged = trainer.callback_metrics
    assert logged["sensitivity/jacobian_norm"].item() == pytest.approx(rows.flatten(1).norm(dim=1).mean().item(), rel=1e-5)
    with torch.no_grad():
        val_loss = F.cross_entropy(model((dm.x_val, _metadata(dm.x_val))), dm.y_val).item()
    assert logged["generalization/val_loss"].item() == pytest.approx(val_loss, rel=1e-5)
