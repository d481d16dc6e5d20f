"""What the integration tests share: every monitor in a small configuration, and reading logs back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Sampler, TensorDataset

from examples.digits import DigitsDataModule, MLPClassifier
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor


def all_monitors(**overrides: dict[str, Any]) -> list[Callback]:
    """One of each monitor, measuring every epoch, small enough for a few-second digits run.

    ``overrides`` maps a class name to extra keyword arguments for that monitor.
    """
    return [
        JacobianNormMonitor(max_points=101, every_n_epochs=1, **overrides.get("JacobianNormMonitor", {})),
        TransitionMonitor(
            num_trajectories=2,
            num_points=64,
            every_n_epochs=1,
            **{"log_figure": False, **overrides.get("TransitionMonitor", {})},
        ),
        GeneralizationGapMonitor(
            max_train_points=101, every_n_epochs=1, **overrides.get("GeneralizationGapMonitor", {})
        ),
    ]


class CountSteps(Callback):
    """Counts the training steps that started."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


def assert_same_training_state(plain: dict[str, Any], monitored: dict[str, Any]) -> None:
    """The states two training runs ended in are bit-identical: weights and buffers (``"model"``), optimizer state
    (``"optimizer"``), and the torch, NumPy and Python random streams (``"torch"``, ``"numpy"``, ``"python"``)."""
    assert plain["model"].keys() == monitored["model"].keys()
    for name, tensor in plain["model"].items():
        assert torch.equal(tensor, monitored["model"][name]), name
    assert plain["optimizer"].keys() == monitored["optimizer"].keys()
    for index, state in plain["optimizer"].items():
        for name, value in state.items():
            assert torch.equal(value, monitored["optimizer"][index][name]), (index, name)
    assert torch.equal(plain["torch"], monitored["torch"])
    numpy_plain, numpy_monitored = plain["numpy"], monitored["numpy"]
    assert numpy_plain[0] == numpy_monitored[0] and np.array_equal(numpy_plain[1], numpy_monitored[1])
    assert numpy_plain[2:] == numpy_monitored[2:]
    assert plain["python"] == monitored["python"]


def scalar_series(log_dir: str, prefixes: tuple[str, ...] = ("sensitivity/", "generalization/")) -> dict:
    """``{key: [(step, value), ...]}`` of every scalar under ``prefixes`` in a TensorBoard run directory."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return {
        key: [(s.step, s.value) for s in events.Scalars(key)]
        for key in events.Tags()["scalars"]
        if key.startswith(prefixes)
    }


class _EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch, drawn from ``seed + epoch``: Lightning calls ``set_epoch`` on a sampler that
    has it, so a resumed run draws the permutations of an uninterrupted one (a ``DataLoader``'s shuffling
    generator is not restored from a checkpoint)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableDigits(DigitsDataModule):
    """Digits whose training order depends only on the epoch (see ``_EpochShuffle``)."""

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.x_train, self.y_train)
        return DataLoader(data, batch_size=self.batch_size, sampler=_EpochShuffle(len(data), self.seed))


def fit_digits(
    callbacks: list[Callback], max_epochs: int, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> tuple[pl.Trainer, pl.LightningModule]:
    """``examples.digits.train`` on ``ResumableDigits``, with ``ckpt_path`` passed to ``fit``."""
    pl.seed_everything(0, workers=True, verbose=False)
    model = MLPClassifier()
    options: dict[str, Any] = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer = pl.Trainer(callbacks=callbacks, **{**options, **trainer_kwargs})
    trainer.fit(model, datamodule=ResumableDigits(), ckpt_path=ckpt_path)
    return trainer, model
