"""F2: sensitivity along closed curves through training points, as the paper measures it.

One model of the sweep (three ReLU layers or more, true labels) is trained with Lightning and the package's
monitors (logged to TensorBoard), and compared with the same network at its initial weights. Both are measured
along the same ellipses, each through three anchors placed at ``t = 0, 2 pi / 3, 4 pi / 3``:

- ``one class``: three training points of the same class (the class cycles over the ellipses);
- ``any classes``: three training points drawn at random;
- ``off manifold``: three points drawn to match the training data's per-feature mean and standard deviation.

At every point of every ellipse the Jacobian norm, and on every segment (point ``i`` to ``i + 1``) the
linear-region transitions crossed. Each point and segment is placed by its distance in ``t`` to the nearest
anchor, as a share ``u`` of the largest possible distance (``pi / 3``): ``u = 0`` at an anchor, ``u = 1`` half way
between two. The profiles' statistics are in ``examples.paper.analysis``, F2's verdicts in
``examples.paper.verdicts``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from typing_extensions import override

from examples.digits import DigitsDataModule, MLPClassifier, train
from examples.paper.data import DataSpec, load_tensors
from examples.paper.grid import ModelConfig
from examples.paper.measures import loss_and_accuracy
from lightning_sensitivity.functional import (
    count_transitions,
    ellipse_through,
    gaussian_anchors,
    jacobian_norm,
)

#: The anchor kinds of the ellipses; the first two are on the data manifold.
KINDS = ("one class", "any classes", "off manifold")
ON_MANIFOLD = KINDS[:2]


@dataclass
class ManifoldResult:
    """The F2 measurements.

    Args:
        profiles: one row per (model, kind, ellipse, point): ``t``, ``u`` (distance to the nearest anchor, as a
            share of ``pi / 3``), the Jacobian norm at the point and the transitions on the segment that starts
            there (``u_segment`` is its midpoint's distance).
        curves: one row per (model, kind, ellipse): the sampled transitions on all points and on every other
            point (the convergence evidence), and the arc length.
        train_accuracy: the trained model's final accuracy on its training set.
        epochs: the epochs it trained.
    """

    profiles: pd.DataFrame
    curves: pd.DataFrame
    train_accuracy: float
    epochs: int


class StopAtTrainAccuracy(pl.Callback):
    """Stops training once the model, in eval mode, reaches ``target`` accuracy on its whole training set (one
    forward pass at the end of every training epoch).

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
        _, self.accuracy = loss_and_accuracy(pl_module, self.x, self.y)
        if self.accuracy >= self.target:
            trainer.should_stop = True


def distance_to_anchor(t: np.ndarray) -> np.ndarray:
    """``u``: the distance in ``t`` to the nearest of the anchors ``0, 2 pi / 3, 4 pi / 3``, divided by ``pi / 3``.

    Example:
        >>> distance_to_anchor(np.array([0.0, np.pi / 3, 2 * np.pi / 3, 1.9 * np.pi])).round(3).tolist()
        [0.0, 1.0, 0.0, 0.3]
    """
    third = 2 * math.pi / 3
    offset = np.mod(t, third)
    return np.minimum(offset, third - offset) / (math.pi / 3)


def manifold_anchors(x: Tensor, y: Tensor, num_ellipses: int, seed: int) -> dict[str, Tensor]:
    """The anchors of every kind, ``[3 * num_ellipses, ...]``, from ``torch.Generator().manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    one_class = []
    for index in range(num_ellipses):
        members = torch.nonzero(y == classes[index % len(classes)]).flatten()
        one_class.append(x[members[torch.randperm(len(members), generator=generator)[:3]]])
    return {
        "one class": torch.cat(one_class),
        "any classes": x[torch.randperm(len(x), generator=generator)[: 3 * num_ellipses]],
        "off manifold": gaussian_anchors(x.mean(0), x.std(0), 3 * num_ellipses, generator=generator),
    }


def manifold_experiment(config: ModelConfig, spec: DataSpec, runs_dir: str, num_ellipses: int,
                        num_points: int, seed: int) -> ManifoldResult:
    """Train ``config`` with Lightning and the monitors, then measure it and its untrained self along
    ``num_ellipses`` ellipses of each kind with ``num_points`` points each (a multiple of 6, so that the anchors
    and the every-other-point count's anchors are points of the curve)."""
    from lightning_sensitivity.callbacks import (
        GeneralizationGapMonitor,
        JacobianNormMonitor,
        TransitionMonitor,
    )

    x_train, y_train, x_val, y_val = load_tensors(spec)
    datamodule = DigitsDataModule(batch_size=config.batch_size, seed=config.seed,
                                  data=(x_train, y_train, x_val, y_val))
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = MLPClassifier(in_features=x_train[0].numel(), num_classes=int(torch.cat([y_train, y_val]).max()) + 1,
                          hidden_sizes=(config.width,) * config.depth, activation=config.activation,
                          optimizer=config.optimizer, lr=config.lr)
    untrained = copy.deepcopy(model)
    logger = TensorBoardLogger(runs_dir, name=f"reproduce-{spec.name}", version=f"f2-{config.model_id}",
                               default_hp_metric=False)
    stop = StopAtTrainAccuracy(x_train, y_train)
    monitors = [JacobianNormMonitor(every_n_epochs=5, record_epochs=None),
                GeneralizationGapMonitor(every_n_epochs=5, train_dataset=torch.utils.data.TensorDataset(x_train, y_train)),
                TransitionMonitor(every_n_epochs=5)]
    trainer, model = train([*monitors, stop], max_epochs=config.max_epochs, seed=config.seed, logger=logger,
                           datamodule=datamodule, model=model, num_sanity_val_steps=0, check_val_every_n_epoch=5)

    anchors = manifold_anchors(x_train, y_train, num_ellipses, seed)
    profiles, curves = [], []
    for name, network in (("trained", model), ("untrained", untrained)):
        for kind in KINDS:
            for index in range(num_ellipses):
                profile, curve = _measure_ellipse(network, anchors[kind][3 * index : 3 * index + 3], num_points)
                profiles.append(profile.assign(model=name, kind=kind, ellipse=index))
                curves.append({"model": name, "kind": kind, "ellipse": index, **curve})
    return ManifoldResult(pd.concat(profiles, ignore_index=True), pd.DataFrame(curves), stop.accuracy,
                          trainer.current_epoch)


def _measure_ellipse(model: nn.Module, anchors: Tensor, num_points: int) -> tuple[pd.DataFrame, dict[str, float]]:
    trajectory = ellipse_through(*anchors, num_points)
    count = count_transitions(model, trajectory, method="sampled", return_segments=True)
    t = np.arange(num_points) * 2 * math.pi / num_points
    profile = pd.DataFrame({
        "t": t,
        "u": distance_to_anchor(t),
        "u_segment": distance_to_anchor(t + math.pi / num_points),
        "jacobian_norm": jacobian_norm(model, trajectory.points).double().numpy(),
        "segment_transitions": count.segments.numpy(),
    })
    return profile, {"transitions": int(count), "transitions_half": count.transitions_half,
                     "arc_length": count.arc_length}
