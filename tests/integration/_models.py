"""Models of the shapes projects train on digits, each a ``LightningModule`` small enough for a seconds-long test,
and the monitors configured to read them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from examples.digits import DigitsDataModule, MLPClassifier
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

MAX_POINTS = 50
NUM_POINTS = 32


def monitors(reading: dict[str, Any]) -> list[pl.Callback]:
    """Every monitor, measuring at least each epoch's end, told how to read the batches (``reading``: ``input_key``,
    ``get_input``, ``forward_fn``); the gap is measured on the batches' own inputs (token ids, not embeddings)."""
    target = {"target_key": "label"} if reading.get("input_key") == "image" else {}
    gap_reading = {k: v for k, v in reading.items() if k != "get_input"}
    if "get_input" in reading:
        gap_reading.pop("forward_fn")
    return [
        JacobianNormMonitor(max_points=MAX_POINTS, **reading, **target),
        TransitionMonitor(
            num_trajectories=2, num_points=NUM_POINTS, every_n_epochs=1, log_figure=False, **reading
        ),
        GeneralizationGapMonitor(max_train_points=64, **gap_reading, **target),
    ]


class _Classifier(pl.LightningModule):
    """Cross-entropy training with SGD; ``logits(batch)`` and ``unpack(batch)`` say how a model reads batches."""

    def unpack(self, batch: Any) -> tuple[Any, Tensor]:
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self.unpack(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class DigitsCNN(_Classifier):
    """Convolutions with batch norm, max pooling, dropout and *functional* ``F.relu`` (no ``nn.ReLU`` module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(self.dropout(x.flatten(1)))


class ResNet18(_Classifier):
    """torchvision's ``resnet18(num_classes=10)`` (in-place ``nn.ReLU``, batch norm, max and average pooling)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResNetDigits(DigitsDataModule):
    """A few digits as 3 x 32 x 32 images (upsampled, the channel repeated): resnet18's smallest usual input."""

    def __init__(self, num_train: int = 48, num_val: int = 21) -> None:
        super().__init__(batch_size=16)
        self.x_train, self.y_train = _grow(self.x_train[:num_train]), self.y_train[:num_train]
        self.x_val, self.y_val = _grow(self.x_val[:num_val]), self.y_val[:num_val]


def _grow(x: Tensor) -> Tensor:
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


class _DictDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class DictDigits(DigitsDataModule):
    """Digits whose batches are dicts ``{"image": ..., "label": ...}``."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_DictDataset(self.x_train, self.y_train), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_DictDataset(self.x_val, self.y_val), batch_size=256)


class DictInputMLP(MLPClassifier):
    """An MLP whose ``forward`` takes the whole dict batch and reads ``batch["image"]``."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        return self.net(batch["image"])

    def _step(self, batch: Any, stage: str) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["label"])
        self.log(f"{stage}_loss", loss)
        return loss


class TextClassifier(_Classifier):
    """Token ids ``[B, L]`` -> embeddings ``[B, L, E]`` -> mean over tokens -> ReLU feed-forward layers -> logits."""

    def __init__(self, vocabulary: int = 50, width: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def classify(self, embedded: Tensor) -> Tensor:
        """Logits from embedded tokens: where the Jacobian and the linear regions are measured."""
        return self.feed_forward(embedded.mean(dim=1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.classify(self.embedding(tokens))


class TextData(pl.LightningDataModule):
    """Random token sequences whose class is the most frequent of four marker tokens (0-3) in them."""

    def __init__(
        self, num_train: int = 256, num_val: int = 77, length: int = 12, vocabulary: int = 50
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocabulary, (num_train + num_val, length), generator=generator)
        counts = torch.stack([(tokens == c).sum(1) for c in range(4)], dim=1).float()
        labels = (counts + 1e-3 * torch.arange(4)).argmax(1)
        self.x_train, self.y_train = tokens[:num_train], labels[:num_train]
        self.x_val, self.y_val = tokens[num_train:], labels[num_train:]
        self.train_set = TensorDataset(self.x_train, self.y_train)
        self.val_set = TensorDataset(self.x_val, self.y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


class TwoValidationSets(DigitsDataModule):
    """Digits with two validation dataloaders: the first 200 and the remaining 339 validation points."""

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(TensorDataset(self.x_val[:200], self.y_val[:200]), batch_size=64),
            DataLoader(TensorDataset(self.x_val[200:], self.y_val[200:]), batch_size=64),
        ]


class TwoValidationSetsMLP(MLPClassifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")
