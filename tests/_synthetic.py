"""A world of synthetic images for the tests that run the monitors on many set-ups: learnable random images, a
module around any network (torchvision's or a tiny one), the monitors in a small configuration, a seeded CPU fit that
captures what is logged, and the reference that measures it again (``tests/_logged.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests._logged import Reference

NUM_CLASSES = 10
TORCHVISION = ("resnet18", "vgg11_bn", "mobilenet_v3_small", "googlenet", "efficientnet_b0")


class _CheckpointedCNN(nn.Sequential):
    """The ``"cnn"`` network (the same modules, so the same state dict) whose first Conv + BatchNorm + ReLU block
    runs through ``torch.utils.checkpoint`` (``use_reentrant`` as given)."""

    def __init__(self, *modules: nn.Module, reentrant: bool) -> None:
        super().__init__(*modules)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        block = nn.Sequential(*list(self)[:3])
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        for module in list(self)[3:]:
            x = module(x)
        return x


def build_net(name: str, num_outputs: int = NUM_CLASSES, size: int = 32) -> nn.Module:
    """A torchvision classifier by name, or a tiny network: ``"cnn"`` (convolutions, batch norm, ReLU,
    max pooling), ``"cnn_checkpointed"`` and ``"cnn_checkpointed_reentrant"`` (the same, its first block through
    activation checkpointing), ``"mlp"`` (one hidden ReLU layer over ``3 x size x size`` inputs) and
    ``"gelu_layernorm_relu"`` (layer norm and GELU, then a ReLU head: counted units beside smooth ones)."""
    if name.startswith("cnn_checkpointed"):
        return _CheckpointedCNN(*build_net("cnn", num_outputs, size), reentrant=name.endswith("reentrant"))
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


class ImageClassifier(pl.LightningModule):
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


MAX_POINTS = 12
NUM_POINTS = 16
MAX_TRAIN = 16
#: A key of each monitor measured on validation passes.
ALL_KEYS = ("sensitivity/jacobian_norm", "generalization/gap_loss")


def monitors(
    every_n_epochs: int | None = 1,
    jacobian: bool = True,
    transitions: bool = True,
    gap: bool = True,
    gap_options: dict[str, Any] | None = None,
    **reading: Any,
) -> list[pl.Callback]:
    """The monitors, small: ``every_n_epochs=None`` keeps each monitor's default schedule; ``reading``
    (``forward_fn``, ...) goes to every monitor, ``gap_options`` to the gap monitor only."""
    schedule = {} if every_n_epochs is None else {"every_n_epochs": every_n_epochs}
    chosen: list[pl.Callback] = []
    if jacobian:
        chosen.append(JacobianNormMonitor(max_points=MAX_POINTS, **schedule, **reading))
    if transitions:
        transition_reading = {
            k: v for k, v in reading.items() if k in ("forward_fn", "get_input", "input_key")
        }
        chosen.append(
            TransitionMonitor(
                num_trajectories=1, num_points=NUM_POINTS, log_figure=False, **schedule, **transition_reading
            )
        )
    if gap:
        chosen.append(
            GeneralizationGapMonitor(max_train_points=MAX_TRAIN, **schedule, **reading, **(gap_options or {}))
        )
    return chosen


def reference(model: ImageClassifier, dm: SyntheticImages, **options: Any) -> Reference:
    """What the monitors on ``model`` are checked against: a fresh, uncompiled copy that returns the logits."""
    fresh = {**model.hparams, "compile_net": False, "dict_output": False}
    return Reference(lambda: ImageClassifier(**fresh), dm, binary=model.hparams.binary, **options)
