"""Train a small classifier on scikit-learn's bundled digits with the sensitivity monitors attached.

    python -m examples.digits                     # logs under ./runs, then: tensorboard --logdir runs
    python -m examples.digits --no-monitors       # the same training without the monitors

The data module and the model here are the building blocks of every example, benchmark and test that
trains on digits: 1,797 real 8x8 handwritten digits, available offline (no download).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardtanh": nn.Hardtanh,
    "hardsigmoid": nn.Hardsigmoid,
    "tanh": nn.Tanh,
}


def load_digits_tensors(seed: int = 0, val_fraction: float = 0.3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as ``[N, 1, 8, 8]`` float images scaled to [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    num_val = int(round(val_fraction * len(x)))
    val, train = order[:num_val], order[num_val:]
    return x[train], y[train], x[val], y[val]


class RandomShift(Dataset):
    """Images shifted by up to ``max_shift`` pixels in each direction (zero padded): the augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, max_shift: int = 1, seed: int = 0) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        dx, dy = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=self.generator).tolist()
        padded = F.pad(self.images[index], [self.max_shift] * 4)
        h, w = self.images.shape[-2:]
        top, left = self.max_shift + dy, self.max_shift + dx
        return padded[..., top : top + h, left : left + w], self.labels[index]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits as a ``LightningDataModule``.

    Args:
        batch_size: training batch size; ``None`` trains full batch.
        seed: seeds the split, the random labels and the augmentation.
        augment: random shifts of up to one pixel in the training set.
        random_label_fraction: this fraction of training labels is replaced by random classes.
        val_fraction: share of the 1,797 images held out for validation.
        data: ``(x_train, y_train, x_val, y_val)`` to use instead of the digits (images ``[N, C, H, W]`` and
            integer labels, for example a torchvision data set); ``val_fraction`` is then unused.
    """

    def __init__(
        self,
        batch_size: int | None = 64,
        seed: int = 0,
        augment: bool = False,
        random_label_fraction: float = 0.0,
        val_fraction: float = 0.3,
        data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["data"])
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.random_label_fraction, self.val_fraction = random_label_fraction, val_fraction
        if data is None:
            data = load_digits_tensors(seed, val_fraction)
        self.x_train, self.y_train, self.x_val, self.y_val = data
        if random_label_fraction > 0:
            num_classes = int(torch.cat([self.y_train, self.y_val]).max()) + 1
            g = torch.Generator().manual_seed(seed + 1)
            flip = torch.rand(len(self.y_train), generator=g) < random_label_fraction
            random_labels = torch.randint(0, num_classes, self.y_train.shape, generator=g)
            self.y_train = torch.where(flip, random_labels, self.y_train)

    def train_dataloader(self) -> DataLoader:
        data = (
            RandomShift(self.x_train, self.y_train, seed=self.seed)
            if self.augment
            else TensorDataset(self.x_train, self.y_train)
        )
        batch_size = self.batch_size or len(data)
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class MLPClassifier(pl.LightningModule):
    """A fully-connected classifier: flatten, ``len(hidden_sizes)`` hidden layers, logits.

    Args:
        in_features: input entries (64 for digits).
        num_classes: output classes.
        hidden_sizes: widths of the hidden layers.
        activation: one of ``relu``, ``relu6``, ``hardtanh``, ``hardsigmoid``, ``tanh``.
        optimizer: ``sgd`` (momentum 0.9) or ``adam``.
        lr: learning rate.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden_sizes: Sequence[int] = (128, 128),
        activation: str = "relu",
        optimizer: str = "sgd",
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def default_monitors() -> list[pl.Callback]:
    """Every monitor of the package at its default settings (those that exist in this version)."""
    import lightning_sensitivity.callbacks as callbacks

    names = ["JacobianNormMonitor", "TransitionMonitor", "GeneralizationGapMonitor"]
    return [getattr(callbacks, name)() for name in names if hasattr(callbacks, name)]


def train(
    callbacks: Sequence[pl.Callback] = (),
    max_epochs: int = 20,
    seed: int = 0,
    logger: Any = False,
    datamodule: DigitsDataModule | None = None,
    model: pl.LightningModule | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, pl.LightningModule]:
    """Seeded training on digits on the CPU; returns the trainer and the trained model."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model = model or MLPClassifier()
    datamodule = datamodule or DigitsDataModule(seed=seed)
    options: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    options.update(trainer_kwargs)
    trainer = pl.Trainer(**options)
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--no-monitors", action="store_true", help="train without the sensitivity monitors")
    args = parser.parse_args(argv)

    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(args.logdir, name="digits")
    callbacks = [] if args.no_monitors else default_monitors()
    start = time.perf_counter()
    trainer, _ = train(callbacks, max_epochs=args.max_epochs, seed=args.seed, logger=logger)
    elapsed = time.perf_counter() - start
    print(f"Trained {args.max_epochs} epochs in {elapsed:.1f} s with {[type(c).__name__ for c in callbacks]}.")
    for key, value in sorted(trainer.callback_metrics.items()):
        print(f"  {key:45s} {float(value):.4f}")
    print(f"TensorBoard logs: {logger.log_dir}\nView them with:  tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
