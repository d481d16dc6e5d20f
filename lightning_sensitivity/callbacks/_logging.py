"""Logging: how what a monitor measures reaches the trainer's loggers, at which step, and what it says once.

Scalars go through ``pl_module.log`` at an epoch end, so every logger of the trainer receives them and
``EarlyStopping`` or ``ModelCheckpoint`` can watch them; after training, when Lightning takes no ``self.log``, they
go to the loggers directly (:func:`_log_scalars`). Histograms and images go to the loggers that take them, each
through its own API: a writer per kind of logger (:class:`_MediaWriter`), listed in ``_MEDIA_WRITERS``. Only
TensorBoard has one today; another logger (W&B, MLflow, a CSV folder) is one more writer class and one more entry
there, and the monitors log to it unchanged. Every value is logged at :func:`_step`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


def _step(trainer: pl.Trainer) -> int:
    """The x-axis of every value a monitor logs: the step Lightning's own ``self.log`` gives epoch-end values,
    so that a monitor's histograms and figures line up with its scalars.

    Evaluation epochs log at the count of optimizer steps so far; training epoch ends (and the end of ``fit``)
    at one less, as Lightning's fit loop does for its epoch-end metrics.
    """
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    if trainer.validating or trainer.testing or trainer.sanity_checking:
        return step
    return max(step - 1, 0)


# --- scalars -------------------------------------------------------------------------------------------------------


def _log_scalars(
    trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, Tensor], *, after_training: bool
) -> None:
    """Log computed (already synchronized) values: through ``pl_module.log`` from an epoch-end hook, or, after
    training, straight to ``trainer.callback_metrics`` and every logger, at :func:`_step`.

    Going through ``self.log`` puts the values into ``trainer.callback_metrics`` too, so ``EarlyStopping`` and
    ``ModelCheckpoint`` can monitor them, and every logger of the trainer receives them.
    """
    if not after_training:
        for key, value in scalars.items():
            # The values are already the same on every rank; "syncing" them with `max` keeps them exact and tells
            # Lightning so (it warns about epoch-level values logged without `sync_dist` under DDP).
            pl_module.log(
                key,
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                reduce_fx="max",
                add_dataloader_idx=False,
            )
        return
    # After training Lightning takes no `self.log`: the values go to the loggers and `callback_metrics` directly.
    values = {key: value.detach().float() for key, value in scalars.items()}
    trainer.callback_metrics.update(values)
    if trainer.global_rank == 0:
        for logger in trainer.loggers:
            logger.log_metrics({k: v.item() for k, v in values.items()}, step=_step(trainer))
            logger.save()


# --- histograms and images -----------------------------------------------------------------------------------------


class _MediaWriter(Protocol):
    """How histograms and images reach one logger, through that logger's own API."""

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        """A histogram of ``values`` (a float CPU tensor with at least one value)."""

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB image ``[H, W, 3]`` ``uint8``."""


class _TensorBoardWriter:
    """Histograms and images through a TensorBoard logger's ``SummaryWriter``."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.experiment = logger.experiment

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        self.experiment.add_histogram(key, values, global_step=step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.experiment.add_image(key, image, global_step=step, dataformats="HWC")


#: The loggers that take histograms and images, each with the writer that speaks its API.
_MEDIA_WRITERS: dict[type[Logger], type[_MediaWriter]] = {TensorBoardLogger: _TensorBoardWriter}


def _media_writers(trainer: pl.Trainer) -> list[_MediaWriter]:
    """A writer for each logger of the trainer that takes histograms and images (none on non-zero ranks)."""
    if trainer.global_rank != 0:
        return []
    return [
        writer(logger)
        for logger in trainer.loggers
        for kind, writer in _MEDIA_WRITERS.items()
        if isinstance(logger, kind)
    ]


def _takes_images(trainer: pl.Trainer) -> bool:
    """Whether this process logs to a logger that takes images (a figure is drawn only then)."""
    return bool(_media_writers(trainer))


def _log_histogram(trainer: pl.Trainer, key: str, values: Tensor) -> None:
    """A histogram of ``values`` in every logger that takes one; nothing when ``values`` is empty."""
    if values.numel() == 0:
        return
    values = values.detach().float().cpu()
    for writer in _media_writers(trainer):
        writer.histogram(key, values, _step(trainer))


def _log_image(trainer: pl.Trainer, key: str, image: np.ndarray) -> None:
    """An RGB image ``[H, W, 3]`` ``uint8`` in every logger that takes one."""
    for writer in _media_writers(trainer):
        writer.image(key, image, _step(trainer))


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (empty on non-zero ranks), for what only
    TensorBoard has (the dashboard layout, the hparams summary)."""
    if trainer.global_rank != 0:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


# --- warnings and time ---------------------------------------------------------------------------------------------


def _warn_once(owner: object, key: str, message: str) -> None:
    """``rank_zero_warn("{Owner}: {message}")`` the first time ``owner`` (a monitor) warns of ``key``: a runtime
    oddity (a NaN, a batch without labels) is said once and training goes on. The keys warned of are kept on the
    owner, so each monitor warns for itself."""
    warned = vars(owner).setdefault("_warned", set())
    if key not in warned:
        warned.add(key)
        rank_zero_warn(f"{type(owner).__name__}: {message}")


class _Stopwatch:
    """The wall time of a monitor's measurement, summed over the pieces it is done in (the batches of a pass, then
    its end), read with ``time.perf_counter``. On a CUDA module each piece starts and ends with a synchronization,
    so the queued kernels are counted where they run; when the monitor logs no time, nothing is synchronized."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds = 0.0

    @contextlib.contextmanager
    def running(self, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start

    def take(self, device: torch.device) -> Tensor:
        """The time so far, as a tensor on ``device``, and a fresh start."""
        seconds, self.seconds = self.seconds, 0.0
        return torch.tensor(seconds, dtype=torch.float32, device=device)
