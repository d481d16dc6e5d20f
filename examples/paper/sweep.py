"""F1 and F3: the sweep of fully-connected classifiers, each trained and then measured.

The grid is a set of base models (width x depth x optimizer and learning rate, all with ReLU, mini-batches
of 64, no augmentation, true labels) and, for every base model, one variant per factor of the paper
(augmentation, random labels, full batch, a saturating non-linearity). Each variant differs from its base in
that one factor and nothing else (same seed, so the same data split and the same initial weights), which
makes the paired comparison of F3 exact; all models together are the population of F1.

A model trains until it classifies its own training set (with its random labels, if any) perfectly in eval
mode, or until ``max_epochs``. Then it is measured directly with the functional layer, the same way for every
model: the generalization gap of SPEC section 4 (training set against held-out set, eval mode) and the
Jacobian norm of every held-out point (F1, F4).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from typing_extensions import override

from examples.digits import DigitsDataModule, MLPClassifier, train
from examples.paper.data import DataSpec, load_tensors

#: The settings every variant starts from.
BASE_FACTORS: dict[str, Any] = {
    "activation": "relu",
    "batch_size": 64,
    "augment": False,
    "random_label_fraction": 0.0,
}

#: One variant per factor: the factor's name and the settings that differ from the base.
VARIANTS: dict[str, dict[str, Any]] = {
    "augmentation": {"augment": True},
    "random labels": {"random_label_fraction": 0.25},
    "full batch": {"batch_size": None},
    "hardtanh": {"activation": "hardtanh"},
    "hardsigmoid": {"activation": "hardsigmoid"},
}

OPTIMIZERS: tuple[tuple[str, float], ...] = (("sgd", 0.05), ("adam", 0.002))


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of one model of the sweep.

    Args:
        width: units per hidden layer.
        depth: hidden layers.
        activation: the non-linearity (see ``examples.digits.ACTIVATIONS``).
        optimizer: ``sgd`` (momentum 0.9) or ``adam``.
        lr: learning rate.
        batch_size: mini-batch size; ``None`` trains full batch.
        augment: random shifts of up to one pixel.
        random_label_fraction: share of training labels replaced by random classes.
        seed: data split, random labels, augmentation, initial weights and batch order.
        max_epochs: training stops here if the training set is not fitted before.
    """

    width: int
    depth: int
    activation: str
    optimizer: str
    lr: float
    batch_size: int | None
    augment: bool
    random_label_fraction: float
    seed: int
    max_epochs: int

    @property
    def model_id(self) -> str:
        """A readable name that is unique within a sweep: the TensorBoard version and the table's key."""
        batch = "full" if self.batch_size is None else self.batch_size
        return (
            f"w{self.width}-d{self.depth}-{self.activation}-{self.optimizer}{self.lr:g}-b{batch}"
            f"-aug{int(self.augment)}-rl{self.random_label_fraction:g}-s{self.seed}-e{self.max_epochs}"
        )


def sweep_grid(quick: bool = False, seed: int = 0, max_epochs: int | None = None) -> list[ModelConfig]:
    """The models of the sweep: every base model of the grid, and each of its one-factor variants.

    Args:
        quick: the small grid (one width, one depth: 12 models) instead of the default one (48 models).
        seed: the seed shared by all models, so that each pair differs only in its factor.
        max_epochs: the training cap; default 30 (quick) or 100.
    """
    widths, depths = ((64,), (1,)) if quick else ((64, 256), (1, 3))
    epochs = max_epochs if max_epochs is not None else (30 if quick else 100)
    configs = []
    for width in widths:
        for depth in depths:
            for optimizer, lr in OPTIMIZERS:
                for changes in [{}, *VARIANTS.values()]:
                    factors = {**BASE_FACTORS, **changes}
                    configs.append(ModelConfig(width, depth, optimizer=optimizer, lr=lr, seed=seed,
                                               max_epochs=epochs, **factors))
    return configs


