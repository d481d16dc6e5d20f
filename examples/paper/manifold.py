"""F2: sensitivity along ellipses through training points and along random ellipses, as the paper measures it.

One model of the sweep (three ReLU layers, true labels) is trained with Lightning and the package's monitors
(logged to TensorBoard) by a rule fixed in advance (``TRAINING_RULE``): to its first fit, then on until its training
loss is below ``LOSS_TARGET`` or ``EPOCHS_PAST_FIT`` epochs have passed. It is measured as trained by that rule, as
it was at its first fit, and at its initial weights (``MODELS``), along the same ellipses of three kinds (``KINDS``,
the paper's Figure 2), each through three anchors placed at ``t = 0, 2 pi / 3, 4 pi / 3``:

- ``random ellipse``: a circle around the training data's mean, of radius the training points' root-mean-square
  distance from it (the data's scale), in the plane of two random orthonormal directions; drawn again until it
  passes no closer to any training point than the clearance (the median distance from a training point to its
  nearest neighbour, ``nearest_neighbour_spacing``). Its three anchors are points of the circle, not data
  (``random_ellipse``).
- ``different classes``: three training points of three different classes.
- ``same class``: three training points of one class (the class cycles over the ellipses).

At every point of every ellipse the Jacobian norm; on every segment (point ``i`` to ``i + 1``) the linear-region
transitions crossed and the segment's length. Each point and segment is placed by its distance in ``t`` to the
nearest anchor, as a share ``u`` of the largest possible distance (``pi / 3``): ``u = 0`` at an anchor, ``u = 1`` half
way between two. The transition density of a stretch of an ellipse is its transitions over its length (per unit
arc length), so that ellipses of different lengths, and stretches travelled at different speeds, compare on one
scale. The profiles' statistics are in ``examples.paper.analysis``, F2's verdicts in ``examples.paper.verdicts``.
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
from lightning_sensitivity.functional import count_transitions, ellipse_through, jacobian_norm

#: The kinds of ellipses, as the paper's Figure 2 has them; the last two pass through training points.
KINDS = ("random ellipse", "different classes", "same class")
ON_MANIFOLD = KINDS[1:]
#: The models measured along the ellipses: F2's model as trained by its rule, at its first fit, and untrained.
MODELS = ("trained", "first fit", "untrained")

#: F2's training rule: after its first fit, the model trains on until its training cross-entropy (eval mode, the
#: whole training set) is below LOSS_TARGET, or for EPOCHS_PAST_FIT epochs, whichever comes first.
LOSS_TARGET = 1e-3
EPOCHS_PAST_FIT = 200
TRAINING_RULE = (
    f"F2's model trains until it fits its training set (its first fit), then on until its training cross-entropy "
    f"(eval mode, whole training set) is below {LOSS_TARGET:g} or {EPOCHS_PAST_FIT} further epochs have passed, "
    f"whichever comes first (or until its budget, if it never fits)"
)
#: The random ellipses' clearance is estimated from at most this many training points (seeded).
CLEARANCE_POINTS = 2000


@dataclass
class ManifoldResult:
    """The F2 measurements.

    Args:
        profiles: one row per (model, kind, ellipse, point): ``t``, ``u`` (distance to the nearest anchor, as a
            share of ``pi / 3``), the Jacobian norm at the point (and that of the logits, ``logit_jacobian_norm``),
            and the transitions on the segment that starts there and its length (``u_segment`` is the segment's
            midpoint's distance).
        curves: one row per (model, kind, ellipse): the sampled transitions on all points and on every other point
            (the convergence evidence), the arc length, and the least distance from the ellipse to a training
            point (exact for the random ellipses; 0 for the others, which pass through training points).
        train_accuracy: the trained model's final accuracy on its training set.
        epochs: the epochs it trained.
        first_fit_epoch: the epoch it first fit its training set (``None`` if it never did).
        train_loss: its final training cross-entropy (eval mode).
        first_fit_loss: its training cross-entropy at its first fit.
        clearance: the least distance the random ellipses keep from every training point.
        radius: the random ellipses' radius (the data's scale).
    """

    profiles: pd.DataFrame
    curves: pd.DataFrame
    train_accuracy: float
    epochs: int
    first_fit_epoch: int | None
    train_loss: float
    first_fit_loss: float
    clearance: float
    radius: float


class TrainingRule(pl.Callback):
    """F2's training rule (``TRAINING_RULE``), checked with one forward pass over the whole training set at the
    end of every training epoch: remembers the weights at the first epoch the model classifies every training
    point (eval mode), and stops training once, after that, the training loss is below ``loss_target`` or
    ``epochs_past_fit`` epochs have passed; a model that has not fit by ``budget`` epochs stops there.

    Args:
        x: the training inputs.
        y: the training labels.
        budget: the epochs within which the model must first fit (the sweep's ``max_epochs``).
        loss_target: the training cross-entropy that ends training after the first fit.
        epochs_past_fit: the most epochs trained after the first fit.
    """

    def __init__(self, x: Tensor, y: Tensor, budget: int, loss_target: float = LOSS_TARGET,
                 epochs_past_fit: int = EPOCHS_PAST_FIT) -> None:
        self.x, self.y, self.budget = x, y, budget
        self.loss_target, self.epochs_past_fit = loss_target, epochs_past_fit
        self.loss, self.accuracy = math.nan, math.nan
        self.first_fit_epoch: int | None = None
        self.first_fit_loss = math.nan
        self.first_fit_state: dict[str, Tensor] | None = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.loss, self.accuracy = loss_and_accuracy(pl_module, self.x, self.y)
        epoch = trainer.current_epoch + 1
        if self.first_fit_epoch is None and self.accuracy >= 1.0:
            self.first_fit_epoch, self.first_fit_loss = epoch, self.loss
            self.first_fit_state = copy.deepcopy(pl_module.state_dict())
        if self.first_fit_epoch is None:
            trainer.should_stop = epoch >= self.budget  # it never fit: its budget ends it, as in the sweep
        elif self.loss < self.loss_target or epoch - self.first_fit_epoch >= self.epochs_past_fit:
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


def nearest_neighbour_spacing(x: Tensor, max_points: int = CLEARANCE_POINTS, seed: int = 0) -> float:
    """The median distance from a training point to its nearest other training point, over at most
    ``max_points`` seeded points, among themselves (with fewer points the distances are larger, never smaller:
    a clearance from this estimate errs on the far side).

    Example:
        >>> nearest_neighbour_spacing(torch.tensor([[0.0], [1.0], [3.0], [7.0]]))
        1.5
    """
    flat = x.flatten(1).double()
    if len(flat) > max_points:
        flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:max_points]]
    nearest = torch.empty(len(flat), dtype=torch.float64)
    for start in range(0, len(flat), 512):
        block = torch.cdist(flat[start : start + 512], flat)
        rows = torch.arange(len(block))
        block[rows, rows + start] = math.inf  # not its own neighbour
        nearest[start : start + 512] = block.min(1).values
    return float(np.median(nearest.numpy()))


def distance_to_circle(x: Tensor, centre: Tensor, directions: Tensor, radius: float) -> Tensor:
    """The least distance from each point of ``x`` to the circle ``centre + radius (cos t d_0 + sin t d_1)``
    (orthonormal ``directions`` ``[2, D]``), exactly: with ``r = x - centre`` and ``p`` its projection on the
    circle's plane, ``sqrt((|p| - radius)^2 + |r - p|^2)``.

    Example:
        >>> directions = torch.eye(3, dtype=torch.float64)[:2]
        >>> distance_to_circle(torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 0, 1]]), torch.zeros(3), directions, 1.0)
        tensor([1.0000, 1.0000, 1.4142], dtype=torch.float64)
    """
    r = x.flatten(1).double() - centre.flatten().double()
    in_plane = (r @ directions.T).norm(dim=1)
    off_plane = (r.pow(2).sum(1) - in_plane.pow(2)).clamp_min(0)
    return ((in_plane - radius).pow(2) + off_plane).sqrt()


def random_ellipse(x: Tensor, clearance: float, generator: torch.Generator,
                   max_draws: int = 100) -> tuple[Tensor, float]:
    """The three anchors of a random ellipse that passes nowhere near the data, and its least distance to a point
    of ``x``.

    The ellipse is a circle around the mean of ``x``, of radius ``R = sqrt(mean_i |x_i - mean|^2)`` (the data's
    scale), in the plane of two orthonormal directions drawn from ``generator`` (a Gaussian ``[D, 2]`` matrix, QR
    factorized); the anchors are its points at ``t = 0, 2 pi / 3, 4 pi / 3``, so ``ellipse_through`` gives back the
    same circle. A circle that passes closer than ``clearance`` to some point of ``x`` (``distance_to_circle``) is
    drawn again.

    Raises:
        RuntimeError: if ``max_draws`` circles all pass closer than ``clearance`` to the data.

    Example:
        >>> x = torch.randn(200, 20)
        >>> anchors, distance = random_ellipse(x, 1.0, torch.Generator().manual_seed(0))
        >>> anchors.shape, distance >= 1.0
        (torch.Size([3, 20]), True)
    """
    flat = x.flatten(1).double()
    centre = flat.mean(0)
    radius = float((flat - centre).pow(2).sum(1).mean().sqrt())
    for _ in range(max_draws):
        gaussian = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64)
        directions = torch.linalg.qr(gaussian).Q.T
        distance = float(distance_to_circle(flat, centre, directions, radius).min())
        if distance >= clearance:
            angles = torch.arange(3, dtype=torch.float64) * (2 * math.pi / 3)
            points = centre + radius * (angles.cos()[:, None] * directions[0] + angles.sin()[:, None] * directions[1])
            return points.to(x.dtype).reshape(3, *x.shape[1:]), distance
    raise RuntimeError(f"None of {max_draws} random ellipses passed at least {clearance:.3g} from every training point.")


def manifold_anchors(x: Tensor, y: Tensor, num_ellipses: int, seed: int,
                     clearance: float) -> tuple[dict[str, Tensor], list[float]]:
    """The anchors of every kind, ``[3 * num_ellipses, ...]``, from ``torch.Generator().manual_seed(seed)``, and
    each random ellipse's least distance to a training point.

    Raises:
        ValueError: if the training labels hold fewer than 3 classes.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    if len(classes) < 3:
        raise ValueError(f"F2's ellipses through three classes need 3 classes; the training set has {len(classes)}.")
    same, different, random, distances = [], [], [], []
    for index in range(num_ellipses):
        members = torch.nonzero(y == classes[index % len(classes)]).flatten()
        same.append(x[members[torch.randperm(len(members), generator=generator)[:3]]])
        picks = []
        for c in classes[torch.randperm(len(classes), generator=generator)[:3]]:
            members = torch.nonzero(y == c).flatten()
            picks.append(members[torch.randint(len(members), (1,), generator=generator)])
        different.append(x[torch.cat(picks)])
        anchors, distance = random_ellipse(x, clearance, generator)
        random.append(anchors)
        distances.append(distance)
    kinds = {"random ellipse": torch.cat(random), "different classes": torch.cat(different),
             "same class": torch.cat(same)}
    return kinds, distances


