"""What the set-up matrix trains and how it reads the monitors back: synthetic images, a module around any
network, an in-memory logger that keeps the weights each logged value was measured on, and the direct
measurements a logged value must equal."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through

NUM_CLASSES = 10
TORCHVISION = ("resnet18", "vgg11_bn", "mobilenet_v3_small", "googlenet", "efficientnet_b0")


def build_net(name: str, num_outputs: int = NUM_CLASSES, size: int = 32) -> nn.Module:
    """A torchvision classifier by name, or a tiny network: ``"cnn"`` (convolutions, batch norm, ReLU,
    max pooling), ``"mlp"`` (one hidden ReLU layer over ``3 x size x size`` inputs) and ``"gelu_layernorm_relu"``
    (layer norm and GELU, then a ReLU head: counted units beside smooth ones)."""
    if name in TORCHVISION:
        import torchvision.models as models

        options = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return getattr(models, name)(num_classes=num_outputs, **options)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, num_outputs),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(3 * size * size, 32), nn.ReLU(), nn.Linear(32, num_outputs)
        )
    if name == "gelu_layernorm_relu":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(3 * size * size, 32),
            nn.LayerNorm(32),
            nn.GELU(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, num_outputs),
        )
    raise ValueError(f"unknown network {name!r}")


class MatrixClassifier(pl.LightningModule):
    """SGD training of ``build_net(net)``.

    Args:
        net: the network's name (see ``build_net``).
        binary: one logit ``[B, 1]`` trained with binary cross-entropy on labels 0/1.
        dict_output: ``forward`` returns ``{"logits": ...}``.
        labelled: the batches carry labels; without them the module trains to shrink its logits.
        compile_net: ``self.net = torch.compile(net)``.
        size: the images' side (the MLP's input width).
    """

    def __init__(
        self,
        net: str = "cnn",
        binary: bool = False,
        dict_output: bool = False,
        labelled: bool = True,
        compile_net: bool = False,
        size: int = 32,
        lr: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        network = build_net(net, 1 if binary else NUM_CLASSES, size)
        self.net = torch.compile(network) if compile_net else network

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        logits = self.net(x)
        return {"logits": logits} if self.hparams.dict_output else logits

    def logits(self, x: Tensor) -> Tensor:
        out = self(x)
        return out["logits"] if isinstance(out, dict) else out

    def loss(self, logits: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            return logits.float().pow(2).mean()
        if self.hparams.binary:
            return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.to(logits.dtype))
        return F.cross_entropy(logits, y)

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        return (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._unpack(batch)
        loss = self.loss(self.logits(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._unpack(batch)
        self.log("val_loss", self.loss(self.logits(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class _Stream(IterableDataset):
    """The points of a ``TensorDataset``, in order, as an iterable dataset without a length."""

    def __init__(self, *tensors: Tensor) -> None:
        self.tensors = tensors

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return iter(zip(*self.tensors, strict=True))


class _Unlabelled(Dataset):
    """Bare images: a batch is one tensor, no labels."""

    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> Tensor:
        return self.x[index]


class SyntheticImages(pl.LightningDataModule):
    """Learnable random images ``[N, 3, size, size]``: a fixed pattern per class plus noise.

    Args:
        binary: labels 0/1 (the parity of the class).
        iterable: training and validation sets are ``IterableDataset`` streams.
        labelled: ``False`` gives batches of bare images.
    """

    def __init__(
        self,
        num_train: int = 48,
        num_val: int = 32,
        size: int = 32,
        batch_size: int = 16,
        binary: bool = False,
        iterable: bool = False,
        labelled: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        patterns = torch.randn(NUM_CLASSES, 3, size, size, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (num_train + num_val,), generator=generator)
        images = patterns[labels] + 0.7 * torch.randn(num_train + num_val, 3, size, size, generator=generator)
        labels = labels % 2 if binary else labels
        self.x_train, self.y_train = images[:num_train], labels[:num_train]
        self.x_val, self.y_val = images[num_train:], labels[num_train:]
        self.batch_size, self.iterable, self.labelled = batch_size, iterable, labelled
        self.seed = seed

    def _dataset(self, x: Tensor, y: Tensor) -> Dataset:
        if not self.labelled:
            return _Unlabelled(x)
        return _Stream(x, y) if self.iterable else TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        data = self._dataset(self.x_train, self.y_train)
        if self.iterable:
            return DataLoader(data, batch_size=self.batch_size)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(self.x_val, self.y_val), batch_size=self.batch_size)


@dataclass
class Logged:
    """One ``log_metrics`` call: the step, the values, and the module's weights at that moment."""

    step: int
    metrics: dict[str, float]
    weights: dict[str, Tensor]


class CapturingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory, with a copy of the weights of ``module`` at that moment: a monitor
    logs right after it measures, so these are the weights the values were measured on (whatever the schedule, the
    last logged value need not be on the final weights)."""

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

    def steps(self, key: str) -> list[int]:
        """The steps at which ``key`` was logged."""
        return [r.step for r in self.history if key in r.metrics]

    def last(self, key: str) -> Logged:
        """The last call that logged ``key``."""
        records = [r for r in self.history if key in r.metrics]
        assert records, (
            f"{key!r} was never logged; logged keys: {sorted({k for r in self.history for k in r.metrics})}"
        )
        return records[-1]


def eager_copy(
    module: MatrixClassifier, weights: dict[str, Tensor], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A fresh, uncompiled network with ``weights`` (a compiled network's ``_orig_mod.`` names undone), in ``dtype``,
    in eval mode; it returns the logits whatever ``module.forward`` returns."""
    options = {**module.hparams, "compile_net": False, "dict_output": False}
    fresh = MatrixClassifier(**options).to(dtype)  # before loading: float64 weights stay float64
    fresh.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in weights.items()})
    return fresh.net.eval()


def expected_jacobian(net: nn.Module, x: Tensor) -> float:
    """The mean Jacobian norm of ``net`` over the points ``x``, measured directly."""
    return jacobian_norm(net, x.to(next(net.parameters()).dtype)).mean().item()


def expected_loss_accuracy(net: nn.Module, x: Tensor, y: Tensor, binary: bool = False) -> tuple[float, float]:
    """Eval-mode mean loss (cross-entropy, or binary cross-entropy on one logit) and accuracy (argmax, or the sign
    of the one logit), measured directly."""
    with torch.no_grad():
        logits = net(x.to(next(net.parameters()).dtype)).double()
    if binary:
        loss = F.binary_cross_entropy_with_logits(logits.squeeze(1), y.double())
        predictions = (logits.squeeze(1) > 0).long()
    else:
        loss, predictions = F.cross_entropy(logits, y), logits.argmax(1)
    return loss.item(), (predictions == y).double().mean().item()


def expected_densities(
    net: nn.Module, anchors: dict[str, Tensor], num_points: int, method: str = "sampled"
) -> dict[str, tuple[float, float]]:
    """``{kind: (mean transition density, mean count)}`` recounted along the curves through ``anchors``, in the
    dtype of ``net``."""
    dtype = next(net.parameters()).dtype
    result = {}
    for kind, per_curve in anchors.items():
        curves = [trajectory_through(a.to(dtype), num_points) for a in per_curve]
        counts = count_transitions(net, curves, method=method)
        result[kind] = (
            sum(c.density for c in counts) / len(counts),
            sum(c.transitions for c in counts) / len(counts),
        )
    return result


def weights_of(module: nn.Module) -> dict[str, Tensor]:
    """A copy of ``module``'s state."""
    return copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})
