r"""
Jacobian Norm Monitor
=====================

Measures the input-output Jacobian norm of a classifier on validation points (Novak et al., ICLR 2018) and
logs it while the model trains.

"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lightning_sensitivity.callbacks._dashboard import _register_dashboard
from lightning_sensitivity.callbacks._utils import (
    ForwardFn,
    GetInput,
    _batch_input,
    _batch_target,
    _default_forward,
    _evaluation_dataloader,
    _evaluation_points,
    _log_histogram,
    _log_scalars,
    _new_generator,
    _should_measure,
    _SpawnSafeGenerator,
    _warn_once,
)
from lightning_sensitivity.functional import jacobian_norm
from lightning_sensitivity.functional._utils import _check_continuous, _check_logits, _eval_mode
from lightning_sensitivity.metrics.jacobian import JacobianNorm

_FORWARD_HINT = (
    " The monitor measures `pl_module(x)`; if the module returns something else (a dict, a loss, several "
    "heads), pass `forward_fn=lambda module, x: <logits [B, C]>`."
)


class _Records:
    """Per-point rows (position, label, prediction, loss, Jacobian norm) of one evaluation epoch."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Tensor]] = {
            k: [] for k in ("index", "label", "prediction", "loss", "norm")
        }

    def add(self, **values: Tensor) -> None:
        for key, value in values.items():
            self.columns[key].append(value.detach())

    def gathered(self, device: torch.device) -> dict[str, Tensor]:
        """Every process's rows (a collective under DDP; ranks may hold different numbers), sorted by position."""
        columns = {
            k: (dim_zero_cat(v) if v else torch.zeros(0)).double().to(device) for k, v in self.columns.items()
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            columns = {k: torch.cat(gather_all_tensors(v)) for k, v in columns.items()}
        order = columns["index"].argsort()
        return {k: v[order].cpu() for k, v in columns.items()}


class JacobianNormMonitor(_SpawnSafeGenerator, Callback):
    r"""Logs the Jacobian norm of the classifier on validation points, while it trains.

    For every measured point :math:`x` with logits :math:`z = f(x)`, the sensitivity is
    :math:`s(x) = \lVert \partial\, \mathrm{softmax}(z) / \partial x^\top \rVert_F`
    (see :func:`~lightning_sensitivity.functional.jacobian_norm`). The monitor measures the first
    ``max_points`` points of each validation dataloader, every ``every_n_epochs`` epochs of ``fit`` (and the
    last one; never the sanity check), and on every ``trainer.validate`` and ``trainer.test`` run. The model
    is evaluated in eval mode and restored to its previous mode; weights, gradients, optimizer state and the
    global random streams are untouched, so training is the same with or without the monitor.

    **Logged Metrics**

    - ``{prefix}/jacobian_norm``: the mean of :math:`s(x)` over the measured points (scalar).
    - ``{prefix}/jacobian_norm_per_point``: a TensorBoard histogram of the per-point values. (Not under the
      scalar's own name: TensorBoard keeps one kind of data per tag, and a histogram there hides the scalar.)
    - ``{prefix}/jacobian_loss_spearman``: when the batches carry labels and records are kept (every measured
      epoch with ``record_epochs="last"`` or ``"all"``, the listed epochs otherwise), the Spearman correlation
      between the per-point Jacobian norm and the per-point cross-entropy loss (finding F4).
    - With several validation dataloaders, each key gets Lightning's suffix ``/dataloader_idx_{i}``.

    On record epochs (``record_epochs``), a CSV file with one row per measured point (``index``: the point's
    position in the validation dataloader's order, ``label``, ``prediction``, ``loss``, ``jacobian_norm``) is
    written to ``{log_dir}/jacobian_norm_records/{stage}_epoch={epoch}[_dataloader_idx={i}].csv``.

    **Cost.** Per measured point, one forward pass and :math:`C` vector-Jacobian products (``method="exact"``),
    or ``num_projections`` products (``method="projection"``), see
    :func:`~lightning_sensitivity.functional.jacobian_norm`.

    Args:
        max_points: points measured per validation dataloader and epoch (the first ones in the loader's order;
            under DDP, the same points as on one device). ``None`` measures all.
        every_n_epochs: measure after every n-th training epoch (and after the last).
        output: ``"softmax"`` (the paper's) or ``"logits"``.
        method: ``"exact"`` or ``"projection"``.
        num_projections: directions per point for ``method="projection"``.
        chunk_size: points per Jacobian computation (bounds memory; see ``jacobian_norm``).
        input_key: where the input is in a batch: a dict key (default ``"x"``) or a tuple index (default 0).
        target_key: where the labels are (default ``"y"`` or index 1); only used for the per-point records.
        get_input: ``get_input(batch) -> Tensor``, overrides ``input_key``.
        get_target: ``get_target(batch) -> Tensor``, overrides ``target_key``.
        forward_fn: ``forward_fn(pl_module, x) -> logits [B, C]``; default ``pl_module(x)``. Use it to measure
            at the embeddings of a text model, or to pick the logits out of a richer output.
        prefix: the first part of every logged key.
        log_histogram: also log the per-point values as a TensorBoard histogram.
        record_epochs: when to write the per-point CSV and the Spearman correlation: ``"last"`` (the last
            measured epoch of ``fit``, and every ``validate``/``test`` run), a list of epoch indices (as
            ``trainer.current_epoch`` counts them, from 0), ``"all"``, or ``None`` for never.
        seed: seeds the monitor's own generator (used by ``method="projection"``).

    Raises:
        ValueError: in ``setup``, if an argument is out of range; at the first validation batch (the sanity
            check, when there is one), if the model's output is not ``[B, C]``.
        TypeError: at the first validation batch, if the input is not floating point (token ids: measure at the
            embeddings with ``forward_fn``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_sensitivity import JacobianNormMonitor
        >>> trainer = Trainer(callbacks=[JacobianNormMonitor(max_points=256)], max_epochs=3)
    """

    def __init__(
        self,
        max_points: int | None = 256,
        every_n_epochs: int = 5,
        output: Literal["softmax", "logits"] = "softmax",
        method: Literal["exact", "projection"] = "exact",
        num_projections: int | None = None,
        chunk_size: int | None = None,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        get_input: GetInput | None = None,
        get_target: GetInput | None = None,
        forward_fn: ForwardFn | None = None,
        prefix: str = "sensitivity",
        log_histogram: bool = True,
        record_epochs: Literal["last", "all"] | list[int] | None = "last",
        seed: int = 0,
    ) -> None:
        self.max_points = max_points
        self.every_n_epochs = every_n_epochs
        self.output = output
        self.method = method
        self.num_projections = num_projections
        self.chunk_size = chunk_size
        self.input_key, self.target_key = input_key, target_key
        self.get_input, self.get_target = get_input, get_target
        self.forward_fn = forward_fn or _default_forward
        self.prefix = prefix
        self.log_histogram = log_histogram
        self.record_epochs = record_epochs
        self.seed = seed
        self._generator = _new_generator(seed)
        # Lightning reads `state_key` around every hook call: build it once.
        self._state_key = self._generate_state_key(prefix=prefix, output=output, method=method)
        self._metrics: dict[int, JacobianNorm] = {}  # the dataloaders of the current epoch
        self._metric_pool: dict[int, JacobianNorm] = {}  # reused from epoch to epoch
        self._records: dict[int, _Records] = {}
        self._seen: dict[int, int] = {}
        self._last_records: dict[int, tuple[int, dict[str, Tensor]]] = {}
        self._checked = False
        self._measured_in_fit = False
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.max_points is not None and self.max_points < 1:
            raise ValueError(f"`max_points` must be a positive integer or None, got {self.max_points}.")
        if self.every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {self.every_n_epochs}.")
        if self.output not in ("softmax", "logits"):
            raise ValueError(f"`output` must be 'softmax' or 'logits', got {self.output!r}.")
        if self.method not in ("exact", "projection"):
            raise ValueError(f"`method` must be 'exact' or 'projection', got {self.method!r}.")
        if not (self.record_epochs in (None, "last", "all") or isinstance(self.record_epochs, Sequence)):
            raise ValueError(
                f"`record_epochs` must be 'last', 'all', a list of epochs or None, got {self.record_epochs!r}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _register_dashboard(trainer, sensitivity_prefix=self.prefix)

    # --- the measurement, batch by batch -------------------------------------------------------------------

    def _on_epoch_start(self, trainer: pl.Trainer) -> None:
        self._metrics.clear()
        self._records.clear()
        self._seen.clear()

    def _on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if not self._checked:
            self._check_configuration(pl_module, batch)
        if not _should_measure(trainer, self.every_n_epochs):
            return
        x = _batch_input(batch, self.input_key, self.get_input)
        start = self._seen.get(idx, 0)
        self._seen[idx] = start + x.shape[0]
        loader = _evaluation_dataloader(trainer, idx)
        positions, keep = _evaluation_points(loader, start, x.shape[0], x.device, self.max_points)
        # Every rank creates the same states, even with no point to measure: the epoch end gathers them.
        if idx not in self._metrics:  # the first batch of this dataloader in this epoch
            metric = self._metric_pool.get(idx) or JacobianNorm()
            metric = self._metric_pool[idx] = metric.to(pl_module.device)
            metric.reset()
            self._metrics[idx] = metric
        records_wanted = self._records_wanted(trainer)
        if records_wanted:
            self._records.setdefault(idx, _Records())
        if not keep.any():
            self._metrics[idx].update(torch.zeros(0, device=pl_module.device))
            return
        x = x[keep]
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        model = functools.partial(self.forward_fn, pl_module)
        norms = torch.full((x.shape[0],), float("nan"), device=x.device)
        logits: Tensor | None = None
        with _eval_mode(pl_module):
            if finite.any():
                values, finite_logits = jacobian_norm(
                    model,
                    x[finite],
                    output=self.output,
                    method=self.method,
                    num_projections=self.num_projections,
                    chunk_size=self.chunk_size,
                    generator=self._generator,
                    return_logits=True,
                )
                norms[finite] = values.to(norms.dtype)
                logits = finite_logits.new_full((x.shape[0], finite_logits.shape[1]), float("nan"))
                logits[finite] = finite_logits
            if records_wanted:
                if logits is None:
                    with torch.no_grad():
                        logits = model(x)
                self._add_records(batch, idx, keep, positions[keep], norms, logits.float())
        self._metrics[idx].update(norms)
        if trainer.state.fn == "fit":
            self._measured_in_fit = True

    def _check_configuration(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fail on the first validation batch (the sanity check) rather than after an epoch of training."""
        x = _batch_input(batch, self.input_key, self.get_input)
        _check_continuous(x, "the input taken from the batch")
        if x.shape[0] > 0:
            with torch.no_grad(), _eval_mode(pl_module):
                _check_logits(self.forward_fn(pl_module, x[:1]), 1, _FORWARD_HINT)
        self._checked = True

    def _records_wanted(self, trainer: pl.Trainer) -> bool:
        if self.record_epochs is None:
            return False
        if self.record_epochs in ("last", "all") or trainer.state.fn != "fit":
            return True
        return trainer.current_epoch in self.record_epochs

    def _add_records(
        self, batch: Any, idx: int, keep: Tensor, positions: Tensor, norms: Tensor, logits: Tensor
    ) -> None:
        if self.get_target is not None:
            y = self.get_target(batch)  # the user's function: its errors are the user's to see
        else:
            try:
                y = _batch_target(batch, self.target_key)
            except (KeyError, TypeError, IndexError):  # a batch without labels: records are optional
                y = None
        if not isinstance(y, Tensor) or y.shape != keep.shape or torch.is_floating_point(y):
            _warn_once(
                self._warned,
                "no-labels",
                "JacobianNormMonitor: the batches carry no class labels of shape [B], so no per-point records "
                "are written. Pass `get_target=` (or `target_key=`) to enable them, or `record_epochs=None`.",
            )
            return
        if logits.shape[1] == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
        y = y[keep].to(logits.device)
        self._records[idx].add(
            index=positions,
            label=y,
            prediction=logits.argmax(dim=1),
            loss=F.cross_entropy(logits, y, reduction="none"),
            norm=norms,
        )

    # --- epoch end: compute, log, record ---------------------------------------------------------------

    def _on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not _should_measure(trainer, self.every_n_epochs) or not self._metrics:
            return
        multiple = len(self._metrics) > 1
        for idx in sorted(self._metrics):
            suffix = f"/dataloader_idx_{idx}" if multiple else ""
            metric = self._metrics[idx]
            mean = metric.compute()
            values = metric.per_point() if self.log_histogram else None
            key = f"{self.prefix}/jacobian_norm{suffix}"
            scalars = {key: mean}
            records = self._records[idx].gathered(pl_module.device) if idx in self._records else None
            if records is not None and records["norm"].numel() > 1:
                finite = torch.isfinite(records["norm"]) & torch.isfinite(records["loss"])
                rho = spearman_corrcoef(records["norm"][finite].float(), records["loss"][finite].float())
                scalars[f"{self.prefix}/jacobian_loss_spearman{suffix}"] = rho.to(pl_module.device)
                self._last_records[idx] = (trainer.current_epoch, records)
                if self.record_epochs != "last" or trainer.state.fn != "fit":
                    self._write_records(trainer, stage, trainer.current_epoch, idx, multiple, records)
            _log_scalars(pl_module, scalars)
            if values is not None:
                _log_histogram(trainer, f"{self.prefix}/jacobian_norm_per_point{suffix}", values)
            num_excluded = int(metric.num_excluded)
            if num_excluded:
                _warn_once(
                    self._warned,
                    "non-finite",
                    f"JacobianNormMonitor: {num_excluded} point(s) with NaN or infinite inputs, outputs or "
                    "Jacobian norms were left out of the mean.",
                )

    def _write_records(
        self,
        trainer: pl.Trainer,
        stage: str,
        epoch: int,
        idx: int,
        multiple: bool,
        records: dict[str, Tensor],
    ) -> None:
        # `trainer.log_dir` is a broadcast under DDP: every rank takes part before the others return.
        root = trainer.log_dir or trainer.default_root_dir
        if trainer.global_rank != 0:
            return
        folder = os.path.join(root, "jacobian_norm_records")
        os.makedirs(folder, exist_ok=True)
        name = f"{stage}_epoch={epoch}" + (f"_dataloader_idx={idx}" if multiple else "")
        path = os.path.join(folder, name + ".csv")
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "label", "prediction", "loss", "jacobian_norm"])
            for i, label, pred, loss, norm in zip(*(records[k].tolist() for k in records), strict=True):
                writer.writerow([int(i), int(label), int(pred), f"{loss:.6g}", f"{norm:.6g}"])

    # --- Lightning hooks ---------------------------------------------------------------------------------

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_start(trainer)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_start(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end(trainer, pl_module, "validate" if trainer.state.fn != "fit" else "fit")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end(trainer, pl_module, "test")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.record_epochs == "last":
            multiple = len(self._last_records) > 1
            for idx, (epoch, records) in self._last_records.items():
                self._write_records(trainer, "fit", epoch, idx, multiple, records)
        if not self._measured_in_fit:
            _warn_once(
                self._warned,
                "no-validation",
                "JacobianNormMonitor measured no validation point during `fit`: there was no validation data "
                "(no `val_dataloader`, `limit_val_batches=0`, or fewer epochs than `every_n_epochs`).",
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"generator_state": self._generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator_state"])
