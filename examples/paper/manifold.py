"""F2: sensitivity on the training points, between them on the data manifold, and off the manifold.

One model of the sweep's base configuration is trained (with the monitors, logged to TensorBoard) and
compared with the same network at its initial weights. Both are measured along the same closed curves:
ellipses through three training points (on the manifold) and ellipses through three off-manifold anchors
(points drawn to match the training data's per-feature mean and standard deviation). Along each curve, the
Jacobian norm at every point and the exact number of linear-region transitions (with the sampled count on the
same points beside it, as a check); and the Jacobian norm at the
anchors themselves, which for on-manifold curves are training points.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from examples.digits import train
from examples.paper.data import DataSpec
from examples.paper.sweep import ModelConfig, StopAtTrainAccuracy, build, sensitivity_monitors
from lightning_sensitivity.functional import (
    count_transitions,
    ellipse_through,
    gaussian_anchors,
    jacobian_norm,
)

KINDS = ("on manifold", "off manifold")


@dataclass
class ManifoldResult:
    """The F2 measurements.

    Args:
        curves: one row per (model, kind, ellipse): transitions, density, arc length, mean Jacobian norm along
            the ellipse and at its anchors.
        profiles: for the first ellipse of each kind and each model, the Jacobian norm at every point of the
            curve (``model``, ``kind``, ``t``, ``jacobian_norm``) and the transitions on each segment.
        train_accuracy: the trained model's final accuracy on its training set.
    """

    curves: pd.DataFrame
    profiles: pd.DataFrame
    train_accuracy: float


def manifold_experiment(config: ModelConfig, spec: DataSpec, runs_dir: str, num_ellipses: int,
                        num_points: int, seed: int) -> ManifoldResult:
    """Train ``config``, then measure it and its untrained self along ``num_ellipses`` ellipses of each kind
    with ``num_points`` points each (a multiple of 6: the anchors are points of the curve, and the sampled
    count, kept as a check of the exact one, halves the points)."""
    datamodule, model = build(config, spec)
    untrained = copy.deepcopy(model)
    logger = TensorBoardLogger(runs_dir, name=f"reproduce-{spec.name}", version=f"f2-{config.model_id}",
                               default_hp_metric=False)
    stop = StopAtTrainAccuracy(datamodule.x_train, datamodule.y_train)
    train([*sensitivity_monitors(datamodule, True, 5), stop], max_epochs=config.max_epochs, seed=config.seed, logger=logger,
          datamodule=datamodule, model=model, num_sanity_val_steps=0, check_val_every_n_epoch=5)

    generator = torch.Generator().manual_seed(seed)
    x = datamodule.x_train
    on = x[torch.randperm(len(x), generator=generator)[: 3 * num_ellipses]]
    off = gaussian_anchors(x.mean(0), x.std(0), 3 * num_ellipses, generator=generator)
    curves, profiles = [], []
    for name, network in (("trained", model), ("untrained", untrained)):
        for kind, anchors in zip(KINDS, (on, off), strict=True):
            for index in range(num_ellipses):
                a, b, c = anchors[3 * index : 3 * index + 3]
                row, profile = _measure_ellipse(network, a, b, c, num_points)
                curves.append({"model": name, "kind": kind, "ellipse": index, **row})
                if index == 0:
                    profiles.append(profile.assign(model=name, kind=kind))
    return ManifoldResult(pd.DataFrame(curves), pd.concat(profiles, ignore_index=True), stop.accuracy)


def _measure_ellipse(model: nn.Module, a: Tensor, b: Tensor, c: Tensor, num_points: int) -> tuple[dict[str, Any], pd.DataFrame]:
    trajectory = ellipse_through(a, b, c, num_points)
    points = trajectory.points
    count = count_transitions(model, trajectory, method="exact")
    sampled = count_transitions(model, trajectory, method="sampled", return_segments=True)
    norms = jacobian_norm(model, points).double()
    anchor_norms = jacobian_norm(model, torch.stack([a, b, c])).double()
    row = {
        "transitions": int(count),
        "transitions_sampled": int(sampled),
        "transition_density": count.density,
        "jacobian_norm_along": norms.mean().item(),
        "jacobian_norm_anchors": anchor_norms.mean().item(),
    }
    profile = pd.DataFrame(
        {
            "t": np.arange(len(points)) * 2 * math.pi / len(points),
            "jacobian_norm": norms.numpy(),
            "segment_transitions": sampled.segments.numpy(),
        }
    )
    return row, profile


def manifold_means(curves: pd.DataFrame) -> pd.DataFrame:
    """The table of F2: means over the ellipses, one row per (model, kind)."""
    columns = ["jacobian_norm_anchors", "jacobian_norm_along", "transitions", "transitions_sampled", "transition_density"]
    return curves.groupby(["model", "kind"], sort=False)[columns].mean().reset_index()
