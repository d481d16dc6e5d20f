r"""
Jacobian Norm Monitor
=====================

Measures the input-output Jacobian norm of a classifier on validation points (Novak et al., ICLR 2018) and
logs it while the model trains.

"""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import IterableDataset
from torchmetrics.functional import spearman_corrcoef
from typing_extensions import override

from lightning_sensitivity.callbacks._base import _EvaluationMonitor, _HeldBy, _Key
from lightning_sensitivity.callbacks._batch import GetInput, _BatchReader, _class_labels
from lightning_sensitivity.callbacks._checks import (
    _check_choice,
    _check_classifier_output,
    _check_continuous_input,
    _check_output_reading,
    _check_positive,
    _check_seed,
    _check_watch_size,
)
from lightning_sensitivity.callbacks._cost import _SAID_ABOVE, _CostEstimate
from lightning_sensitivity.callbacks._generator import _new_generator, _OwnGenerator
from lightning_sensitivity.callbacks._logging import _log_histogram, _warn_once
from lightning_sensitivity.callbacks._measured import ForwardFn, _full_precision
from lightning_sensitivity.callbacks._positions import _PointCounter
from lightning_sensitivity.callbacks._records import _Records
from lightning_sensitivity.functional import jacobian_norm, logits_from_probabilities, measuring
from lightning_sensitivity.metrics import JacobianNorm, PointRecords

#: Kept points measured in one call of ``jacobian_norm`` (which chunks them further by its own memory bound).
_MEASURE_TOGETHER = 256
#: Points of the first batch that the first-batch check measures.
_CHECK_POINTS = 4
#: The default watch set: the first points of the measured ones, measured at every validation pass.
WATCH_POINTS = 32
#: Vector-Jacobian products per watch point by default: the most probable class's row exactly, one direction for the
#: others (``method="projection"``).
WATCH_PROJECTIONS = 2


