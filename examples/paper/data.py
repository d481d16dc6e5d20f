"""The data of the reproduction: scikit-learn's digits (offline, the default), a torchvision data set, or the
user's own arrays in a ``.npz`` file (``--data-file``).

Every data set comes out the same way, as float images ``[N, C, H, W]`` (any shape ``[N, ...]`` for a data file)
and integer labels, split into a training and a held-out set, so that the rest of the reproduction never asks
where the data came from. The torchvision data sets use their own test split as the held-out set.

A data file (``numpy.savez``) holds the arrays ``DATA_FILE_KEYS``: ``train_images`` and ``test_images``, ``[N, ...]``
(channels first, for example ``[N, 3, 32, 32]``; the networks flatten each point), ``uint8`` (read as
``value / 255``) or floating point (taken as they are); ``train_labels`` and ``test_labels``, ``[N]`` integers from
0; optionally ``classes``, the class names. The test arrays are the held-out set.
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

#: The arrays a data file must hold (``classes``, the class names, is optional).
DATA_FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class DataSpec:
    """Which data a model trains on; small and picklable, so worker processes can load the data themselves.

    Args:
        name: one of ``DATASETS``, or the name of a data file's data set (its file name without the suffix).
        data_dir: the torchvision root folder (unused for digits and data files).
        download: let torchvision download a missing data set.
        seed: seeds the digits split and the subsets below.
        train_points: keep this many training points (a seeded subset); ``None`` keeps all.
        val_points: keep this many held-out points (a seeded subset); ``None`` keeps all.
        data_file: a ``.npz`` file of arrays (see the module docstring) to read instead of ``name``'s data set.
    """

    name: str = "digits"
    data_dir: str = "data"
    download: bool = False
    seed: int = 0
    train_points: int | None = None
    val_points: int | None = None
    data_file: str | None = None


Tensors = tuple[Tensor, Tensor, Tensor, Tensor]


@functools.lru_cache(maxsize=2)
def load_tensors(spec: DataSpec) -> Tensors:
    """``(x_train, y_train, x_val, y_val)`` for ``spec``; cached, so each process reads the files once.

    Raises:
        ValueError: for an unknown data set name, or a data file without one of ``DATA_FILE_KEYS`` or whose
            arrays do not fit together.
        RuntimeError: from torchvision, when the files are missing and ``download`` is off.
    """
    if spec.data_file is not None:
        x_train, y_train, x_val, y_val = read_data_file(spec.data_file)
    elif spec.name == "digits":
        x_train, y_train, x_val, y_val = load_digits_tensors(spec.seed)
    elif spec.name in DATASETS:
        x_train, y_train = _torchvision_split(spec, train=True)
        x_val, y_val = _torchvision_split(spec, train=False)
    else:
        raise ValueError(f"Unknown data set {spec.name!r}; choose one of {', '.join(DATASETS)}.")
    x_train, y_train = _subset(x_train, y_train, spec.train_points, spec.seed)
    x_val, y_val = _subset(x_val, y_val, spec.val_points, spec.seed + 1)
    return x_train, y_train, x_val, y_val


def read_data_file(path: str | Path) -> Tensors:
    """``(x_train, y_train, x_val, y_val)`` from a ``.npz`` file of the arrays ``DATA_FILE_KEYS``: ``uint8``
    images divided by 255, floating-point ones as they are (as ``float32``), labels as ``int64``.

    Raises:
        ValueError: if an array is missing, the labels are not integers of one dimension, or an image array
            and its labels differ in length, or the training and test images differ in shape.

    Example:
        >>> import io
        >>> buffer = io.BytesIO()
        >>> np.savez(buffer, train_images=np.full((4, 1, 2, 2), 255, np.uint8), train_labels=np.arange(4),
        ...          test_images=np.zeros((2, 1, 2, 2), np.uint8), test_labels=np.array([0, 1]))
        >>> _ = buffer.seek(0)
        >>> x_train, y_train, x_val, y_val = read_data_file(buffer)
        >>> x_train.shape, float(x_train.max()), y_val.tolist()
        (torch.Size([4, 1, 2, 2]), 1.0, [0, 1])
    """
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in DATA_FILE_KEYS if key not in arrays.files]
        if missing:
            raise ValueError(
                f"The data file {path} has no array {', '.join(map(repr, missing))}: it needs "
                f"{', '.join(DATA_FILE_KEYS)} (images [N, ...] uint8 or float, labels [N] integers)."
            )
        images = {key: _images(arrays[key], key) for key in ("train_images", "test_images")}
        labels = {key: np.asarray(arrays[key]) for key in ("train_labels", "test_labels")}
    for split in ("train", "test"):
        y = labels[f"{split}_labels"]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{split}_labels must be one integer per image, got {y.dtype} of shape {y.shape}.")
        if len(y) != len(images[f"{split}_images"]):
            raise ValueError(f"{split}_images holds {len(images[f'{split}_images'])} images but {split}_labels "
                             f"{len(y)} labels.")
    if images["train_images"].shape[1:] != images["test_images"].shape[1:]:
        raise ValueError(f"The training and test images differ in shape: {tuple(images['train_images'].shape[1:])} "
                         f"and {tuple(images['test_images'].shape[1:])}.")
    return (images["train_images"], torch.as_tensor(labels["train_labels"], dtype=torch.long),
            images["test_images"], torch.as_tensor(labels["test_labels"], dtype=torch.long))


def _images(array: np.ndarray, key: str) -> Tensor:
    if array.ndim < 2:
        raise ValueError(f"{key} must be images [N, ...], got shape {array.shape}.")
    if array.dtype == np.uint8:
        return torch.as_tensor(array, dtype=torch.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{key} must be uint8 (0 to 255) or floating point, got {array.dtype}.")
    return torch.as_tensor(array, dtype=torch.float32)


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
