"""The per-point records of the Jacobian norm monitor: the class labels it reads from a batch for them, and the
CSV file it writes them to."""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sensitivity.callbacks._utils import GetInput, _batch_target


def _point_labels(
    batch: Any, target_key: str | int | None, get_target: GetInput | None, shape: torch.Size, num_logits: int
) -> Tensor | None:
    """The class labels ``[B]`` of a batch of ``shape`` points, or ``None`` when it carries none (records are
    optional: a batch without labels is not an error). The labels of a one-logit classifier may be ``[B, 1]`` or
    floating point, as BCE takes them."""
    return _class_labels(_batch_labels(batch, target_key, get_target), shape, num_logits)


def _batch_labels(batch: Any, target_key: str | int | None, get_target: GetInput | None) -> Any:
    """What a batch holds as its labels, as it is (``None`` when it holds none)."""
    if get_target is not None:
        return get_target(batch)  # the user's function: its errors are the user's to see
    try:
        return _batch_target(batch, target_key)
    except (KeyError, TypeError, IndexError):
        return None


def _class_labels(y: Any, shape: torch.Size, num_logits: int) -> Tensor | None:
    """Labels read by :func:`_batch_labels` as class labels ``[B]`` of ``shape`` points, or ``None``."""
    if isinstance(y, Tensor) and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if isinstance(y, Tensor) and torch.is_floating_point(y) and num_logits == 1:
        y = y.round().long()
    if not isinstance(y, Tensor) or y.shape != shape or torch.is_floating_point(y):
        return None
    return y


def _write_csv(trainer: pl.Trainer, name: str, records: dict[str, Tensor]) -> None:
    """``{log_dir}/jacobian_norm_records/{name}.csv``, one row per point (``index``, ``label``, ``prediction``,
    ``loss``, ``jacobian_norm``); a point without a label (label -1) has empty ``label`` and ``loss`` cells."""
    # `trainer.log_dir` is a broadcast under DDP: every rank takes part before the others return.
    root = trainer.log_dir or trainer.default_root_dir
    if trainer.global_rank != 0:
        return
    folder = os.path.join(root, "jacobian_norm_records")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "label", "prediction", "loss", "jacobian_norm"])
        for i, label, pred, loss, norm in zip(*(records[k].tolist() for k in records), strict=True):
            known = label >= 0
            writer.writerow(
                [int(i), int(label) if known else "", int(pred), f"{loss:.6g}" if known else "", f"{norm:.6g}"]
            )
