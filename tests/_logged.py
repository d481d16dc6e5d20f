"""The logged-value checker: every value a monitor logged equals a direct measurement (``jacobian_norm``,
``count_transitions``, the eval-mode loss and accuracy) of the weights it was logged on.

A ``CapturingLogger`` keeps every ``log_metrics`` call with a copy of the module's weights at that moment: a monitor
logs right after it measures, so these are the weights its values were measured on, and a run whose last measurement
is not on the final weights is still checked exactly. A ``Reference`` says how to rebuild the network from those
weights and which points the monitors read; ``check_logged`` measures again and compares.

Tolerances: ``rel`` (relative 1e-4 unless a test asks for less) for Jacobian norms and losses, which are float sums
over batches of other sizes than the monitors' (losses with an absolute floor of ``rel / 100``, for a loss near 0);
1e-6 (``EXACT``) for accuracies, transition counts and densities (counts of integers). A run in another precision is
compared with the measurement in ``Reference.dtype`` of the same weights (cast), on the inputs as the precision plugin
converts them (``Reference.convert``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import (
    TransitionCount,
    count_transitions,
    jacobian_norm,
    trajectory_through,
)

REL = 1e-4
EXACT = 1e-6


@dataclass
class Logged:
    """One ``log_metrics`` call: the step, the values, and the module's weights at that moment."""

    step: int
    metrics: dict[str, float]
    weights: dict[str, Tensor]


class CapturingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory, with a copy of the weights of ``module`` at that moment."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.history: list[Logged] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        previous = self.history[-1].weights if self.history else None
        if previous is not None and all(torch.equal(v, previous[k]) for k, v in weights.items()):
            weights = previous  # the same weights: one copy (vgg11_bn has 129M parameters)
        self.history.append(
            Logged(-1 if step is None else step, {k: float(v) for k, v in metrics.items()}, weights)
        )

    def keys(self) -> set[str]:
        """Every key logged."""
        return {key for record in self.history for key in record.metrics}

    def steps(self, key: str) -> list[int]:
        """The steps at which ``key`` was logged."""
        return [r.step for r in self.history if key in r.metrics]

    def last(self, key: str) -> Logged:
        """The last call that logged ``key``."""
        records = [r for r in self.history if key in r.metrics]
        assert records, f"{key!r} was never logged; logged keys: {sorted(self.keys())}"
        return records[-1]


def fit(
    model: pl.LightningModule,
    dm: pl.LightningDataModule,
    callbacks: list[pl.Callback],
    tmp_path: Any,
    fit_target: Any = None,
    loggers: Sequence[Any] = (),
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, CapturingLogger]:
    """A CPU fit of ``model`` (or ``fit_target``, a wrapped ``model``) with a capturing logger beside ``loggers``;
    the caller seeds."""
    capture = CapturingLogger(model)
    options: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=[capture, *loggers],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model if fit_target is None else fit_target, datamodule=dm)
    return trainer, capture