def manifold_experiment(config: ModelConfig, spec: DataSpec, runs_dir: str, num_ellipses: int,
                        num_points: int, seed: int) -> ManifoldResult:
    """Train ``config`` with Lightning and the monitors by F2's rule, then measure it, its first-fit weights and
    its untrained self along ``num_ellipses`` ellipses of each kind with ``num_points`` points each (a multiple of
    6, so that the anchors and the every-other-point count's anchors are points of the curve)."""
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
    rule = TrainingRule(x_train, y_train, config.max_epochs)
    monitors = [JacobianNormMonitor(every_n_epochs=5, record_epochs=None),
                GeneralizationGapMonitor(every_n_epochs=5, train_dataset=torch.utils.data.TensorDataset(x_train, y_train)),
                TransitionMonitor(every_n_epochs=5)]
    trainer, model = train([*monitors, rule], max_epochs=config.max_epochs + EPOCHS_PAST_FIT, seed=config.seed,
                           logger=logger, datamodule=datamodule, model=model, num_sanity_val_steps=0,
                           check_val_every_n_epoch=5)
    first_fit = copy.deepcopy(untrained)
    first_fit.load_state_dict(rule.first_fit_state if rule.first_fit_state is not None else model.state_dict())

    clearance = nearest_neighbour_spacing(x_train, seed=seed)
    anchors, distances = manifold_anchors(x_train, y_train, num_ellipses, seed, clearance)
    flat = x_train.flatten(1).double()
    radius = float((flat - flat.mean(0)).pow(2).sum(1).mean().sqrt())
    networks = {"trained": model, "first fit": first_fit, "untrained": untrained}
    profiles, curves = [], []
    for name in MODELS:
        for kind in KINDS:
            for index in range(num_ellipses):
                profile, curve = measure_ellipse(networks[name], anchors[kind][3 * index : 3 * index + 3], num_points)
                profiles.append(profile.assign(model=name, kind=kind, ellipse=index))
                distance = distances[index] if kind == "random ellipse" else 0.0
                curves.append({"model": name, "kind": kind, "ellipse": index, **curve, "min_distance": distance})
    return ManifoldResult(pd.concat(profiles, ignore_index=True), pd.DataFrame(curves), rule.accuracy,
                          trainer.current_epoch, rule.first_fit_epoch, rule.loss, rule.first_fit_loss, clearance,
                          radius)