def reference_model(configs: list[ModelConfig]) -> ModelConfig:
    """The model that F2 studies: the first base model (ReLU, mini-batch, no augmentation, true labels) of the
    median width."""
    bases = [c for c in configs if all(getattr(c, k) == v for k, v in BASE_FACTORS.items())]
    widths = sorted({c.width for c in bases})
    median = widths[len(widths) // 2]
    return next(c for c in bases if c.width == median)


class StopAtTrainAccuracy(pl.Callback):
    """Stops training once the model, in eval mode, reaches ``target`` accuracy on its whole training set.

    The training set is the one the model learns (its random labels included), without augmentation; the
    check, one forward pass over it, runs at the end of every training epoch.

    Args:
        x: the training inputs.
        y: the training labels.
        target: the accuracy that ends training.
    """

    def __init__(self, x: Tensor, y: Tensor, target: float = 1.0) -> None:
        self.x, self.y, self.target = x, y, target
        self.accuracy = float("nan")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logits = evaluate_logits(pl_module, self.x)
        self.accuracy = (logits.argmax(1) == self.y).double().mean().item()
        if self.accuracy >= self.target:
            trainer.should_stop = True


def evaluate_logits(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """The model's logits on ``x`` in eval mode, without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    finally:
        model.train(was_training)


def sensitivity_monitors(datamodule: DigitsDataModule, piecewise_linear: bool, every_n_epochs: int) -> list[pl.Callback]:
    """The package's three monitors, measuring every ``every_n_epochs`` epochs (transitions only for
    piecewise-linear models). Their curves go to TensorBoard; the table takes its numbers from :func:`measure`.
    """
    from lightning_sensitivity.callbacks import (
        GeneralizationGapMonitor,
        JacobianNormMonitor,
        TransitionMonitor,
    )

    # The gap's training side: the training points as the model learns them, without augmentation.
    train_points = TensorDataset(datamodule.x_train, datamodule.y_train)
    monitors: list[pl.Callback] = [
        JacobianNormMonitor(every_n_epochs=every_n_epochs, record_epochs=None),
        GeneralizationGapMonitor(every_n_epochs=every_n_epochs, train_dataset=train_points),
    ]
    if piecewise_linear:
        monitors.append(TransitionMonitor(every_n_epochs=every_n_epochs))
    return monitors


def measure(model: nn.Module, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor) -> tuple[dict[str, float], pd.DataFrame]:
    """The final measurements of one trained model, and its per-point records on the held-out set.

    Returns:
        The summary (gap of SPEC section 4, mean Jacobian norms, F4 statistics) and one row per held-out
        point: ``index``, ``label``, ``prediction``, ``loss``, ``jacobian_norm``.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from lightning_sensitivity.functional import jacobian_norm

    train_logits, val_logits = evaluate_logits(model, x_train), evaluate_logits(model, x_val)
    train_loss = F.cross_entropy(train_logits, y_train).item()
    val_losses = F.cross_entropy(val_logits, y_val, reduction="none")
    train_accuracy = (train_logits.argmax(1) == y_train).double().mean().item()
    prediction = val_logits.argmax(1)
    val_accuracy = (prediction == y_val).double().mean().item()
    norms = jacobian_norm(model, x_val)
    train_norms = jacobian_norm(model, x_train)
    points = pd.DataFrame(
        {
            "index": np.arange(len(x_val)),
            "label": y_val.numpy(),
            "prediction": prediction.numpy(),
            "loss": val_losses.double().numpy(),
            "jacobian_norm": norms.double().numpy(),
        }
    )
    wrong = (points.label != points.prediction).to_numpy()
    summary = {
        "train_loss": train_loss,
        "val_loss": val_losses.mean().item(),
        "gap_loss": val_losses.mean().item() - train_loss,
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        "gap_accuracy": train_accuracy - val_accuracy,
        "jacobian_norm": float(points.jacobian_norm.mean()),
        "jacobian_norm_train": train_norms.double().mean().item(),
        "f4_spearman": float(spearmanr(points.jacobian_norm, points.loss).statistic),
        "f4_auc_misclassified": float(roc_auc_score(wrong, points.jacobian_norm)) if 0 < wrong.sum() < len(wrong) else math.nan,
        "num_misclassified": int(wrong.sum()),
    }
    return summary, points


def build(config: ModelConfig, spec: DataSpec) -> tuple[DigitsDataModule, MLPClassifier]:
    """The data module and the untrained model of ``config``; the same seed gives the same initial weights."""
    x_train, y_train, x_val, y_val = load_tensors(spec)
    datamodule = DigitsDataModule(
        batch_size=config.batch_size,
        seed=config.seed,
        augment=config.augment,
        random_label_fraction=config.random_label_fraction,
        data=(x_train, y_train, x_val, y_val),
    )
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = MLPClassifier(
        in_features=x_train[0].numel(),
        num_classes=int(torch.cat([y_train, y_val]).max()) + 1,
        hidden_sizes=(config.width,) * config.depth,
        activation=config.activation,
        optimizer=config.optimizer,
        lr=config.lr,
    )
    return datamodule, model


def quiet_lightning() -> None:
    """Keep the progress bar over models readable: no per-run banners, no warnings that do not apply here (the
    logging interval is longer than a digits epoch on purpose, a deprecation inside Lightning)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_and_measure(config: ModelConfig, spec: DataSpec, runs_dir: str, points_dir: str,
                      monitor_every_n_epochs: int = 5) -> dict[str, Any]:
    """Train one model with the monitors attached (TensorBoard under ``runs_dir``), measure it, and return its
    row of the table: every hyper-parameter and every measurement. Its per-point records are written to
    ``points_dir/<model_id>.csv``."""
    quiet_lightning()
    datamodule, model = build(config, spec)
    x_train, x_val, y_val = datamodule.x_train, datamodule.x_val, datamodule.y_val
    name = f"reproduce-{spec.name}"
    shutil.rmtree(Path(runs_dir) / name / config.model_id, ignore_errors=True)  # an interrupted earlier try
    logger = TensorBoardLogger(runs_dir, name=name, version=config.model_id, default_hp_metric=False)
    stop = StopAtTrainAccuracy(datamodule.x_train, datamodule.y_train)
    every = min(monitor_every_n_epochs, config.max_epochs)  # at least one measurement in a short run
    monitors = sensitivity_monitors(datamodule, config.activation != "tanh", every)
    start = time.perf_counter()
    trainer, model = train(
        [*monitors, stop], max_epochs=config.max_epochs, seed=config.seed, logger=logger,
        datamodule=datamodule, model=model, num_sanity_val_steps=0,
        # Validation only serves the monitors' curves here: run it when they measure.
        check_val_every_n_epoch=every,
    )
    seconds = time.perf_counter() - start
    summary, points = measure(model, datamodule.x_train, datamodule.y_train, x_val, y_val)
    Path(points_dir).mkdir(parents=True, exist_ok=True)
    points.to_csv(Path(points_dir) / f"{config.model_id}.csv", index=False)
    hparams = dataclasses.asdict(config)
    row: dict[str, Any] = {
        "model_id": config.model_id,
        "dataset": spec.name,
        **hparams,
        "batch_size": config.batch_size or len(datamodule.x_train),
        "full_batch": config.batch_size is None,
        "num_train_points": len(x_train),
        "num_val_points": len(x_val),
        "epochs_trained": trainer.current_epoch,
        "reached_target": stop.accuracy >= stop.target,
        "train_seconds": seconds,
        **summary,
    }
    logger.finalize("success")
    return row
