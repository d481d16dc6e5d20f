"""The data of the reproduction: scikit-learn's digits (offline, the default) or a torchvision data set.

Every data set comes out the same way, as float images ``[N, C, H, W]`` in [0, 1] and integer labels, split
into a training and a held-out set, so that the rest of the reproduction never asks where the data came from.
The torchvision data sets use their own test split as the held-out set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from examples.digits import load_digits_tensors

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class DataSpec:
    """Which data a model trains on; small and picklable, so worker processes can load the data themselves.

    Args:
        name: one of ``DATASETS``.
        data_dir: the torchvision root folder (unused for digits).
        download: let torchvision download a missing data set.
        seed: seeds the digits split and the subsets below.
        train_points: keep this many training points (a seeded subset); ``None`` keeps all.
        val_points: keep this many held-out points (a seeded subset); ``None`` keeps all.
    """

    name: str = "digits"
    data_dir: str = "data"
    download: bool = False
    seed: int = 0
    train_points: int | None = None
    val_points: int | None = None


Tensors = tuple[Tensor, Tensor, Tensor, Tensor]


@functools.lru_cache(maxsize=2)
def load_tensors(spec: DataSpec) -> Tensors:
    """``(x_train, y_train, x_val, y_val)`` for ``spec``; cached, so each process reads the files once.

    Raises:
        ValueError: for an unknown data set name.
        RuntimeError: from torchvision, when the files are missing and ``download`` is off.
    """
    if spec.name == "digits":
        x_train, y_train, x_val, y_val = load_digits_tensors(spec.seed)
    elif spec.name in DATASETS:
        x_train, y_train = _torchvision_split(spec, train=True)
        x_val, y_val = _torchvision_split(spec, train=False)
    else:
        raise ValueError(f"Unknown data set {spec.name!r}; choose one of {', '.join(DATASETS)}.")
    x_train, y_train = _subset(x_train, y_train, spec.train_points, spec.seed)
    x_val, y_val = _subset(x_val, y_val, spec.val_points, spec.seed + 1)
    return x_train, y_train, x_val, y_val


def _torchvision_split(spec: DataSpec, train: bool) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    classes = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }
    dataset = classes[spec.name](str(Path(spec.data_dir)), train=train, download=spec.download)
    # The raw arrays, not __getitem__: one conversion instead of a PIL image per point.
    images = torch.as_tensor(np.asarray(dataset.data), dtype=torch.float32) / 255.0
    if images.ndim == 3:  # MNIST-like: [N, H, W]
        images = images.unsqueeze(1)
    else:  # CIFAR: [N, H, W, C]
        images = images.permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
    return images, labels


def _subset(x: Tensor, y: Tensor, size: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if size is None or size >= len(x):
        return x, y
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[keep], y[keep]
