"""The torchvision data sets of the reproduction, read from small files written here in their on-disk formats.

Nothing is downloaded: each test writes a few images in the format torchvision reads (MNIST's idx ubyte files in
``<root>/MNIST/raw/``, CIFAR's pickled batches in ``<root>/cifar-10-batches-py/``, ...) and loads them through
``examples.paper.data``, the code path of ``python -m examples.reproduce --dataset ...``.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.paper.data import DataSpec, load_tensors

NUM_TRAIN, NUM_TEST = 25, 12  # CIFAR-10 spreads its training set over 5 files


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx ubyte file: magic (0x08 = unsigned byte, then the number of dimensions), big-endian sizes, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (NUM_TRAIN, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, NUM_TRAIN),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (NUM_TEST, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, NUM_TEST),
    }
    for name, array in arrays.items():
        _write_idx(raw / name, array)
    return arrays


def write_cifar(root: Path, num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CIFAR-10 (5 training batches) or CIFAR-100 (one ``train`` file) as the pickled dicts of the real archive:
    ``data`` rows of 3072 bytes (the red plane, then green, then blue, each 32x32 row-major) and labels."""
    if num_classes == 10:
        folder, train_files, test_file, label_key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "labels",
        )
        meta_name, meta = "batches.meta", {"label_names": [f"class{i}" for i in range(10)]}
    else:
        folder, train_files, test_file, label_key = "cifar-100-python", ["train"], "test", "fine_labels"
        meta_name, meta = (
            "meta",
            {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []},
        )
    base = root / folder
    base.mkdir(parents=True)
    per_file = NUM_TRAIN // len(train_files) if num_classes == 10 else NUM_TRAIN
    train_data, train_labels = (
        rng.integers(0, 256, (per_file * len(train_files), 3072)),
        rng.integers(0, num_classes, per_file * len(train_files)),
    )
    test_data, test_labels = rng.integers(0, 256, (NUM_TEST, 3072)), rng.integers(0, num_classes, NUM_TEST)
    batches = [
        (name, train_data[i * per_file : (i + 1) * per_file], train_labels[i * per_file : (i + 1) * per_file])
        for i, name in enumerate(train_files)
    ] + [(test_file, test_data, test_labels)]
    for name, data, labels in batches:
        entry = {"data": data.astype(np.uint8), label_key: labels.tolist(), "batch_label": name}
        if num_classes == 100:
            entry["coarse_labels"] = (labels // 5).tolist()
        (base / name).write_bytes(pickle.dumps(entry, protocol=2))
    (base / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return {
        "train_data": train_data,
        "train_labels": train_labels,
        "test_data": test_data,
        "test_labels": test_labels,
    }


@pytest.fixture
def files_not_checksummed(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR files against the real archive's MD5 sums, which tiny files cannot match: only
    that check is replaced (by the file's existence); the files are still read by torchvision itself."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_formats(tmp_path: Path, name: str, folder: str) -> None:
    arrays = write_mnist(tmp_path, folder, np.random.default_rng(0))
    x_train, y_train, x_val, y_val = load_tensors(DataSpec(name, str(tmp_path)))
    assert x_train.shape == (NUM_TRAIN, 1, 28, 28) and x_val.shape == (NUM_TEST, 1, 28, 28)
    assert x_train.dtype == torch.float32 and 0 <= x_train.min() and x_train.max() <= 1
    expected = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32).unsqueeze(1) / 255
    torch.testing.assert_close(x_train, expected)
    assert y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert y_val.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


@pytest.mark.usefixtures("files_not_checksummed")
@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_formats(tmp_path: Path, name: str, num_classes: int) -> None:
    arrays = write_cifar(tmp_path, num_classes, np.random.default_rng(1))
    x_train, y_train, x_val, y_val = load_tensors(DataSpec(name, str(tmp_path)))
    assert x_train.shape == (NUM_TRAIN, 3, 32, 32) and x_val.shape == (NUM_TEST, 3, 32, 32)
    # The channel planes of the file's rows must come out as the channels of the image.
    expected = torch.tensor(arrays["test_data"], dtype=torch.float32).reshape(NUM_TEST, 3, 32, 32) / 255
    torch.testing.assert_close(x_val, expected)
    assert y_train.tolist() == arrays["train_labels"].tolist()
    assert y_val.tolist() == arrays["test_labels"].tolist()


def test_subsets_are_seeded(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", np.random.default_rng(2))
    spec = DataSpec("mnist", str(tmp_path), train_points=10, val_points=5, seed=3)
    first, again = load_tensors(spec), load_tensors(DataSpec(**{**spec.__dict__}))
    assert first[0].shape[0] == 10 and first[2].shape[0] == 5
    full = load_tensors(DataSpec("mnist", str(tmp_path)))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], full[0][:10])  # a random subset, not the first points


def test_missing_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not found"):
        load_tensors(DataSpec("mnist", str(tmp_path)))
    with pytest.raises(ValueError, match="Unknown data set 'svhn'"):
        load_tensors(DataSpec("svhn", str(tmp_path)))


def test_a_model_trains_on_mnist_files(tmp_path: Path) -> None:
    """The whole per-model path (data module, 784-input model, monitors, measurement) on the MNIST files."""
    from examples.paper.grid import ModelConfig
    from examples.paper.runner import train_and_measure

    write_mnist(tmp_path / "data", "MNIST", np.random.default_rng(4))
    config = ModelConfig(16, 1, "relu", "sgd", 0.05, None, "noise", 0.25, seed=0, max_epochs=2)
    row = train_and_measure(
        config, DataSpec("mnist", str(tmp_path / "data")), str(tmp_path / "runs"), str(tmp_path / "points")
    )
    assert row["dataset"] == "mnist" and row["num_train_points"] == NUM_TRAIN and row["full_batch"]
    assert row["batch_size"] == NUM_TRAIN and row["epochs_trained"] <= 2
    assert row["jacobian_norm"] > 0
    assert (tmp_path / "points" / f"{config.model_id}.csv").exists()
