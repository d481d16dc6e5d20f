"""Logging: how what a monitor measures reaches the trainer's loggers, at which step, and what it says once.

Scalars go through ``pl_module.log`` at an epoch end, so every logger of the trainer receives them and
``EarlyStopping`` or ``ModelCheckpoint`` can watch them; after training, when Lightning takes no ``self.log``, they
go to the loggers directly (:func:`_log_scalars`). Histograms, images and the per-point records (CSV files) go to every
logger, each through its own API: a writer per kind of logger (:class:`_MediaWriter`), listed in ``_MEDIA_WRITERS``
(TensorBoard, Weights & Biases, MLflow); any other logger that keeps a directory (``CSVLogger``, ...) gets them as PNG
and CSV files under it (:class:`_FileWriter`). Every value is logged at :func:`_step`.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor

from lightning_sensitivity.callbacks._chart import _histogram_chart


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
        # The values are already the same on every rank; under DDP "syncing" them with `max` keeps them exact and
        # tells Lightning so (it warns about epoch-level values logged without `sync_dist`). On one process there is
        # nothing to sync, and asking for it doubles the time of each `self.log` call.
        sync = trainer.world_size > 1
        for key, value in scalars.items():
            pl_module.log(
                key,
                value,
                on_step=False,
                on_epoch=True,
                sync_dist=sync,
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
    """How histograms, images and per-point records reach one logger, through that logger's own API."""

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        """A histogram of ``values`` (a float CPU tensor with at least one value)."""

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB image ``[H, W, 3]`` ``uint8``."""

    def records(self, name: str, path: str, step: int) -> None:
        """The per-point records ``name``, a CSV file the monitor wrote at ``path``."""


class _TensorBoardWriter:
    """Histograms and images through a TensorBoard logger's ``SummaryWriter``; the records stay the CSV files beside
    the run (TensorBoard shows no files)."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.experiment = logger.experiment

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        self.experiment.add_histogram(key, values, global_step=step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.experiment.add_image(key, image, global_step=step, dataformats="HWC")

    def records(self, name: str, path: str, step: int) -> None:
        pass


class _WandbWriter:
    """A ``wandb.Histogram``, a ``wandb.Image`` and a ``wandb.Table`` of the records, logged with the step that
    ``WandbLogger`` gives its scalars (``trainer/global_step``)."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        import wandb

        self.logger.log_metrics({key: wandb.Histogram(values.numpy())}, step=step)  # type: ignore[dict-item]

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.logger.log_image(key, [image], step=step)

    def records(self, name: str, path: str, step: int) -> None:
        columns, rows = _read_records(path)
        self.logger.log_table(f"{_RECORDS}/{name}", columns=columns, data=rows, step=step)


class _MLflowWriter:
    """The image and a picture of the histogram as PNG artifacts (``{key}/step={step}.png``), and the records as CSV
    artifacts (``jacobian_norm_records/``), in the logger's run."""

    def __init__(self, logger: MLFlowLogger) -> None:
        self.client, self.run_id = logger.experiment, logger.run_id

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        self.image(key, _histogram_chart(values, f"{key}, step {step}"), step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{key}/step={step:06d}.png")

    def records(self, name: str, path: str, step: int) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path=_RECORDS)


class _FileWriter:
    """For a logger with no API for them (``CSVLogger``, any other that keeps a directory): PNG files of the images
    and of pictures of the histograms, ``{directory}/{key}/step={step}.png``, and the records' CSV files in
    ``{directory}/jacobian_norm_records/``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def histogram(self, key: str, values: Tensor, step: int) -> None:
        self.image(key, _histogram_chart(values, f"{key}, step {step}"), step)

    def image(self, key: str, image: np.ndarray, step: int) -> None:
        path = os.path.join(self.directory, *key.split("/"), f"step={step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)

    def records(self, name: str, path: str, step: int) -> None:
        target = os.path.join(self.directory, _RECORDS, os.path.basename(path))
        if os.path.abspath(target) != os.path.abspath(path):  # the trainer's log directory may be this logger's
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)


#: The loggers that take histograms, images and records through their own API, each with the writer that speaks it.
#: Any other logger with a directory gets files (:class:`_FileWriter`).
_MEDIA_WRITERS: dict[type[Logger], Callable[[Any], _MediaWriter]] = {
    TensorBoardLogger: _TensorBoardWriter,
    WandbLogger: _WandbWriter,
    MLFlowLogger: _MLflowWriter,
}
#: The folder of the per-point records, in every logger.
_RECORDS = "jacobian_norm_records"


def _logger_directory(logger: Logger) -> str | None:
    """The directory a logger keeps its files in (its ``log_dir``, else its ``save_dir``), or ``None``."""
    return getattr(logger, "log_dir", None) or logger.save_dir


def _media_writers(trainer: pl.Trainer) -> list[_MediaWriter]:
    """A writer for each logger of the trainer (none on non-zero ranks): the one of ``_MEDIA_WRITERS`` for its
    kind, else files under its directory; a logger with neither gets nothing."""
    if trainer.global_rank != 0:
        return []
    writers: list[_MediaWriter] = []
    for logger in trainer.loggers:
        kind = next((kind for kind in _MEDIA_WRITERS if isinstance(logger, kind)), None)
        if kind is not None:
            writers.append(_MEDIA_WRITERS[kind](logger))
        elif (directory := _logger_directory(logger)) is not None:
            writers.append(_FileWriter(directory))
    return writers


def _file_loggers(trainer: pl.Trainer) -> dict[str, str]:
    """The loggers that get PNG and CSV files (:class:`_FileWriter`), by class name, with their directories."""
    return {
        type(logger).__name__: directory
        for logger in trainer.loggers
        if not any(isinstance(logger, kind) for kind in _MEDIA_WRITERS)
        and (directory := _logger_directory(logger)) is not None
    }


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


def _log_records(trainer: pl.Trainer, name: str, path: str) -> None:
    """The per-point records ``name``, written at ``path``, in every logger."""
    for writer in _media_writers(trainer):
        writer.records(name, path, _step(trainer))


def _read_records(path: str) -> tuple[list[str], list[list[Any]]]:
    """The header and the rows of a records CSV file, numbers as numbers and empty cells as ``None``."""
    with open(path, newline="") as handle:
        header, *rows = csv.reader(handle)
    return header, [[_number(cell) for cell in row] for row in rows]


def _number(cell: str) -> int | float | None:
    if cell == "":
        return None
    try:
        return int(cell)
    except ValueError:
        return float(cell)


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