class JacobianNormMonitor(_OwnGenerator, _EvaluationMonitor):
    r"""Logs the Jacobian norm of the classifier on validation points, while it trains.

    For every measured point :math:`x` with logits :math:`z = f(x)`, the sensitivity is
    :math:`s(x) = \lVert \partial\, \mathrm{softmax}(z) / \partial x^\top \rVert_F`
    (see :func:`~lightning_sensitivity.functional.jacobian_norm`). The monitor measures its **watch set**, the first
    ``watch_points`` of the measured points, at every validation pass of ``fit`` that runs, from the first (never the
    sanity check), and makes the **full measurement**, the first ``max_points`` points of each validation dataloader,
    at the fit's last validation pass (and every ``every_n_epochs``-th one, when it is set) and on every
    ``trainer.validate`` and ``trainer.test`` run.

    The watch set is measured the same way at every pass, full ones included, so that its curve moves only with the
    model: by default with ``method="projection"`` at ``watch_projections=2`` vector-Jacobian products a point
    instead of :math:`C - 1` (the most probable class's row exactly, an unbiased estimate of the squared norm of the
    other rows along one direction), the point at position :math:`i` drawing its directions from a generator seeded
    with ``seed + i`` at every pass: each point keeps its directions, on one device or many. Its square root is
    biased low: ``docs/benchmarks.md`` gives the watch curve's measured difference from the full measurement. At 10
    classes that is 2 products a point instead of 9: the default watch set, 32 points, costs 1.4 times as much as 8
    exact points did (``benchmarks/overhead.py --watch-jacobian``: 14.8 against 10.7 ms a pass on a small CNN at 28
    x 28) and follows the full measurement far closer, for a mean over a few points misses the rare points of very
    large norm that make much of a confident model's mean. ``watch_projections=None`` measures the watch set exactly
    (with the monitor's ``method``), its values at a full pass taken from the full measurement's own norms.

    When a fit ends in a way not known at its last validation pass (early stopping,
    ``max_time``) and that pass was not measured in full, the monitor reads the validation data again at the end of
    training and logs the full measurement of the final weights, at the step of the fit's last epoch end. The model
    is evaluated in eval mode and restored to its previous mode; weights, gradients, optimizer state and the
    global random streams are untouched, so training is the same with or without the monitor.

    **Logged Metrics**

    - ``{prefix}/jacobian_norm``: the mean of :math:`s(x)` over the measured points (scalar).
    - ``{prefix}/jacobian_norm_watch``: the same mean over the watch set, at every validation pass (estimated at
      ``watch_projections`` products a point).
    - ``{prefix}/jacobian_norm_per_point``: a histogram of the per-point values of the full measurement, in every
      logger that takes one (files for the others). (Not under the scalar's own name: TensorBoard keeps one kind of
      data per tag, and a histogram there hides the scalar.)
    - ``{prefix}/jacobian_loss_spearman``: when the batches carry labels and records are kept (every full
      measurement with ``record_epochs="last"`` or ``"all"``, the listed epochs otherwise), the Spearman correlation
      between the per-point Jacobian norm and the per-point cross-entropy loss (finding F4).
    - ``{prefix}/jacobian_loss_spearman_watch``: the same over the watch set, at every validation pass (unless
      ``record_epochs=None``).
    - ``{prefix}/jacobian_norm_seconds``: with ``log_seconds=True``, the wall time of each pass's measurement, the
      watch set's or the full one (the sum over its batches and its end; under DDP the slowest process's), in
      seconds.
    - With several validation dataloaders, each key gets Lightning's suffix ``/dataloader_idx_{i}``.

    On record epochs (``record_epochs``), a CSV file with one row per measured point (``index``: the point's
    position in the validation dataloader's order, ``label``, ``prediction``, ``loss``, ``jacobian_norm``) is
    written to ``{log_dir}/jacobian_norm_records/{stage}_epoch={epoch}[_dataloader_idx={i}].csv``, and reaches every
    logger (a W&B table, an MLflow artifact, a copy under another logger's directory).

    **At prediction time** (``trainer.predict``, unless ``measure_predict=False``) every predicted point is measured
    (``max_points`` limits the validation passes only) and written, one row per point, to
    ``{log_dir}/jacobian_norm_records/predict[_dataloader_idx={i}].csv``: ``index`` (the position in the predict
    dataloader's order), ``prediction`` and ``jacobian_norm``, and ``label`` and ``loss`` when the batches carry
    labels (empty cells otherwise). No label is needed: a high norm flags a point the model is likely to get wrong
    (finding F4). Predict runs under inference mode; the measurement leaves it for its own autograd, and the
    predictions ``trainer.predict`` returns are untouched. Nothing is logged (Lightning takes no ``self.log`` there).

    **Models that return probabilities** (a ``forward`` ending in ``nn.Softmax``) are measured with
    ``output="probabilities"``: the Jacobian of the probabilities themselves, and the records' losses as their negative
    log-likelihood. The first batch tells: probabilities under another ``output`` fail there, with what to set (the
    default would take a second softmax). Log-probabilities need nothing (their softmax is the probabilities).

    **Cost.** Per measured point, one forward pass and :math:`C` vector-Jacobian products (``method="exact"``),
    or ``num_projections`` products (``method="projection"``), see
    :func:`~lightning_sensitivity.functional.jacobian_norm`: ``max_points`` points at a full measurement,
    ``watch_points`` at every other pass; ``docs/callbacks.md`` has measured figures against the number of classes
    and the model's size. The first-batch check measures a few points as a measurement does, and its time against
    that of the first training batches gives an estimate of a measurement's cost: when it would add more than 10% to
    the training time at the monitor's schedule, one info line says so during the first epoch, with what to change.

    Args:
        max_points: points of the full measurement, per validation dataloader (the first ones in the loader's order;
            under DDP, the same points as on one device). ``None`` measures all.
        every_n_epochs: also make the full measurement on every n-th validation pass that runs; ``None``: at the
            fit's last pass only.
        watch_points: the watch set, the first of the measured points, measured at every validation pass; ``0`` or
            ``None``: no watch set (and no ``_watch`` keys).
        watch_projections: vector-Jacobian products a watch point (``method="projection"``, directions fixed across
            passes); ``None``: the monitor's own ``method`` and ``num_projections`` (the exact norm by default), the
            watch values of a full pass being those of the full measurement.
        output: ``"softmax"`` (the paper's, for a model that returns logits or log-probabilities), ``"logits"`` (the
            Jacobian of the output itself), or ``"probabilities"`` (the model returns probabilities).
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
        measure_predict: measure ``trainer.predict`` batches and write their per-point records.
        log_seconds: also log ``{prefix}/jacobian_norm_seconds``, the wall time of each measurement.
        seed: seeds the monitor's own generator (used by ``method="projection"``) and the watch set's directions.

    Raises:
        ValueError: at construction, if an argument is out of range; at the first validation batch (the sanity
            check, when there is one; without one, also the first training batch, before its step), if the model's
            output is not ``[B, C]``, or holds probabilities and ``output`` is not ``"probabilities"`` (or the
            reverse). The check also measures a few points of the batch, so an error of the measurement itself
            shows then.
        MisconfigurationException: in ``setup``, under a strategy that shards the parameters (FSDP, model
            parallelism, DeepSpeed ZeRO stage 3); at the start of ``fit``, if an ``EarlyStopping`` or
            ``ModelCheckpoint`` monitors a full-measurement key of this monitor and ``every_n_epochs`` is not 1 (its
            ``_watch`` key is logged at every pass).
        TypeError: at the first validation batch, if the input is not floating point (token ids: measure at the
            embeddings with ``forward_fn``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_sensitivity import JacobianNormMonitor
        >>> trainer = Trainer(callbacks=[JacobianNormMonitor(max_points=256, watch_points=16)], max_epochs=3)
    """

    KEYS = (
        _Key("jacobian_norm", watch=True),
        _Key("jacobian_loss_spearman", watch=True),
        _Key("jacobian_norm_per_point", kind="histogram"),
        _Key("jacobian_norm_seconds", option="log_seconds"),
    )
    record_epochs = _HeldBy("_records")

    def __init__(
        self,
        max_points: int | None = 128,
        every_n_epochs: int | None = None,
        watch_points: int | None = WATCH_POINTS,
        watch_projections: int | None = WATCH_PROJECTIONS,
        output: Literal["softmax", "logits", "probabilities"] = "softmax",
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
        measure_predict: bool = True,
        log_seconds: bool = False,
        seed: int = 0,
    ) -> None:
        _check_positive("max_points", max_points, optional=True)
        _check_watch_size("watch_points", watch_points)
        _check_positive("watch_projections", watch_projections, optional=True)
        _check_choice("output", output, ("softmax", "logits", "probabilities"))
        _check_choice("method", method, ("exact", "projection"))
        _check_positive("num_projections", num_projections, optional=True)
        _check_positive("chunk_size", chunk_size, optional=True)
        reader = _BatchReader(input_key, get_input, target_key, get_target)
        _check_choice("log_histogram", log_histogram, (True, False))
        records = _Records(self, record_epochs, reader)
        _check_choice("measure_predict", measure_predict, (True, False))
        _check_seed(seed)
        super().__init__(
            every_n_epochs=every_n_epochs,
            watch=bool(watch_points),
            prefix=prefix,
            forward_fn=forward_fn,
            log_seconds=log_seconds,
            reader=reader,
            state_key={"output": output, "method": method},
        )
        self.measure_predict = measure_predict
        self.max_points = max_points
        self.watch_points = watch_points
        self.watch_projections = watch_projections
        self.output = output
        self.method = method
        self.num_projections = num_projections
        self.chunk_size = chunk_size
        self.log_histogram = log_histogram
        self.seed = seed
        self._generator = _new_generator(seed)
        # The states of the current pass, per dataloader: the full measurement's, and the watch set's (its mean, and
        # its rows for the Spearman correlation).
        self._metrics: dict[int, JacobianNorm] = {}
        self._watch_metrics: dict[int, JacobianNorm] = {}
        self._watch_records: dict[int, PointRecords] = {}
        self._records = records
        # Points kept from the pass's batches and not measured yet, per dataloader: input, positions, labels.
        self._pending: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]] = {}
        # The watch set's points of the pass, when it is measured apart (`watch_projections`): input, positions, labels.
        self._watch_pending: dict[int, list[tuple[Tensor, Tensor, Tensor | None]]] = {}
        self._measured_in_fit = False
        self._predict_points = _PointCounter()
        self._cost = _CostEstimate()
        self._num_classes: int | None = None  # the model's output columns, from the first-batch check

    # --- the measurement, batch by batch -------------------------------------------------------------------

    @override
    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        name = type(self).__name__
        x = self._reader.input(batch)
        _check_continuous_input(name, x)
        if x.shape[0] == 0:
            return
        model = self._measured_model(pl_module)
        points = _full_precision(x[:_CHECK_POINTS])
        with measuring(model, pl_module.device):
            out = model(points)
        _check_classifier_output(name, out, len(points))
        _check_output_reading(name, out, self.output)
        self._num_classes = out.shape[1]
        # The measurement itself, on these points and with the monitor's options (its own generator is left as it
        # is): a failure of the Jacobian shows here, before the first training step, and its time is the cost
        # estimate's.
        with self._cost.checking(pl_module.device, len(points)):
            self._jacobian(model, points, torch.Generator().manual_seed(self.seed))

    def _jacobian(
        self,
        model: Callable[[Tensor], Tensor],
        x: Tensor,
        generator: torch.Generator | list[torch.Generator],
        projections: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``jacobian_norm`` of ``x`` with the monitor's options (``projections``: with ``method="projection"`` at
        that many products instead): the norms and the model's output."""
        return jacobian_norm(
            model,
            x,
            output=self.output,
            method=self.method if projections is None else "projection",
            num_projections=self.num_projections if projections is None else projections,
            chunk_size=self.chunk_size,
            generator=generator,
            return_logits=True,
        )

    @property
    def _watch_size(self) -> int:
        """The watch set's size: the first ``watch_points`` of the measured points (0 when the watch is off)."""
        return min(self.watch_points or 0, self.max_points or self.watch_points or 0)

    @property
    def _watch_apart(self) -> bool:
        """Whether the watch set is measured on its own at every pass (``watch_projections``), not read off the
        full measurement's norms."""
        return self._logs_watch and self.watch_projections is not None

    @override
    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics.clear()
        self._watch_metrics.clear()
        self._watch_records.clear()
        self._records.begin()
        self._pending.clear()
        self._watch_pending.clear()

    @override
    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        x = self._reader.input(batch)
        limit = self.max_points if self._pass == "full" else self._watch_size
        positions, keep = self._points.next_batch(trainer, idx, x.shape[0], x.device, limit)
        # Every rank creates the same states, even with no point to measure (updated once, empty: computed, they
        # are the other ranks'): the pass's end gathers them.
        if idx not in self._metrics and idx not in self._watch_metrics:
            nothing = torch.zeros(0, device=pl_module.device)
            if self._pass == "full":
                self._metrics[idx] = JacobianNorm().to(pl_module.device)
                self._metrics[idx].update(nothing)
                self._records.open(trainer, idx, pl_module.device)
            if self._logs_watch:
                self._watch_metrics[idx] = JacobianNorm(keep_values=False).to(pl_module.device)
                self._watch_metrics[idx].update(nothing)
                if self.record_epochs is not None:  # the watch set's Spearman correlation
                    self._watch_records[idx] = PointRecords().to(pl_module.device)
        if not keep.any():
            return
        wanted = self._records.keeps(idx) or idx in self._watch_records
        labels = self._records.labels(batch, keep) if wanted else None
        if trainer.state.fn == "fit":
            self._measured_in_fit = True
        x, positions = x[keep], positions[keep]
        if self._watch_apart:
            watched = positions < self._watch_size
            if watched.any():
                self._watch_pending.setdefault(idx, []).append(
                    (x[watched], positions[watched], None if labels is None else labels[watched])
                )
            if self._pass != "full":
                return
        # Kept points are measured _MEASURE_TOGETHER at a time, the rest at the pass's end: a few full calls, not
        # one per batch with its fixed costs (a forward pass, a vectorized backward pass).
        pending = self._pending.setdefault(idx, [])
        pending.append((x, positions, labels))
        if sum(len(points) for points, _, _ in pending) >= _MEASURE_TOGETHER:
            self._measure_pending(pl_module, idx)

    def _measure_pending(self, pl_module: pl.LightningModule, idx: int) -> None:
        pending = self._pending.pop(idx, [])
        if not pending:
            return
        x = torch.cat([points for points, _, _ in pending])
        positions = torch.cat([where for _, where, _ in pending])
        labels = [labels for _, _, labels in pending]
        keeps_records = self._records.keeps(idx)
        watch_records = self._watch_records.get(idx)
        norms, logits = self._norms_and_logits(
            pl_module, x, need_logits=keeps_records or watch_records is not None
        )
        if keeps_records:
            assert logits is not None
            self._records.add(idx, positions, norms, logits, labels)
        if idx in self._metrics:
            self._metrics[idx].update(norms)
        if idx in self._watch_metrics and not self._watch_apart:
            # The watch set is the first points of the measured ones: at a full pass its values come from the full
            # measurement's own norms, so the watch series moves only with the model.
            self._update_watch(idx, positions < self._watch_size, positions, norms, logits, labels)

    def _update_watch(
        self,
        idx: int,
        watched: Tensor,
        positions: Tensor,
        norms: Tensor,
        logits: Tensor | None,
        labels: list[Tensor | None],
    ) -> None:
        """The watch set's mean (and rows, for its Spearman correlation) from the points ``watched`` of these."""
        self._watch_metrics[idx].update(norms[watched])
        watch_records = self._watch_records.get(idx)
        if watch_records is not None:
            assert logits is not None
            y = _class_labels(
                None if any(part is None for part in labels) else torch.cat(labels), positions.shape, logits.shape[1]
            )
            watch_records.update(positions[watched], norms[watched], logits[watched], None if y is None else y[watched])

    def _measure_watch(self, pl_module: pl.LightningModule, idx: int) -> None:
        """Measure the watch set of dataloader ``idx`` on its own (``watch_projections``), in one call, each point
        with its own directions, the same at every pass: the watch series moves only with the model."""
        pending = self._watch_pending.pop(idx, [])
        if not pending:
            return
        positions = torch.cat([where for _, where, _ in pending])
        order = positions.argsort()
        x = torch.cat([points for points, _, _ in pending])[order]
        labels = [None if any(part is None for _, _, part in pending) else torch.cat([part for _, _, part in pending])[order]]
        positions = positions[order]
        norms, logits = self._norms_and_logits(pl_module, x, need_logits=idx in self._watch_records, watch=positions)
        self._update_watch(idx, torch.ones_like(positions, dtype=torch.bool), positions, norms, logits, labels)

    def _norms_and_logits(
        self, pl_module: pl.LightningModule, x: Tensor, need_logits: bool = True, watch: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The Jacobian norms of the points ``x`` (NaN for a point with a non-finite entry) and, when asked, their
        logits in float32. ``watch``: the points are those of the watch set at these positions, estimated at
        ``watch_projections`` products a point, point ``i``'s directions drawn from a generator seeded with
        ``seed + i``."""
        x = _full_precision(x)
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        model = self._measured_model(pl_module)
        norms = torch.full((x.shape[0],), float("nan"), device=x.device)
        logits: Tensor | None = None
        if finite.any():
            if watch is None:
                values, finite_logits = self._jacobian(model, x[finite], self._generator)
            else:
                generators = [_new_generator(self.seed + i) for i in watch[finite].tolist()]
                values, finite_logits = self._jacobian(model, x[finite], generators, self.watch_projections)
            norms[finite] = values.to(norms.dtype)
            logits = finite_logits.new_full((x.shape[0], finite_logits.shape[1]), float("nan"))
            logits[finite] = finite_logits
        if need_logits and logits is None:
            with measuring(model, pl_module.device):
                logits = model(x)
        if logits is not None and self.output == "probabilities":  # the records' losses are the NLL of them
            logits = logits_from_probabilities(logits.float())
        return norms, None if logits is None else logits.float()

    # --- prediction: per-point records without labels ----------------------------------------------------------

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._predict_points.reset()
        if self.measure_predict:
            self._records.begin_predict(trainer, pl_module.device)

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.measure_predict:
            return
        self._first_batch(trainer, pl_module, batch)
        x = self._reader.input(batch)
        positions, keep = self._predict_points.next_batch(trainer, dataloader_idx, x.shape[0], x.device)
        if not keep.any():
            return
        norms, logits = self._norms_and_logits(pl_module, x[keep])
        assert logits is not None
        self._records.add_predicted(batch, dataloader_idx, positions, keep, norms, logits)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_predict:
            self._records.write_predicted(trainer)

    # --- the end of a pass: compute, log, record ---------------------------------------------------------------

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Tensor]:
        for idx in sorted(self._pending):
            self._measure_pending(pl_module, idx)
        for idx in sorted(self._watch_pending):
            self._measure_watch(pl_module, idx)
        multiple = len(self._metrics | self._watch_metrics) > 1
        scalars: dict[str, Tensor] = {}
        for idx in sorted(self._watch_metrics):
            suffix = f"/dataloader_idx_{idx}" if multiple else ""
            scalars[self._watch_key("jacobian_norm") + suffix] = self._watch_metrics[idx].compute()
            rows = self._watch_records[idx].compute() if idx in self._watch_records else None
            if rows is not None and bool((rows["label"] >= 0).any()):  # labelled: NaN when no norm is finite
                rho = _spearman(rows)
                scalars[self._watch_key("jacobian_loss_spearman") + suffix] = (
                    rho if rho is not None else torch.tensor(float("nan"))
                ).to(pl_module.device)
        for idx in sorted(self._metrics):
            suffix = f"/dataloader_idx_{idx}" if multiple else ""
            metric = self._metrics[idx]
            scalars[self._key("jacobian_norm") + suffix] = metric.compute()
            values = metric.per_point() if self.log_histogram else None
            records = self._records.end(trainer, idx, stage, multiple)
            if records is not None:
                rho = _spearman(records)
                scalars[self._key("jacobian_loss_spearman") + suffix] = (
                    rho if rho is not None else torch.tensor(float("nan"))
                ).to(pl_module.device)
            if values is not None:
                _log_histogram(trainer, self._key("jacobian_norm_per_point") + suffix, values)
            num_excluded = int(metric.num_excluded)
            if num_excluded:
                _warn_once(
                    self,
                    "non-finite",
                    f"{num_excluded} point(s) with NaN or infinite inputs, outputs or Jacobian norms were left out "
                    "of the mean.",
                )
        return scalars

    # --- the expected cost, said once per fit when it is large ----------------------------------------------------

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        epoch = self._cost.epoch_seconds(trainer, batch_idx)
        if epoch is None or self._cost.seconds_per_point is None:
            return
        points = self._points_per_measurement(trainer)
        if points is None:
            return
        measurement = self._cost.seconds_per_point * points
        watch = self._cost.seconds_per_point * min(self._watch_size, points) if self._logs_watch else 0.0
        if self._watch_apart and self._num_classes is not None:
            # The check timed a point as the full measurement takes it: a forward pass and about C products; the
            # watch set's points take `watch_projections` products each instead (and every pass measures them).
            assert self.watch_projections is not None
            watch *= min(1.0, (self.watch_projections + 1) / max(self._num_classes, 2))
        # The full measurement every `every_n_epochs` epochs, or once in the fit (when its length is known).
        between = self.every_n_epochs or trainer.max_epochs
        if between is None or between <= 0:
            return
        when = f"at every_n_epochs={self.every_n_epochs}" if self.every_n_epochs else f"once in {between} epochs"
        share = (watch + measurement / between) / epoch
        if share <= _SAID_ABOVE:
            return
        rank_zero_info(
            f"{type(self).__name__}: one full measurement of {points} points is expected to take about "
            f"{_two_digits(measurement)} s ({_two_digits(self._cost.seconds_per_point * 1e3)} ms a point, timed on the "
            f"first batch), {_two_digits(measurement / epoch)} epochs of training ({_two_digits(epoch)} s an epoch, "
            f"from its first batches): {when}, with the watch set's {min(self._watch_size, points)} points at every "
            f"pass, it adds about {share:.0%} to the training time. To measure at less cost, measure fewer points "
            "(`max_points=`, `watch_points=`), use `method='projection'` (`num_projections` products a point instead "
            "of one per class; its error is in the docs' callbacks page), or measure less often (`every_n_epochs=`)."
        )

    def _points_per_measurement(self, trainer: pl.Trainer) -> int | None:
        """The points one measurement takes on each process: the first ``max_points`` of each validation dataloader
        (as many as it has), shared among the processes; ``max_points`` when the dataloaders are not set up yet
        (``None`` then for ``max_points=None``)."""
        loaders = trainer.val_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = [] if loaders is None else loaders if isinstance(loaders, (list, tuple)) else [loaders]
        counts = []
        for loader, batches in zip(loaders, trainer.num_val_batches, strict=False):
            size = batches * (getattr(loader, "batch_size", None) or 1)
            dataset = getattr(loader, "dataset", None)
            if isinstance(dataset, Sized) and not isinstance(dataset, IterableDataset):
                size = min(size, len(dataset))
            counts.append(size if self.max_points is None else min(self.max_points, size))
        total = sum(counts) if counts else self.max_points
        if total is None or not math.isfinite(total):
            return None
        return math.ceil(total / trainer.world_size)

    # --- Lightning hooks ---------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._cost.fit_start()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)  # measures again if a callback changed the weights after the last time
        self._records.write_last(trainer)
        if not self._measured_in_fit:
            _warn_once(
                self,
                "no-validation",
                "measured no validation point during `fit`: there was no validation data (no `val_dataloader`, "
                "`limit_val_batches=0`).",
            )


def _two_digits(value: float) -> str:
    """``value`` to two significant digits, without an exponent below a million (``250``, ``0.058``, ``1200``)."""
    return f"{float(f'{value:.2g}'):g}"


def _spearman(records: dict[str, Tensor]) -> Tensor | None:
    """The Spearman correlation of the per-point Jacobian norm and loss over the rows with both finite (finding F4),
    or ``None`` when fewer than two rows have a label."""
    finite = torch.isfinite(records["jacobian_norm"]) & torch.isfinite(records["loss"])
    if int(finite.sum()) < 2:
        return None
    return spearman_corrcoef(records["jacobian_norm"][finite].float(), records["loss"][finite].float())
