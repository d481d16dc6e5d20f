"""Every monitor on the model families projects train, each logged value checked against a direct measurement of the
weights it was logged on (``tests/_logged.py``).

On digits: an MLP; a CNN with batch norm, max pooling, dropout and functional ``F.relu``; torchvision's ``resnet18``
on 32 x 32 inputs; a model whose ``forward`` takes a dict; a text classifier over token ids (the Jacobian and the
linear regions measured at the embeddings, through ``get_input``/``forward_fn``). On synthetic images: torchvision's
``mobilenet_v3_small``, ``vgg11_bn``, ``googlenet`` and ``efficientnet_b0``, and layer norm with GELU before a ReLU
head (smooth units beside counted ones).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import JacobianNormMonitor
from tests import _synthetic
from tests._logged import CapturingLogger, Reference, check_logged, fit
from tests._synthetic import ImageClassifier, SyntheticImages
from tests.integration import _models
from tests.integration._helpers import CountSteps

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
    pytest.mark.filterwarnings("ignore:.*per-point records.*"),
]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
SMOOTH_WARNING = "(?i)not piecewise.linear"


def _smooth_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if re.search(SMOOTH_WARNING, str(w.message))]


# --- on digits, on the CPU and on CUDA ---------------------------------------------------------------------------


@dataclass
class Case:
    model: Callable[[], pl.LightningModule]
    datamodule: Callable[[], pl.LightningDataModule]
    #: keyword arguments that tell every monitor how to read batches and call the model
    reading: Callable[[pl.LightningModule], dict[str, Any]] = lambda model: {}
    #: how the reference reads the points and calls the model (``tests._logged.Reference``)
    measuring: dict[str, Callable[[Any, Tensor], Tensor]] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


CASES = {
    "mlp": Case(MLPClassifier, DigitsDataModule),
    "cnn_batchnorm_maxpool_functional_relu": Case(_models.DigitsCNN, DigitsDataModule),
    "resnet18_32x32": Case(_models.ResNet18, _models.ResNetDigits, trainer_kwargs={"limit_train_batches": 2}),
    "dict_forward": Case(
        _models.DictInputMLP,
        _models.DictDigits,
        reading=lambda model: {"input_key": "image", "forward_fn": lambda m, x: m({"image": x})},
        measuring={"forward": lambda m, x: m({"image": x})},
    ),
    "text_token_ids": Case(
        _models.TextClassifier,
        _models.TextData,
        reading=lambda model: {
            "get_input": lambda batch: model.embedding(batch[0]),
            "forward_fn": lambda m, embedded: m.classify(embedded),
        },
        # the gap is measured on the token ids, through the whole model
        measuring={
            "read": lambda m, tokens: m.embedding(tokens),
            "forward": lambda m, embedded: m.classify(embedded),
            "gap_forward": lambda m, tokens: m(tokens),
        },
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_every_monitor_logs_the_direct_measurement(name, device):
    case = CASES[name]
    pl.seed_everything(0)
    model, dm = case.model(), case.datamodule()
    watched = _models.monitors(case.reading(model))
    capture = CapturingLogger(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = train(
            watched, max_epochs=1, model=model, datamodule=dm, accelerator=device, logger=capture,
            **case.trainer_kwargs,
        )  # fmt: skip
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["sensitivity/jacobian_norm"] > 0
    assert logged["sensitivity/transition_density_on_manifold"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    # measured directly on the device the monitors measured on
    reference = Reference.of(model, dm, device=device, **case.measuring)
    check_logged(capture, watched, reference, rel=1e-4, trainer=trainer)
    assert not _smooth_warnings(caught), [str(w.message) for w in _smooth_warnings(caught)]


# --- torchvision and smooth units, on synthetic images ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "smooth"),
    [
        pytest.param("mobilenet_v3_small", True, id="mobilenet_v3_small"),
        pytest.param("vgg11_bn", False, id="vgg11_bn", marks=pytest.mark.slow),
        pytest.param("googlenet", False, id="googlenet"),
        pytest.param("gelu_layernorm_relu", True, id="gelu_layernorm_relu"),
    ],
)
def test_every_monitor_on_a_synthetic_image_model(name, smooth, tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier(name), SyntheticImages(num_train=32, num_val=16)
    callbacks = _synthetic.monitors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)
    smooth_warnings = _smooth_warnings(caught)
    if smooth:  # smooth units beside counted ones: a count of the counted units' boundaries, not of regions
        assert smooth_warnings, "the TransitionMonitor did not warn that the model is not piecewise linear"
        assert all(issubclass(w.category, UserWarning) for w in smooth_warnings)
    else:
        assert not smooth_warnings, [str(w.message) for w in smooth_warnings]


def test_efficientnet_b0_jacobian_and_gap(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("efficientnet_b0"), SyntheticImages(num_train=32, num_val=16)
    callbacks = _synthetic.monitors(transitions=False)
    trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)


def test_efficientnet_b0_transition_monitor_refuses_before_training(tmp_path):
    """efficientnet_b0 has no piecewise-linear unit at all (SiLU and sigmoid only): no transitions to count, an
    error naming its non-linearities, before any optimizer step."""
    pl.seed_everything(0)
    model, dm = ImageClassifier("efficientnet_b0"), SyntheticImages(num_train=32, num_val=16)
    callbacks = _synthetic.monitors(jacobian=False, gap=False)
    with pytest.raises(ValueError, match="(?i)silu"):
        fit(model, dm, callbacks, tmp_path)
    assert model.trainer.global_step == 0


# --- activation checkpointing, and a measurement that fails ----------------------------------------------------------


@pytest.mark.parametrize("net", ["cnn_checkpointed", "cnn_checkpointed_reentrant"], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_is_measured_as_the_model_without_it(net, tmp_path):
    """A Conv + BatchNorm + ReLU block through ``torch.utils.checkpoint`` (the fit died at its first measurement with
    ``CheckpointError`` for the non-reentrant form, and the reentrant form cannot be differentiated with
    ``torch.autograd.grad``): every logged value equals the direct measurement of the same weights in the network
    without checkpointing."""
    pl.seed_everything(0)
    model, dm = ImageClassifier(net, size=16), SyntheticImages(size=16)
    callbacks = _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    plain = Reference(lambda: ImageClassifier("cnn", size=16), dm)
    check_logged(capture, callbacks, plain, rel=1e-5, trainer=trainer)
    assert all(p.requires_grad for p in model.parameters())


class _NoBackward(torch.autograd.Function):
    """The identity, whose backward is not implemented: the forward pass runs, a Jacobian cannot."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        raise RuntimeError("this model has no backward pass")


class _ForwardOnly(MLPClassifier):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(_NoBackward.apply(x))


@pytest.mark.parametrize("sanity", [True, False], ids=["sanity check", "num_sanity_val_steps=0"])
def test_a_measurement_that_fails_fails_before_the_first_training_step(sanity):
    """The first-batch check runs the Jacobian itself on a few points (it ran only a forward pass): a model whose
    backward fails stops the fit in the sanity check, or without one at the first training batch, before its step."""
    steps = CountSteps()
    extra = {} if sanity else {"num_sanity_val_steps": 0}
    with pytest.raises(RuntimeError, match="no backward pass"):
        train([JacobianNormMonitor(), steps], max_epochs=1, model=_ForwardOnly(), **extra)
    assert steps.steps == 0
