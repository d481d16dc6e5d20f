"""The positions of evaluation points in the unsharded evaluation order: under DDP, which points of a batch this
rank holds and which of them to measure, so that the ranks together measure exactly the points one process would."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler


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


def _dataset_length(dataloader: Any, sampler: DistributedSampler | None) -> int | None:
    """Points in the (unsharded) evaluation set, or ``None`` when it has no length."""
    dataset = getattr(sampler, "dataset", None) if sampler is not None else None
    dataset = dataset if dataset is not None else getattr(dataloader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