def measure_ellipse(model: nn.Module, anchors: Tensor, num_points: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """Along the ellipse through the three ``anchors`` at ``num_points`` points: one row per point (``t``, ``u``,
    ``u_segment``, the Jacobian norm of the softmax and that of the logits, and the transitions on the segment from
    the point to the next and that segment's length), and the curve's totals (transitions on all points and on
    every other point, arc length)."""
    trajectory = ellipse_through(*anchors, num_points)
    count = count_transitions(model, trajectory, method="sampled", return_segments=True)
    t = np.arange(num_points) * 2 * math.pi / num_points
    points = trajectory.at(trajectory.times, dtype=torch.float64).flatten(1)
    lengths = (points.roll(-1, dims=0) - points).norm(dim=1)
    profile = pd.DataFrame({
        "t": t,
        "u": distance_to_anchor(t),
        "u_segment": distance_to_anchor(t + math.pi / num_points),
        "jacobian_norm": jacobian_norm(model, trajectory.points).double().numpy(),
        "logit_jacobian_norm": jacobian_norm(model, trajectory.points, output="logits").double().numpy(),
        "segment_transitions": count.segments.numpy(),
        "segment_length": lengths.numpy(),
    })
    return profile, {"transitions": int(count), "transitions_half": count.transitions_half,
                     "arc_length": count.arc_length}
