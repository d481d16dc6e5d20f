"""The per-point records of the Jacobian norm monitor: which passes keep them, the labels they take from a batch,
the rows of a pass and of a predict run, the ``"last"`` records written at the end of ``fit``, and the CSV files."""

from __future__ import annotations

import csv
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sensitivity.callbacks._batch import _BatchReader, _class_labels
from lightning_sensitivity.callbacks._logging import _log_records, _warn_once
from lightning_sensitivity.metrics import PointRecords


class _Records:
    """The per-point rows (``index``, ``label``, ``prediction``, ``loss``, ``jacobian_norm``) a monitor keeps.

    A validation or test pass keeps rows per dataloader when ``record_epochs`` says so (:meth:`open`); at its end
    (:meth:`end`) they are written, or, for ``record_epochs="last"`` in ``fit``, kept until :meth:`write_last`
    writes the latest ones. A predict run keeps rows for every point, with or without labels (:meth:`add_predicted`),
    written at its end. Files go to ``{log_dir}/jacobian_norm_records/``. ``monitor`` is the owner, which warns.
    """

    def __init__(
        self, monitor: Any, record_epochs: Literal["last", "all"] | list[int] | None, reader: _BatchReader
    ) -> None:
        if not (
            record_epochs in (None, "last", "all")
            or (
                isinstance(record_epochs, (list, tuple))
                and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in record_epochs)
            )
        ):
            raise ValueError(
                f"`record_epochs` must be 'last', 'all', a list of epochs or None, got {record_epochs!r}."
            )
        self._monitor = monitor
        self.record_epochs = record_epochs
        self._reader = reader
        self._pass: dict[int, PointRecords] = {}  # the dataloaders of the current pass that keep records
        self._last: dict[int, tuple[int, dict[str, Tensor]]] = {}  # per dataloader: epoch, rows
        self._predicted: dict[int, PointRecords] = {}

    # --- a validation or test pass ----------------------------------------------------------------------------

    def begin(self) -> None:
        self._pass.clear()

    def open(self, trainer: pl.Trainer, idx: int, device: torch.device) -> None:
        """Rows for dataloader ``idx`` when this pass keeps records (every process makes them: the end gathers)."""
        if self._wanted(trainer):
            self._pass[idx] = PointRecords().to(device)

    def keeps(self, idx: int) -> bool:
        return idx in self._pass

    def labels(self, batch: Any, keep: Tensor) -> Tensor | None:
        """The labels of the ``keep`` points of a batch, as the batch holds them (``None`` when the batch holds no
        labels of one per point)."""
        y = self._reader.labels(batch)
        return y[keep] if isinstance(y, Tensor) and y.ndim >= 1 and y.shape[0] == keep.shape[0] else None

    def add(
        self, idx: int, positions: Tensor, norms: Tensor, logits: Tensor, labels: list[Tensor | None]
    ) -> None:
        """Rows of measured points, with their labels as :meth:`labels` read them (one entry per batch). Without
        class labels ``[B]`` the dataloader keeps no records for the rest of the pass, and the monitor warns."""
        y = None if any(part is None for part in labels) else torch.cat(labels)
        y = _class_labels(y, positions.shape, logits.shape[1])
        if y is None:
            del self._pass[idx]  # the batch format is the same on every process: all of them drop it
            _warn_once(
                self._monitor,
                "no-labels",
                "the batches carry no class labels of shape [B], so no per-point records are written. Pass "
                "`get_target=` (or `target_key=`) to enable them, or `record_epochs=None`.",
            )
            return
        self._pass[idx].update(positions, norms, logits, y)

    def end(self, trainer: pl.Trainer, idx: int, stage: str, multiple: bool) -> dict[str, Tensor] | None:
        """The rows the pass kept for dataloader ``idx``, as float64 CPU columns, or ``None`` when it kept fewer
        than two. They are written now, or, for ``record_epochs="last"`` in ``fit``, at :meth:`write_last`."""
        if idx not in self._pass:
            return None
        records = self._pass[idx].compute()
        if records["jacobian_norm"].numel() <= 1:
            return None
        records = {k: v.double().cpu() for k, v in records.items()}
        self._last[idx] = (trainer.current_epoch, records)
        if self.record_epochs != "last" or trainer.state.fn != "fit":
            _write_csv(trainer, _file_name(stage, trainer.current_epoch, idx, multiple), records)
        return records

    def write_last(self, trainer: pl.Trainer) -> None:
        """At the end of ``fit``, with ``record_epochs="last"``: the rows of the last pass that kept them."""
        if self.record_epochs == "last":
            multiple = len(self._last) > 1
            for idx, (epoch, records) in self._last.items():
                _write_csv(trainer, _file_name("fit", epoch, idx, multiple), records)

    def _wanted(self, trainer: pl.Trainer) -> bool:
        if self.record_epochs is None:
            return False
        if self.record_epochs in ("last", "all") or trainer.state.fn != "fit":
            return True
        return trainer.current_epoch in self.record_epochs

    # --- a predict run: every point, with or without labels ---------------------------------------------------

    def begin_predict(self, trainer: pl.Trainer, device: torch.device) -> None:
        # One set of rows per dataloader, made on every process before any batch: the end gathers them all.
        self._predicted = {idx: PointRecords().to(device) for idx in range(len(trainer.num_predict_batches))}

    def add_predicted(
        self, batch: Any, idx: int, positions: Tensor, keep: Tensor, norms: Tensor, logits: Tensor
    ) -> None:
        """Rows of the ``keep`` points of a predict batch (``norms`` and ``logits`` of those points only)."""
        y = self._reader.class_labels(batch, keep.shape, logits.shape[1])
        self._predicted[idx].update(positions[keep], norms, logits, None if y is None else y[keep])

    def write_predicted(self, trainer: pl.Trainer) -> None:
        multiple = len(self._predicted) > 1
        for idx in sorted(self._predicted):
            records = {k: v.double().cpu() for k, v in self._predicted[idx].compute().items()}
            _write_csv(trainer, "predict" + (f"_dataloader_idx={idx}" if multiple else ""), records)
        self._predicted = {}


def _file_name(stage: str, epoch: int, idx: int, multiple: bool) -> str:
    return f"{stage}_epoch={epoch}" + (f"_dataloader_idx={idx}" if multiple else "")


def _write_csv(trainer: pl.Trainer, name: str, records: dict[str, Tensor]) -> None:
    """``{log_dir}/jacobian_norm_records/{name}.csv``, one row per point (``index``, ``label``, ``prediction``,
    ``loss``, ``jacobian_norm``); a point without a label (label -1) has empty ``label`` and ``loss`` cells. Every
    logger of the trainer then gets the file its own way (:func:`_log_records`)."""
    # `trainer.log_dir` is a broadcast under DDP: every rank takes part before the others return.
    root = trainer.log_dir or trainer.default_root_dir
    if trainer.global_rank != 0:
        return
    folder = os.path.join(root, "jacobian_norm_records")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "label", "prediction", "loss", "jacobian_norm"])
        for i, label, pred, loss, norm in zip(*(records[k].tolist() for k in records), strict=True):
            known = label >= 0
            writer.writerow(
                [int(i), int(label) if known else "", int(pred), f"{loss:.6g}" if known else "", f"{norm:.6g}"]
            )
    _log_records(trainer, name, path)
