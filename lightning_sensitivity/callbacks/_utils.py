"""Private helpers shared by the monitors: reading inputs and labels out of batches, the positions of evaluation
points, logging histograms and images, warning once, and the monitors' own generator."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler

GetInput = Callable[[Any], Tensor]
ForwardFn = Callable[["pl.LightningModule", Tensor], Tensor]


def _default_forward(pl_module: pl.LightningModule, x: Tensor) -> Tensor:
    return pl_module(x)


def _batch_input(batch: Any, input_key: str | int | None = None, get_input: GetInput | None = None) -> Tensor:
    """The model input held by a batch: a tensor, the first item of an ``(x, y, ...)`` tuple/list, or
    ``batch[input_key]`` of a dict; ``get_input(batch)`` overrides all of these."""
    if get_input is not None:
        x = get_input(batch)
    elif isinstance(batch, Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        key = "x" if input_key is None else input_key
        if key not in batch:
            raise KeyError(
                f"The batch is a dict with keys {sorted(map(str, batch))}, and has no input key {key!r}. "
                "Pass `input_key=` (or `get_input=`) to the monitor."
            )
        x = batch[key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        x = batch[0 if input_key is None else input_key]
    else:
        raise TypeError(
            f"Cannot find the model input in a batch of type {type(batch).__name__}. Pass "
            "`get_input=lambda batch: ...` to the monitor."
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"The model input taken from the batch is a {type(x).__name__}, not a tensor.")
    return x


def _batch_target(
    batch: Any, target_key: str | int | None = None, get_target: GetInput | None = None
) -> Tensor:
    """The labels held by a batch: the second item of an ``(x, y, ...)`` tuple/list, or ``batch[target_key]``."""
    if get_target is not None:
        return get_target(batch)
    if isinstance(batch, Mapping):
        key = "y" if target_key is None else target_key
        if key not in batch:
            raise KeyError(
                f"The batch is a dict with keys {sorted(map(str, batch))}, and has no target key {key!r}. "
                "Pass `target_key=` (or `get_target=`) to the monitor."
            )
        return batch[key]
    if isinstance(batch, Sequence) and len(batch) > 1:
        return batch[1 if target_key is None else target_key]
    raise TypeError(
        f"Cannot find the labels in a batch of type {type(batch).__name__}. Pass "
        "`get_target=lambda batch: ...` to the monitor."
    )


def _evaluation_dataloader(trainer: pl.Trainer, idx: int) -> Any:
    """The evaluation dataloader of index ``idx`` that the current validation, test or predict loop runs."""
    if trainer.predicting:
        loaders = trainer.predict_dataloaders
    else:
        loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        return loaders[idx]
    if isinstance(loaders, dict):
        return list(loaders.values())[idx]
    return loaders


def _evaluation_points(
    dataloader: Any, local_start: int, batch_size: int, device: torch.device, max_points: int | None = None
) -> tuple[Tensor, Tensor]:
    """The positions, in the unsharded evaluation order, of the points ``local_start .. +batch_size`` of this
    rank, and which of them to measure: exactly the points one process would measure.

    Under DDP Lightning gives evaluation loaders a ``DistributedSampler`` (no shuffling) that hands rank ``r``
    of ``W`` the positions ``r, r + W, r + 2W, ...`` of a list padded to a multiple of ``W`` by repeating its
    first entries. Positions at or past the dataset's length are those padding repeats, and are left out; so are
    positions at or past ``max_points``.
    """
    positions = torch.arange(local_start, local_start + batch_size, device=device)
    sampler = getattr(dataloader, "sampler", None)
    distributed = isinstance(sampler, DistributedSampler)
    if distributed and not sampler.shuffle:
        positions = sampler.rank + sampler.num_replicas * positions
    limits = [
        v
        for v in (max_points, _dataset_length(dataloader, sampler if distributed else None))
        if v is not None
    ]
    keep = positions < min(limits) if limits else torch.ones_like(positions, dtype=torch.bool)
    return positions, keep


class _PointCounter:
    """The points of each evaluation dataloader that this rank has seen in the current pass, and from that count
    the positions of a batch's points in the unsharded evaluation order (:func:`_evaluation_points`)."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def reset(self) -> None:
        self._seen.clear()

    def next_batch(
        self, trainer: pl.Trainer, idx: int, batch_size: int, device: torch.device, max_points: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The positions of the next ``batch_size`` points of dataloader ``idx``, and which of them to measure."""
        start = self._seen.get(idx, 0)
        self._seen[idx] = start + batch_size
        return _evaluation_points(_evaluation_dataloader(trainer, idx), start, batch_size, device, max_points)


def _dataset_length(dataloader: Any, sampler: DistributedSampler | None) -> int | None:
    """Points in the (unsharded) evaluation set, or ``None`` when it has no length."""
    dataset = getattr(sampler, "dataset", None) if sampler is not None else None
    dataset = dataset if dataset is not None else getattr(dataloader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


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


def _tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (empty on non-zero ranks)."""
    if trainer.global_rank != 0:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def _has_tensorboard(trainer: pl.Trainer) -> bool:
    """Whether this process writes to a TensorBoard logger (histograms and images go there only)."""
    return bool(_tensorboard_writers(trainer))


def _log_scalars(pl_module: pl.LightningModule, metrics: dict[str, Tensor | float]) -> None:
    """Log computed (already synchronized) values through ``pl_module.log``, from an epoch-end hook.

    Going through ``self.log`` puts the values into ``trainer.callback_metrics`` too, so ``EarlyStopping`` and
    ``ModelCheckpoint`` can monitor them, and every logger of the trainer receives them.
    """
    for key, value in metrics.items():
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


def _log_histogram(trainer: pl.Trainer, key: str, values: Tensor) -> None:
    """A TensorBoard histogram of ``values``; nothing for other loggers."""
    for writer in _tensorboard_writers(trainer):
        if values.numel() > 0:
            writer.add_histogram(key, values.detach().float().cpu(), global_step=_step(trainer))


def _log_image(trainer: pl.Trainer, key: str, image: np.ndarray) -> None:
    """An RGB image ``[H, W, 3]`` ``uint8`` as a TensorBoard image; nothing for other loggers."""
    for writer in _tensorboard_writers(trainer):
        writer.add_image(key, image, global_step=_step(trainer), dataformats="HWC")


class _OwnGenerator:
    """Mixin for a monitor that draws with its own ``torch.Generator`` (its ``_generator`` attribute): the
    generator's state goes into the callback's ``state_dict`` (a resumed run continues its stream), and the
    monitor pickles for ``ddp_spawn``.

    ``ddp_spawn`` pickles the callbacks for its processes. A ``torch.Generator`` pickles its state as a temporary
    tensor that ``torch.multiprocessing`` shares through a file descriptor, closed before the process starts
    ("bad value(s) in fds_to_keep"); the state travels as bytes instead.
    """

    _generator: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator_state": self._generator.get_state()}  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._generator.set_state(state_dict["generator_state"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = bytes(self._generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update(state, _generator=generator)


def _warn_once(warned: set[str], key: str, message: str) -> None:
    """``rank_zero_warn(message)`` the first time ``key`` is seen in ``warned`` (a monitor's own set)."""
    if key not in warned:
        warned.add(key)
        rank_zero_warn(message)


def _new_generator(seed: int) -> torch.Generator:
    """The package's own CPU generator: random draws never touch the global RNG streams of training."""
    return torch.Generator().manual_seed(seed)
