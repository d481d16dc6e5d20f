"""Every monitor on the models real projects have: each logged value equals the measurement made directly.

An MLP; a CNN with batch norm, max pooling, dropout and functional ``F.relu``; torchvision's ``resnet18`` on
32 x 32 inputs; a model whose ``forward`` takes a dict; a text classifier over token ids (the Jacobian and the
linear regions measured at the embeddings, through ``get_input``/``forward_fn``); two validation dataloaders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through
from tests.integration import _models

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
MAX_POINTS = 50
NUM_POINTS = 32


def _tuple_inputs(dm: Any, model: pl.LightningModule) -> tuple[Tensor, Tensor]:
    return dm.x_val, dm.y_val


def _call(model: pl.LightningModule, x: Tensor) -> Tensor:
    return model(x)


@dataclass
class Case:
    model: Callable[[], pl.LightningModule]
    datamodule: Callable[[], pl.LightningDataModule]
    #: keyword arguments that tell every monitor how to read batches and call the model
    reading: Callable[[pl.LightningModule], dict[str, Any]] = lambda model: {}
    #: the validation inputs, as the monitors see them, and the labels
    validation: Callable[[Any, pl.LightningModule], tuple[Tensor, Tensor]] = _tuple_inputs
    #: logits from an input as the monitors see it
    forward: Callable[[pl.LightningModule, Tensor], Tensor] = _call
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def _text_validation(dm: Any, model: pl.LightningModule) -> tuple[Tensor, Tensor]:
    tokens, labels = dm.val_set.tensors
    with torch.no_grad():
        return model.embedding(tokens.to(model.device)), labels


CASES = {
    "mlp": Case(MLPClassifier, DigitsDataModule),
    "cnn_batchnorm_maxpool_functional_relu": Case(_models.DigitsCNN, DigitsDataModule),
    "resnet18_32x32": Case(_models.ResNet18, _models.ResNetDigits, trainer_kwargs={"limit_train_batches": 2}),
    "dict_forward": Case(
        _models.DictInputMLP,
        _models.DictDigits,
        reading=lambda model: {"input_key": "image", "forward_fn": lambda m, x: m({"image": x})},
        forward=lambda m, x: m({"image": x}),
    ),
    "text_token_ids": Case(
        _models.TextClassifier,
        _models.TextData,
        reading=lambda model: {
            "get_input": lambda batch: model.embedding(batch[0]),
            "forward_fn": lambda m, embedded: m.classify(embedded),
        },
        validation=_text_validation,
        forward=lambda m, embedded: m.classify(embedded),
    ),
}


def monitors(reading: dict[str, Any]) -> list[pl.Callback]:
    target = {"target_key": "label"} if reading.get("input_key") == "image" else {}
    gap_reading = {k: v for k, v in reading.items() if k != "get_input"}  # the gap is measured on token ids
    if "get_input" in reading:
        gap_reading.pop("forward_fn")
    return [
        JacobianNormMonitor(max_points=MAX_POINTS, **reading, **target),
        TransitionMonitor(
            num_trajectories=2, num_points=NUM_POINTS, every_n_epochs=1, log_figure=False, **reading
        ),
        GeneralizationGapMonitor(max_train_points=64, **gap_reading, **target),
    ]


def expected_transition_density(forward: Callable[[Tensor], Tensor], anchors: Tensor, device: str) -> float:
    counts = [count_transitions(forward, trajectory_through(a.to(device), NUM_POINTS)) for a in anchors]
    return sum(c.density for c in counts) / len(counts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_monitor_logs_the_direct_measurement(name, device):
    case = CASES[name]
    pl.seed_everything(0)
    model, dm = case.model(), case.datamodule()
    _, transitions, _ = watched = monitors(case.reading(model))
    trainer, _ = train(
        watched, max_epochs=1, model=model, datamodule=dm, accelerator=device, **case.trainer_kwargs
    )
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}

    model.to(device).eval()  # measured directly on the device the monitors measured on
    inputs, labels = (t.to(device) for t in case.validation(dm, model))
    forward = functools.partial(case.forward, model)
    assert logged["sensitivity/jacobian_norm"] > 0
    assert logged["sensitivity/jacobian_norm"] == pytest.approx(
        jacobian_norm(forward, inputs[:MAX_POINTS]).mean().item(), rel=1e-4
    )
    for kind in ("on_manifold", "off_manifold"):
        expected = expected_transition_density(forward, transitions.anchors[kind], device)
        assert logged[f"sensitivity/transition_density_{kind}"] == pytest.approx(expected, rel=1e-5), kind
    assert logged["sensitivity/transition_density_on_manifold"] > 0
    with torch.no_grad():
        val_loss = F.cross_entropy(forward(inputs), labels).item()
    assert logged["generalization/val_loss"] == pytest.approx(val_loss, rel=1e-4)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())


def test_several_validation_dataloaders_are_logged_per_dataloader():
    pl.seed_everything(0)
    model, dm = _models.TwoValidationSetsMLP(), _models.TwoValidationSets()
    watched = monitors({})
    trainer, _ = train(watched, max_epochs=1, model=model, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    model.eval()
    for idx, (start, stop) in enumerate([(0, 200), (200, None)]):
        x = dm.x_val[start:stop][:MAX_POINTS]
        assert logged[f"sensitivity/jacobian_norm/dataloader_idx_{idx}"] == pytest.approx(
            jacobian_norm(model, x).mean().item(), rel=1e-5
        )
    assert "sensitivity/jacobian_norm" not in logged
    with torch.no_grad():  # the gap's validation side is the first dataloader
        val_loss = F.cross_entropy(model(dm.x_val[:200]), dm.y_val[:200]).item()
    assert logged["generalization/val_loss"] == pytest.approx(val_loss, rel=1e-5)