def _call(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


def _same(module: nn.Module, x: Tensor) -> Tensor:
    return x


def _unchanged(x: Tensor) -> Tensor:
    return x


@dataclass
class Reference:
    """How to measure directly what the monitors of a run should have logged.

    Args:
        build: a fresh, uncompiled module of the trained module's architecture; the logged weights are loaded into
            it (a compiled network's ``_orig_mod.`` names undone).
        data: holds ``x_train, y_train, x_val, y_val``, the points as the dataloaders give them.
        read: the monitors' input from data points and the module (what ``get_input`` does); default: the points.
        forward: logits from that input and the module (what ``forward_fn`` does); default: ``module(x)``.
        gap_forward: logits from data points for the gap monitor, which reads the points as they are; default:
            ``forward(read(x))``.
        binary: one logit: binary cross-entropy, and the sign of the logit as the prediction.
        dtype: the precision of the measurement: the module is cast to it before the weights are loaded (float64
            weights stay float64, half ones are measured in float32).
        convert: the inputs as the precision plugin gives them (``trainer.precision_plugin.convert_input``).
        device: where the monitors measured.
        num_val: how many validation points the validation passes see (``limit_val_batches``).
        splits: the validation dataloaders' shares of ``x_val`` when there are several (the Jacobian norm is logged
            per dataloader; the gap's validation side is the first).
    """

    build: Callable[[], nn.Module]
    data: Any
    read: Callable[[nn.Module, Tensor], Tensor] = _same
    forward: Callable[[nn.Module, Tensor], Tensor] = _call
    gap_forward: Callable[[nn.Module, Tensor], Tensor] | None = None
    binary: bool = False
    dtype: torch.dtype = torch.float32
    convert: Callable[[Tensor], Tensor] = _unchanged
    device: str | torch.device = "cpu"
    num_val: int | None = None
    splits: Sequence[slice] = field(default_factory=lambda: [slice(None)])

    @classmethod
    def of(cls, model: pl.LightningModule, data: Any, **options: Any) -> Reference:
        """The reference for ``model``, rebuilt from its class and hyperparameters."""
        return cls(lambda: type(model)(**model.hparams), data, **options)

    def network(self, weights: dict[str, Tensor]) -> nn.Module:
        """The module with ``weights``, in ``dtype``, on ``device``, in eval mode."""
        module = self.build().to(self.dtype)
        module.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in weights.items()})
        return module.to(self.device).eval()

    def points(self, x: Tensor) -> Tensor:
        """Data points as the monitors see them: converted as the precision plugin does, in ``dtype``."""
        x = self.convert(x)
        return (x.to(self.dtype) if x.is_floating_point() else x).to(self.device)

    def validation(self, split: int = 0) -> tuple[Tensor, Tensor]:
        share = self.splits[split]
        x, y = self.data.x_val[share][: self.num_val], self.data.y_val[share][: self.num_val]
        return self.points(x), y.to(self.device)

    def logits_for_gap(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.gap_forward is not None:
            return self.gap_forward(module, x)
        return self.forward(module, self.read(module, x))


def loss_and_accuracy(logits: Tensor, y: Tensor, binary: bool = False) -> tuple[float, float]:
    """Mean loss (cross-entropy, or binary cross-entropy on one logit) and accuracy (argmax, or the sign of the one
    logit), in float64."""
    logits = logits.double()
    if binary:
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.double())
        predictions = (logits.squeeze(1) > 0).long()
    else:
        loss, predictions = F.cross_entropy(logits, y), logits.argmax(1)
    return loss.item(), (predictions == y).double().mean().item()


def gap_values(
    logits: Callable[[Tensor], Tensor],
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    binary: bool = False,
) -> dict[str, float]:
    """What ``GeneralizationGapMonitor`` logs (without its prefix), measured directly: ``logits`` (eval mode) on the
    training subset ``train`` and the validation points ``val``, each ``(inputs, labels)``."""
    with torch.no_grad():
        train_loss, train_accuracy = loss_and_accuracy(logits(train[0]), train[1], binary)
        val_loss, val_accuracy = loss_and_accuracy(logits(val[0]), val[1], binary)
    return {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "gap_loss": val_loss - train_loss,
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        "gap_accuracy": train_accuracy - val_accuracy,
    }


