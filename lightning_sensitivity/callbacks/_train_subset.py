"""The training subset of the generalization gap monitor: which training points, and how they are read without
touching training (a copy of the dataset, the global random streams restored, the training loader not iterated)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_sensitivity.callbacks._generator import _new_generator


def _read_train_subset(
    trainer: pl.Trainer,
    train_dataset: Dataset | None,
    batch_size: int | None,
    size: int,
    watch: int,
    seed: int,
    indices: Tensor | None,
    batch_len: Callable[[Any], int],
) -> tuple[Tensor, list[Any], list[Any]]:
    """The subset of ``size`` points (``indices``, unless ``None``: then drawn with a generator seeded with
    ``seed``) and this rank's share of it, as CPU batches of ``batch_size`` points: those of the watch set (the first
    ``watch`` points of the subset), then the others.

    The points come from ``train_dataset``, or else the training dataloader's dataset, and are collated with that
    loader's ``collate_fn``. For an ``IterableDataset`` the subset is the first whole batches it yields, until they
    hold ``size`` points, and the indices are their positions in the stream; its watch set is the first whole
    batches that hold ``watch`` points. ``batch_len(batch)`` is the number of points in a batch.
    """
    loader = trainer.train_dataloader if isinstance(trainer.train_dataloader, DataLoader) else None
    dataset = train_dataset if train_dataset is not None else loader.dataset
    collate = loader.collate_fn if loader is not None else default_collate
    # Without gradients a pass holds one layer's activations at a time, not every layer's and their gradients as
    # a training step does: four training batches at once fit where one trains, and take fewer, fuller passes.
    train_batch = loader.batch_size if loader is not None else None
    eval_batch = batch_size or (4 * train_batch if train_batch else 256)
    with isolate_rng():
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        source = _detached_copy(dataset)
        rank, world = trainer.global_rank, trainer.world_size
        if isinstance(dataset, IterableDataset):
            # Whole batches until `size` points: batches of the training loader's size overshoot it least.
            batches = _first_batches(source, size, batch_size or train_batch or 256, collate, batch_len)
            indices = torch.arange(sum(batch_len(b) for b in batches))
            sizes = torch.tensor([batch_len(b) for b in batches]).cumsum(0)
            num_watch = int((sizes < watch).sum()) + 1 if watch else 0
            return indices, batches[:num_watch][rank::world], batches[num_watch:][rank::world]
        if indices is None:
            order = torch.randperm(len(dataset), generator=_new_generator(seed))
            indices = order[: min(size, len(dataset))]
        # This rank's share of the first `watch` points is the start of its share of the subset: positions
        # `rank, rank + world, ...` below `watch`.
        share = indices[rank::world].tolist()
        num_watch = len(indices[:watch][rank::world])

        def batched(points: list[int]) -> list[Any]:
            return [
                collate([source[i] for i in points[start : start + eval_batch]])
                for start in range(0, len(points), eval_batch)
            ]

        return indices, batched(share[:num_watch]), batched(share[num_watch:])


def _first_batches(
    dataset: IterableDataset, size: int, batch_size: int, collate: Callable, batch_len: Callable[[Any], int]
) -> list[Any]:
    """The first batches an iterable dataset yields, until they hold at least ``size`` points."""
    batches, count = [], 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batches.append(batch)
        count += batch_len(batch)
        if count >= size:
            break
    return batches


def _detached_copy(dataset: Any) -> Any:
    """A deep copy of ``dataset`` to read from, so that reading leaves the original's internal state (an
    augmentation generator, say) as training left it; the original when it cannot be copied, with a warning."""
    try:
        return copy.deepcopy(dataset)
    except Exception as error:  # whatever stops the copy (an open file, a lock), the fallback is said aloud
        rank_zero_warn(
            f"GeneralizationGapMonitor: could not copy the training dataset ({type(error).__name__}: {error}); it "
            "reads the training subset from the dataset itself, which advances any random state the dataset owns."
        )
        return dataset
