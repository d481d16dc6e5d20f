"""The data sets of the reproduction, read from small files written here in their on-disk formats.

Nothing is downloaded: each test writes a few images in the format torchvision reads (MNIST's idx ubyte files in
``<root>/MNIST/raw/``, CIFAR's pickled batches in ``<root>/cifar-10-batches-py/``, ...) or a ``.npz`` file of
arrays, and loads them through ``examples.paper.data``, the code path of ``python -m examples.reproduce
--dataset ...`` and ``--data-file ...``.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.paper.data import DATA_FILE_KEYS, DataSpec, load_tensors, read_data_file

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


def write_arrays(path: Path, rng: np.random.Generator, dtype: type = np.uint8, shape: tuple[int, ...] = (3, 32, 32),
                 num_train: int = NUM_TRAIN, num_test: int = NUM_TEST, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A data file as a user writes one: images and labels of both splits, and the class names."""
    if dtype == np.uint8:
        images = {k: rng.integers(0, 256, (n, *shape)).astype(np.uint8)
                  for k, n in (("train_images", num_train), ("test_images", num_test))}
    else:
        images = {k: rng.normal(size=(n, *shape)).astype(dtype) for k, n in (("train_images", num_train),
                                                                           ("test_images", num_test))}
    arrays = {**images, "train_labels": rng.integers(0, 10, num_train), "test_labels": rng.integers(0, 10, num_test),
              "classes": np.array([f"class{i}" for i in range(10)]), **extra}
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_a_data_file_of_arrays(tmp_path: Path, dtype: type) -> None:
    arrays = write_arrays(tmp_path / "mine.npz", np.random.default_rng(5), dtype)
    x_train, y_train, x_val, y_val = load_tensors(DataSpec("mine", data_file=str(tmp_path / "mine.npz")))
    assert x_train.shape == (NUM_TRAIN, 3, 32, 32) and x_val.shape == (NUM_TEST, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.long
    scale = 255.0 if dtype == np.uint8 else 1.0  # bytes are scaled to [0, 1], floats taken as they are
    torch.testing.assert_close(x_val, torch.tensor(arrays["test_images"], dtype=torch.float32) / scale)
    assert y_train.tolist() == arrays["train_labels"].tolist() and y_val.tolist() == arrays["test_labels"].tolist()
    # subsets of a data file are seeded like those of any data set
    subset = load_tensors(DataSpec("mine", data_file=str(tmp_path / "mine.npz"), train_points=10, seed=1))
    assert subset[0].shape[0] == 10 and subset[2].shape[0] == NUM_TEST


def test_a_data_file_that_does_not_fit_says_what_is_wrong(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((4, 2, 2), np.uint8), train_labels=np.zeros(4, int))
    with pytest.raises(ValueError, match="has no array 'test_images', 'test_labels'"):
        read_data_file(tmp_path / "partial.npz")
    write_arrays(tmp_path / "short.npz", rng, test_labels=np.zeros(NUM_TEST - 1, int))
    with pytest.raises(ValueError, match="test_images holds 12 images but test_labels 11 labels"):
        read_data_file(tmp_path / "short.npz")
    write_arrays(tmp_path / "floats.npz", rng, train_labels=np.zeros(NUM_TRAIN))
    with pytest.raises(ValueError, match="train_labels must be one integer per image"):
        read_data_file(tmp_path / "floats.npz")
    write_arrays(tmp_path / "shapes.npz", rng, test_images=np.zeros((NUM_TEST, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        read_data_file(tmp_path / "shapes.npz")
    write_arrays(tmp_path / "ints.npz", rng, train_images=np.zeros((NUM_TRAIN, 3, 32, 32), np.int32))
    with pytest.raises(ValueError, match="uint8 .* or floating point"):
        read_data_file(tmp_path / "ints.npz")
    assert DATA_FILE_KEYS == ("train_images", "train_labels", "test_images", "test_labels")


def _learnable_file(path: Path) -> None:
    """A small image set a network can learn: each of 4 classes is a brighter 2 x 2 patch in its own corner of
    a noisy 3 x 8 x 8 image (uint8, as the CIFAR-10 subset's arrays are)."""
    rng = np.random.default_rng(7)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 4
        images = rng.integers(0, 100, (n, 3, 8, 8))
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 2)
            images[i, :, 6 * row : 6 * row + 2, 6 * col : 6 * col + 2] += 150
        return images.astype(np.uint8), labels

    (x_train, y_train), (x_test, y_test) = split(48), split(24)
    np.savez(path, train_images=x_train, train_labels=y_train, test_images=x_test, test_labels=y_test,
             classes=np.array(["a", "b", "c", "d"]))


@pytest.mark.slow
def test_the_reproduction_end_to_end_on_a_data_file(tmp_path: Path) -> None:
    import pandas as pd

    from examples.reproduce import main

    _learnable_file(tmp_path / "corners.npz")
    report = main(["--quick", "--data-file", str(tmp_path / "corners.npz"), "--max-epochs", "30", "--ellipses", "2",
                   "--ellipse-points", "60", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")])
    text = report.read_text()
    assert "Data: corners (`corners.npz`), 48 training and 24 held-out points." in text
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (table.dataset == "corners").all() and (table.num_train_points == 48).all()
    assert (table.num_units == table.width * table.depth).all()
    assert (tmp_path / "runs" / "reproduce-corners").is_dir()
    profiles = pd.read_csv(tmp_path / "out" / "manifold_profiles.csv")
    assert set(profiles.kind) == {"random ellipse", "different classes", "same class"}
    assert set(profiles.model) == {"trained", "first fit", "untrained"}