def count_along(
    forward: Callable[[Tensor], Tensor],
    anchors: Tensor,
    num_points: int,
    method: str = "sampled",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[TransitionCount]:
    """The counts along the closed curves through ``anchors`` ``[N, 3, ...]``."""
    curves = [trajectory_through(a.to(device, dtype), num_points) for a in anchors]
    return count_transitions(forward, curves, method=method, warn_smooth=False)  # the monitor warns, not this


def transition_counts(
    forward: Callable[[Tensor], Tensor],
    anchors: Tensor,
    num_points: int,
    method: str = "sampled",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """``(mean transition density, mean count)`` along the closed curves through ``anchors`` ``[N, 3, ...]``."""
    return mean_density_and_count(count_along(forward, anchors, num_points, method, dtype, device))


def mean_density_and_count(counts: Sequence[TransitionCount]) -> tuple[float, float]:
    """The mean density and the mean count of ``counts``."""
    return sum(c.density for c in counts) / len(counts), sum(c.transitions for c in counts) / len(counts)


def resolution_of_mean_density(counts: Sequence[TransitionCount]) -> float:
    """The relative difference between the mean density of ``counts`` and the mean density counted on every other
    point of each curve (0 when the density is 0)."""
    density = sum(c.transitions / c.arc_length for c in counts) / len(counts)
    half = sum(c.transitions_half / c.arc_length for c in counts) / len(counts)
    return (density - half) / density if density > 0 else 0.0


def of_type(callbacks: Sequence[pl.Callback], kind: type) -> Any:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def _loss(value: float, rel: float) -> Any:
    """A mean loss to ``rel``, with an absolute floor of ``rel / 100`` for a loss near 0."""
    return pytest.approx(value, rel=rel, abs=rel / 100)


def check_logged(
    capture: CapturingLogger,
    callbacks: Sequence[pl.Callback],
    reference: Reference,
    *,
    rel: float = REL,
    trainer: pl.Trainer | None = None,
) -> None:
    """Each monitor's last logged values equal the direct measurement on the weights they were measured on.

    ``trainer``: also check that ``trainer.callback_metrics`` (what ``EarlyStopping`` and ``ModelCheckpoint`` read)
    hold the Jacobian norm logged last.
    """
    jacobian = of_type(callbacks, JacobianNormMonitor)
    if jacobian is not None:
        assert jacobian.method == "exact", "a projected norm is random: no direct measurement to compare with"
        for split in range(len(reference.splits)):
            key = f"{jacobian.prefix}/jacobian_norm"
            key += f"/dataloader_idx_{split}" if len(reference.splits) > 1 else ""
            record = capture.last(key)
            net = reference.network(record.weights)
            x_val, _ = reference.validation(split)
            with torch.no_grad():
                inputs = reference.read(net, x_val[: jacobian.max_points])
            expected = jacobian_norm(partial(reference.forward, net), inputs, output=jacobian.output)
            assert record.metrics[key] == pytest.approx(expected.mean().item(), rel=rel), key
            if trainer is not None and key in trainer.callback_metrics:
                assert float(trainer.callback_metrics[key]) == pytest.approx(record.metrics[key], rel=1e-6), key
    gap = of_type(callbacks, GeneralizationGapMonitor)
    if gap is not None:
        p = gap.prefix
        record = capture.last(f"{p}/val_loss")
        net = reference.network(record.weights)
        x_val, y_val = reference.validation()
        indices = gap.train_indices
        assert indices is not None and len(indices) == min(len(x_val), gap.max_train_points or len(x_val))
        x_train = reference.points(reference.data.x_train[indices])
        y_train = reference.data.y_train[indices].to(reference.device)
        direct = gap_values(
            partial(reference.logits_for_gap, net), (x_train, y_train), (x_val, y_val), reference.binary
        )
        losses = abs(direct["val_loss"]) + abs(direct["train_loss"])
        difference = rel * losses + EXACT  # as exact as its two terms
        expected = {
            "val_loss": _loss(direct["val_loss"], rel),
            "train_loss": _loss(direct["train_loss"], rel),
            "gap_loss": pytest.approx(direct["gap_loss"], rel=rel, abs=difference),
            "val_accuracy": pytest.approx(direct["val_accuracy"], rel=EXACT, abs=EXACT),
            "train_accuracy": pytest.approx(direct["train_accuracy"], rel=EXACT, abs=EXACT),
            "gap_accuracy": pytest.approx(direct["gap_accuracy"], rel=rel, abs=difference),
        }
        for name, value in expected.items():
            assert record.metrics[f"{p}/{name}"] == value, name
    transitions = of_type(callbacks, TransitionMonitor)
    if transitions is not None:
        p = transitions.prefix
        record = capture.last(f"{p}/transition_density_on_manifold")
        net = reference.network(record.weights)
        for kind, anchors in transitions.state_dict()["anchors"].items():
            counts = count_along(
                partial(reference.forward, net),
                anchors,
                transitions.num_points,
                transitions.method,
                reference.dtype,
                reference.device,
            )
            density, count = mean_density_and_count(counts)
            assert record.metrics[f"{p}/transition_density_{kind}"] == pytest.approx(density, rel=EXACT), kind
            assert record.metrics[f"{p}/transitions_{kind}"] == pytest.approx(count, rel=EXACT), kind
            resolution = resolution_of_mean_density(counts)
            logged = record.metrics[f"{p}/transitions_resolution_{kind}"]
            assert logged == pytest.approx(resolution, rel=1e-5, abs=EXACT), kind  # float32 of a float64 ratio


def check_last_pass_measured(capture: CapturingLogger, keys: Sequence[str]) -> None:
    """Each key was logged at least once, and at or after the step of the last validation pass (where ``val_loss``
    is): when the fit ends where the schedule could not foresee it (``max_steps`` mid-epoch, ``max_time``), the
    monitors measure the final weights after training, at the step of the last epoch end. The values are checked
    against the weights of the moment they were logged (``check_logged``)."""
    passes = capture.steps("val_loss")
    assert passes, "no validation pass ran"
    for key in keys:
        steps = capture.steps(key)
        assert steps, f"{key} was never measured in {len(passes)} validation passes (at steps {passes})"
        assert steps[-1] >= passes[-1], (
            f"{key}: last measured at step {steps[-1]}, last validation pass at {passes[-1]}"
        )
