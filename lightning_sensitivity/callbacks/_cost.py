"""The expected cost of a measurement against the training it rides on: the seconds a point of the first-batch
check's own measurement, and the seconds an epoch from the first training batches, read once per fit."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import lightning.pytorch as pl
import torch

#: The share of the training time (between two scheduled measurements) above which a monitor says its expected cost.
_SAID_ABOVE = 0.1
#: Training batches timed for the estimate of an epoch, after the first one (which warms up caches and kernels).
_TIMED_BATCHES = 8


class _CostEstimate:
    """A measurement's seconds a point and training's seconds an epoch, both rough.

    The seconds a point are those of the first-batch check, which measures a few points as a measurement does
    (:meth:`checking`): they carry the fixed cost of a pass, so the estimate is high for small models. The seconds an
    epoch are the mean wall time of the training batches after the first one (data loading included), up to
    ``_TIMED_BATCHES`` of them, times the number of training batches (:meth:`epoch_seconds`). A busy machine moves
    both.
    """

    def __init__(self) -> None:
        self.seconds_per_point: float | None = None
        self._start: float | None = None
        self._done = False

    @contextlib.contextmanager
    def checking(self, device: torch.device, points: int) -> Iterator[None]:
        """Time the first-batch check's measurement of ``points`` points."""
        _synchronize(device)
        start = time.perf_counter()
        yield
        _synchronize(device)
        self.seconds_per_point = (time.perf_counter() - start) / max(1, points)

    def fit_start(self) -> None:
        self._start, self._done = None, False

    def epoch_seconds(self, trainer: pl.Trainer, batch_idx: int) -> float | None:
        """Called at the end of each training batch: the estimated seconds an epoch, once per fit, at the end of the
        last timed batch of the first epoch (``None`` before, after, and when it cannot be told)."""
        if self._done or trainer.current_epoch > 0 or self.seconds_per_point is None:
            return None
        _synchronize(trainer.strategy.root_device)
        now = time.perf_counter()
        batches = trainer.num_training_batches
        if batch_idx == 0 or self._start is None:
            self._start = now  # timed from the end of the first batch
            return None
        if batch_idx < _TIMED_BATCHES and batch_idx + 1 < batches:
            return None
        self._done = True
        if not math.isfinite(batches):
            return None
        return (now - self._start) / batch_idx * batches


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
