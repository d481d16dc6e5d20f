r"""
Transition Monitor
==================

Counts the linear-region transitions of a piecewise-linear classifier along closed trajectories through its
training data and off the data manifold (Novak et al., ICLR 2018, finding F2), and logs their densities while
the model trains.

"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_sensitivity.callbacks._anchors import _Curves, _Reservoir, _Segments
from lightning_sensitivity.callbacks._base import _Key, _Monitor
from lightning_sensitivity.callbacks._batch import GetInput, _BatchReader
from lightning_sensitivity.callbacks._chart import _trajectory_figure
from lightning_sensitivity.callbacks._checks import (
    _are_probabilities,
    _check_choice,
    _check_continuous_input,
    _check_positive,
    _check_seed,
    _check_watch_size,
)
from lightning_sensitivity.callbacks._generator import _new_generator, _OwnGenerator
from lightning_sensitivity.callbacks._logging import _log_image, _takes_images, _warn_once
from lightning_sensitivity.callbacks._measured import ForwardFn
from lightning_sensitivity.functional import (
    NonFiniteOutputError,
    Trajectory,
    TransitionCount,
    activation_codes,
    count_transitions,
    measuring,
)
from lightning_sensitivity.metrics import TransitionDensity

_KINDS = ("on_manifold", "off_manifold")
#: The default watch set: segments spread along the first trajectory of each kind, counted at every training epoch.
WATCH_SEGMENTS = 16


class TransitionMonitor(_OwnGenerator, _Monitor):
    r"""Logs the linear-region transition density along trajectories on and off the data manifold.

    Each trajectory is the ellipse through three anchor points (see
    :func:`~lightning_sensitivity.functional.ellipse_through`), discretized at ``num_points`` points. Its
    transitions :math:`T` are the piecewise-linear unit boundaries it crosses
    (:func:`~lightning_sensitivity.functional.count_transitions`), and its density is :math:`T` per unit of arc
    length. *On-manifold* anchors are training points; *off-manifold* anchors are points that match the training
    data's per-feature mean and standard deviation (``off_manifold="gaussian"``) or training points with their
    features shuffled (``"shuffled"``).

    The anchors are chosen once, during the first training epoch, from the batches that training itself loads
    (a reservoir sample drawn with the monitor's own generator, so no extra data is loaded and no random stream
    of training is touched), and are kept in the callback's ``state_dict``: a resumed run measures the same
    trajectories. The model is measured in eval mode (restored afterwards) without gradients: in full, along every
    trajectory, after the fit's last training epoch (and every ``every_n_epochs``-th one, when it is set; when the fit
    ends in a way not known at that epoch's end, such as ``max_time`` mid-epoch, at the end of training, logged at
    the same step); and on its **watch set** after every other training epoch, from the first: ``watch_segments`` of
    the ``num_points`` segments of the first trajectory of each kind, spread evenly along it (segment
    :math:`\lfloor j k / m \rfloor` for :math:`j < m`), counted at the full resolution on their end points. At an
    epoch measured in full, the watch values are read off the full count's per-segment counts. Under DDP each
    process counts its share of the trajectories, and the sums combine into the one-process values; process 0, which
    holds trajectory 0, counts the watch segments. Weights, gradients, optimizer state and the global random streams
    are untouched, so training is the same with or without the monitor.

    **Logged Metrics**

    - ``{prefix}/transition_density_on_manifold``, ``{prefix}/transition_density_off_manifold``: the mean over
      trajectories of transitions per unit of arc length.
    - ``{prefix}/transitions_on_manifold``, ``{prefix}/transitions_off_manifold``: the mean raw count per
      trajectory (counts do not compare networks of different sizes, see **Sizes**; densities along the same
      trajectories compare epochs).
    - ``{prefix}/transitions_resolution_on_manifold``, ``{prefix}/transitions_resolution_off_manifold``: the
      resolution evidence of the logged density, :math:`(\bar\rho_k - \bar\rho_{k/2}) / \bar\rho_k`, where
      :math:`\bar\rho_{k/2}` is the same mean density counted on every other point (0 when the density is 0, and
      for ``method="exact"``). It is the mean of the trajectories'
      :attr:`~lightning_sensitivity.functional.TransitionCount.resolution` weighted by their densities, their
      shares of the logged mean, rather than the largest: it is the relative difference of the very number logged
      beside it, and it combines across DDP processes through the same sums as the density. The count on every
      other point misses at least this share; the count on all points misses less (about a third of it to all of
      it). Above ``convergence_tolerance`` the monitor warns once. Logged with the full measurement.
    - ``{prefix}/transition_density_on_manifold_watch``, ``{prefix}/transition_density_off_manifold_watch``: the
      boundaries crossed on the watch segments over their summed length, at every training epoch.
    - ``{prefix}/transitions_on_manifold_watch``, ``{prefix}/transitions_off_manifold_watch``: that density times the
      length of the whole trajectory, an estimate of its count.
    - ``{prefix}/transitions_along_trajectory`` (an image, in every logger that takes one, files for the others):
      along the first on-manifold trajectory, the transitions per segment and the Jacobian norm, with the anchors
      marked (of the probabilities themselves when the first batch shows that the model returns probabilities).
    - ``{prefix}/transitions_seconds``: with ``log_seconds=True``, the wall time of each epoch's measurement (the
      watch set's, or the full counts and the figure when it is drawn then; under DDP the slowest process's), in
      seconds.

    **Sizes.** Counts and densities do not compare networks of different sizes: the raw count grows with the
    number of piecewise-linear units that a curve can cross (across the paper's models it spans :math:`10^3` to
    :math:`10^6`; along the same ellipses through CIFAR-10 images, an MLP with 1,536 ReLUs crosses about
    :math:`2 \cdot 10^3` boundaries, ``resnet18`` with 51,200 units :math:`7 \cdot 10^4` to :math:`10^5`), and so does
    the density. A wider or deeper network logs more transitions without being more sensitive. Compare what is
    measured along one network's own curves: its epochs, networks of one architecture and size (seeds, learning
    rates, data), and ratios within one network, such as its on-manifold against its off-manifold count (along
    those ellipses, 0.95 to 1.2 in all three networks measured, trained or not, while the counts span 70-fold).
    To rank networks of different sizes by sensitivity, use the Jacobian norm (``JacobianNormMonitor``).

    **Cost.** Per full measurement, ``2 * num_trajectories * num_points`` points of forward passes (no gradient, the
    points of several curves in each pass, ``chunk_size`` points at most), and for the figure a Jacobian norm at
    48 points plus drawing it with Pillow and encoding it as PNG; per watch set, one forward pass over the
    ``4 * watch_segments`` end points of the segments of both kinds.

    Args:
        num_trajectories: trajectories of each kind (on and off the manifold).
        num_points: points per trajectory; even and at least 6 (the sampled count also counts on every other
            point, its convergence evidence).
        every_n_epochs: also make the full measurement after every n-th training epoch; ``None``: after the fit's
            last one only.
        watch_segments: the watch set, segments of the first trajectory of each kind, counted after every training
            epoch; ``0`` or ``None``: no watch set (and no ``_watch`` keys).
        off_manifold: ``"gaussian"`` or ``"shuffled"`` anchors off the data manifold.
        method: ``"sampled"``, or ``"exact"`` for piecewise-linear models (slower: one forward pass per region).
        chunk_size: the most points per forward pass (bounds memory; fewer on the CPU for a model with a large
            unit layer, see :func:`~lightning_sensitivity.functional.count_transitions`).
        input_key: where the input is in a batch: a dict key (default ``"x"``) or a tuple index (default 0).
        get_input: ``get_input(batch) -> Tensor``, overrides ``input_key``.
        forward_fn: ``forward_fn(pl_module, x)``, the function whose linear regions are counted; default
            ``pl_module(x)``. Its output need not be a classifier's (then the figure has no Jacobian curve).
        prefix: the first part of every logged key.
        log_figure: when a logger takes images or files: ``"end"`` logs the figure once, at the end of ``fit``
            (with the final weights); ``True`` at every full measurement; ``False`` never.
        convergence_tolerance: warn once when a logged resolution (``transitions_resolution_*``) is above this
            threshold: the density on every other point is more than this fraction below the logged one. The
            warning names the model and what to set: a larger ``num_points``, ``method="exact"``, or fewer units
            counted (a smaller model, or a ``forward_fn`` that stops at an earlier layer).
        log_seconds: also log ``{prefix}/transitions_seconds``, the wall time of each measurement.
        seed: seeds the monitor's own generator (anchors).

    Raises:
        ValueError: at construction, if an argument is out of range; at the first batch (the sanity check's, or
            the first training batch), if the model has no piecewise-linear unit (the message names the
            non-linearities it found).
        MisconfigurationException: at the start of ``fit``, if an ``EarlyStopping`` or ``ModelCheckpoint``
            monitors a key of this monitor and does not check at the end of the training epoch, or monitors a
            full-measurement key and ``every_n_epochs`` is not 1 (its ``_watch`` key is logged every epoch).
        TypeError: at the first batch, if the input is not floating point (token ids: pass ``get_input``
            and ``forward_fn`` that measure at the embeddings).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_sensitivity import TransitionMonitor
        >>> trainer = Trainer(callbacks=[TransitionMonitor(num_trajectories=4, every_n_epochs=5)], max_epochs=20)
    """

    KEYS = (
        _Key("transition_density_on_manifold", watch=True),
        _Key("transition_density_off_manifold", watch=True),
        _Key("transitions_on_manifold", watch=True),
        _Key("transitions_off_manifold", watch=True),
        _Key("transitions_resolution_on_manifold"),
        _Key("transitions_resolution_off_manifold"),
        _Key("transitions_along_trajectory", kind="image"),
        _Key("transitions_seconds", option="log_seconds"),
    )

    def __init__(
        self,
        num_trajectories: int = 2,
        num_points: int = 256,
        every_n_epochs: int | None = None,
        watch_segments: int | None = WATCH_SEGMENTS,
        off_manifold: Literal["gaussian", "shuffled"] = "gaussian",
        method: Literal["sampled", "exact"] = "sampled",
        chunk_size: int = 1024,
        input_key: str | int | None = None,
        get_input: GetInput | None = None,
        forward_fn: ForwardFn | None = None,
        prefix: str = "sensitivity",
        log_figure: bool | Literal["end"] = "end",
        convergence_tolerance: float = 0.02,
        log_seconds: bool = False,
        seed: int = 0,
    ) -> None:
        _check_positive("num_trajectories", num_trajectories)
        _check_watch_size("watch_segments", watch_segments)
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 6 or num_points % 2:
            raise ValueError(
                f"`num_points` must be even and at least 6 (the count on every other point is the convergence "
                f"evidence), got {num_points!r}."
            )
        _check_choice("off_manifold", off_manifold, ("gaussian", "shuffled"))
        _check_choice("method", method, ("sampled", "exact"))
        _check_positive("chunk_size", chunk_size)
        reader = _BatchReader(input_key, get_input)
        _check_choice("log_figure", log_figure, (True, False, "end"))
        if (
            isinstance(convergence_tolerance, bool)
            or not isinstance(convergence_tolerance, (int, float))
            or not convergence_tolerance >= 0
        ):
            raise ValueError(f"`convergence_tolerance` must be a number >= 0, got {convergence_tolerance!r}.")
        _check_seed(seed)
        super().__init__(
            every_n_epochs=every_n_epochs,
            watch=bool(watch_segments),
            prefix=prefix,
            forward_fn=forward_fn,
            log_seconds=log_seconds,
            reader=reader,
            state_key={"off_manifold": off_manifold, "seed": seed},
        )
        self.num_trajectories = num_trajectories
        self.watch_segments = watch_segments
        self.num_points = num_points
        self.off_manifold = off_manifold
        self.method = method
        self.chunk_size = chunk_size
        self.log_figure = log_figure
        self.convergence_tolerance = convergence_tolerance
        self.seed = seed
        self._generator = _new_generator(seed)
        self._anchors: dict[str, Tensor] | None = None  # [num_trajectories, 3, *input_shape] per kind, on the CPU
        self._reservoir = _Reservoir()  # the first epoch's sample of training points, until anchors are chosen
        self._density_metrics = {kind: TransitionDensity() for kind in _KINDS}
        # The same densities counted on every other point of each curve: the resolution evidence.
        self._half_densities = {kind: TransitionDensity() for kind in _KINDS}
        self._curves = _Curves(num_points)
        self._first_count: TransitionCount | None = None  # on-manifold trajectory 0 at the latest measurement
        # How the figure's Jacobian norm reads the output: "probabilities" when the first batch's are.
        self._figure_output = "softmax"

    @property
    def anchors(self) -> dict[str, Tensor] | None:
        """The fixed anchors, ``{"on_manifold": [N, 3, ...], "off_manifold": [N, 3, ...]}``, once chosen."""
        return self._anchors

    @override
    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x = self._reader.input(batch)
        _check_continuous_input(type(self).__name__, x)  # a curve through token ids means nothing
        # Fail at once for a model without piecewise-linear units (NaN outputs are the measurement's business:
        # it logs NaN), and for an exact count of a model that is not piecewise linear.
        model = self._measured_model(pl_module)
        with measuring(model, pl_module.device):
            out = model(x[:2])
        self._figure_output = "probabilities" if isinstance(out, Tensor) and _are_probabilities(out) else "softmax"
        with contextlib.suppress(NonFiniteOutputError):
            smooth = activation_codes(model, x[:2].detach()).smooth_operations
            if smooth and self.method == "exact":
                raise ValueError(
                    f"TransitionMonitor(method='exact') needs a piecewise-linear model, but the model also applies "
                    f"{', '.join(smooth)}: it has no linear regions to step through. Use `method='sampled'`, which "
                    "counts the boundaries of its piecewise-linear units (not linear regions)."
                )

    @override
    def _check_watcher_timing(self, trainer: pl.Trainer, callback: Any) -> None:
        # The densities are logged at the end of the training epoch, after that epoch's validation: a callback that
        # checks after validation comes too early.
        option = "check_on_train_epoch_end" if isinstance(callback, EarlyStopping) else "save_on_train_epoch_end"
        if getattr(callback, f"_{option}", None) is False and trainer.limit_val_batches != 0:
            raise MisconfigurationException(
                f"{type(callback).__name__}(monitor={callback.monitor!r}) checks after validation, but "
                f"{type(self).__name__} logs the key at the end of the training epoch: set "
                f"`{type(callback).__name__}(..., {option}=True)`."
            )

    # --- the anchors, collected during the first epoch -----------------------------------------------------------

    @property
    def _reservoir_size(self) -> int:
        return 3 * self.num_trajectories * (2 if self.off_manifold == "shuffled" else 1)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._first_batch(trainer, pl_module, batch)
        if self._anchors is not None:
            return
        self._reservoir.add(self._reader.input(batch).detach(), self._reservoir_size, self._generator)

    def _choose_anchors(self, trainer: pl.Trainer) -> None:
        n = self.num_trajectories
        if len(self._reservoir.points) < self._reservoir_size:
            _warn_once(
                self,
                "few points",
                f"the first epoch had {self._reservoir.seen} training points, fewer than the "
                f"{self._reservoir_size} anchors needed; lower `num_trajectories`. Nothing is measured.",
            )
            return
        on, off = self._reservoir.anchors(n, self.off_manifold, self._generator)
        off = trainer.precision_plugin.convert_input(off)  # made by the monitor: converted as a batch would be
        anchors = {"on_manifold": on.view(n, 3, *on.shape[1:]), "off_manifold": off.view(n, 3, *on.shape[1:])}
        self._anchors = trainer.strategy.broadcast(anchors, src=0)  # every process measures the same curves
        self._reservoir = _Reservoir()
        self._curves.clear()

    # --- the measurement --------------------------------------------------------------------------------------

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._anchors is None and self._reservoir.seen > 0:
            self._choose_anchors(trainer)
        measurement = self._schedule.start(trainer, validation=False)
        if measurement and self._anchors is not None:
            self._log(trainer, pl_module, self._timed_measure(trainer, pl_module, full=measurement == "full"))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._schedule.owes_last and self._anchors is not None:
            self._schedule.last_measured = True
            self._measure_final(trainer, pl_module)

    @override
    def _measure_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self._measuring_after_training():
            self._log(trainer, pl_module, self._timed_measure(trainer, pl_module, full=True))

    def _timed_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool) -> dict[str, Tensor]:
        self._stopwatch.seconds = 0.0
        with self._stopwatch.running(pl_module.device):
            return self._measure(trainer, pl_module, full)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool) -> dict[str, Tensor]:
        """The full measurement (when ``full``): this process's share of the trajectories of each kind, whose
        metrics' sums combine the shares. The watch set (when on): its segments along trajectory 0 of each kind,
        counted by process 0, which holds that trajectory; at a full measurement they are read off its count."""
        model = self._measured_model(pl_module)
        figure = full and self.log_figure is True and _takes_images(trainer)
        logged: dict[str, Tensor] = {}
        all_curves = self._curves.of(self._anchors, pl_module)
        watch = self._curves.segments(self._anchors, pl_module, self.watch_segments) if self._logs_watch else {}
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        counts_of: dict[str, list[TransitionCount]] = {}
        watched: dict[str, list[float]] = {kind: [] for kind in _KINDS}  # crossings on the watch segments, process 0
        failed = dict.fromkeys(_KINDS, False)
        watch_failed = False
        for kind in _KINDS:
            try:
                curves = all_curves[kind][rank::world] if full else []
                counts_of[kind] = self._count(model, curves) if curves else []
            except NonFiniteOutputError as error:
                counts_of[kind], failed[kind] = [], True
                _warn_once(self, "non-finite", f"{error} Logging NaN.")
        if watch and rank == 0:
            try:
                crossings = self._watch_transitions(model, watch, counts_of)
                watched = {kind: [float(crossings[kind])] for kind in _KINDS}
            except NonFiniteOutputError as error:
                watch_failed = True
                _warn_once(self, "non-finite", f"{error} Logging NaN.")
        for kind in _KINDS:
            curves = all_curves[kind][rank::world]
            counts = counts_of[kind]
            # Every process takes part in the same collectives, whatever its share held.
            kind_failed = trainer.strategy.reduce_boolean_decision(failed[kind], all=False)
            kind_watch_failed = watch and trainer.strategy.reduce_boolean_decision(
                watch_failed or failed[kind], all=False
            )
            nan = torch.tensor(float("nan"), device=device)
            if full:
                metric, half = self._metric(kind, device), self._metric(kind, device, half=True)
                lengths = torch.tensor([c.arc_length for c in counts], device=device)
                metric.update(torch.tensor([float(c.transitions) for c in counts], device=device), lengths)
                half.update(torch.tensor([float(c.transitions_half) for c in counts], device=device), lengths)
                density, mean_count = metric.compute(), metric.mean_transitions().float()
                resolution = torch.where(density > 0, (density - half.compute()) / density, 0.0).float()
                logged[self._key(f"transition_density_{kind}")] = nan if kind_failed else density.float()
                logged[self._key(f"transitions_{kind}")] = nan if kind_failed else mean_count
                logged[self._key(f"transitions_resolution_{kind}")] = nan if kind_failed else resolution
                if not kind_failed and resolution > self.convergence_tolerance:
                    self._warn_unresolved(pl_module, kind, float(resolution))
            if watch:
                segments = watch[kind]
                metric = self._metric(kind, device)
                lengths = [segments.length] * len(watched[kind])
                metric.update(torch.tensor(watched[kind], device=device), torch.tensor(lengths, device=device))
                density = metric.compute().float()
                logged[self._watch_key(f"transition_density_{kind}")] = nan if kind_watch_failed else density
                logged[self._watch_key(f"transitions_{kind}")] = (
                    nan if kind_watch_failed else density * segments.curve_length
                )
            if kind == "on_manifold":
                # Process 0's first curve is on-manifold trajectory 0, the one the figure at the end of fit draws.
                self._first_count = counts[0] if rank == 0 and counts and not kind_failed else None
            if figure and kind == "on_manifold" and counts and not kind_failed:
                _log_image(
                    trainer,
                    self._key("transitions_along_trajectory"),
                    self._figure(trainer, model, curves[0], counts[0]),
                )
        return logged

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)  # measures again if a callback changed the weights after the last time
        if self.log_figure != "end" or self._anchors is None or not _takes_images(trainer):
            return
        model = self._measured_model(pl_module)
        curve = self._curves.of(self._anchors, pl_module)["on_manifold"][0]
        # The fit's last measurement was on the final weights: its count of this curve is the one to draw.
        count = self._first_count if self._schedule.last_measured else None
        if count is None:
            try:
                (count,) = self._count(model, [curve])
            except NonFiniteOutputError as error:
                _warn_once(self, "non-finite", f"{error} Logging NaN.")
                return
        _log_image(trainer, self._key("transitions_along_trajectory"), self._figure(trainer, model, curve, count))

    def _metric(self, kind: str, device: torch.device, half: bool = False) -> TransitionDensity:
        """The density metric of ``kind`` (``half``: of its counts on every other point), on ``device``, reset."""
        metric = (self._half_densities if half else self._density_metrics)[kind].to(device)
        metric.reset()
        return metric

    def _watch_transitions(
        self, model: Any, watch: dict[str, _Segments], counts: dict[str, list[TransitionCount]]
    ) -> dict[str, int]:
        """The boundaries crossed on the watch segments of each kind: read off the count of trajectory 0 (process 0's
        first) when it has per-segment counts; else counted on the segments' end points, every kind's in one forward
        pass (a closed polygon through them, of which every other step is a watch segment)."""
        crossings = {
            kind: segments.transitions(counts[kind][0].segments)
            for kind, segments in watch.items()
            if counts[kind] and counts[kind][0].segments is not None
        }
        left = [kind for kind in watch if kind not in crossings]
        if not left:
            return crossings
        points = torch.cat([watch[kind].points for kind in left])
        if len(points) < 6:  # a single segment: padded with copies of its end point, which cross nothing
            points = torch.cat([points, points[-1:].expand(6 - len(points), *points.shape[1:])])
        result = count_transitions(model, points, chunk_size=self.chunk_size, return_segments=True, warn_smooth=False)
        self._warn_smooth([result])
        assert result.segments is not None
        start = 0
        for kind in left:
            end = start + 2 * len(watch[kind].starts)
            crossings[kind] = int(result.segments[start:end:2].sum())
            start = end
        return crossings

    def _count(self, forward: Any, curves: list[Trajectory]) -> list[TransitionCount]:
        if self.method == "exact":
            return count_transitions(forward, curves, method="exact")
        results = count_transitions(
            forward, curves, chunk_size=self.chunk_size, return_segments=True, warn_smooth=False
        )
        self._warn_smooth(results)
        return results

    def _warn_smooth(self, results: list[TransitionCount]) -> None:
        smooth = sorted({name for result in results for name in result.smooth_operations})
        if smooth:
            _warn_once(
                self,
                "smooth",
                f"the model is not piecewise linear: it also applies {', '.join(smooth)}. The logged transitions "
                "count the boundaries of its piecewise-linear units along the trajectories, not linear regions.",
            )

    def _warn_unresolved(self, pl_module: pl.LightningModule, kind: str, resolution: float) -> None:
        k = self.num_points
        _warn_once(
            self,
            "convergence",
            f"the sampled count has not converged on {type(pl_module).__name__}: along the {kind.replace('_', '-')} "
            f"trajectories the density counted on every other point ({k // 2}) is {resolution:.1%} below the one on "
            f"all {k} points, more than `convergence_tolerance={self.convergence_tolerance}`; the logged "
            f"transitions may miss up to about as much. Set a larger `num_points` (each doubling divides the missed "
            f"crossings by 2 to 4; for example `num_points={4 * k}`), `method='exact'` for a piecewise-linear model "
            "(one forward pass per linear region), or count fewer units (a smaller model, or a `forward_fn` that "
            "stops at an earlier layer).",
        )

    def _figure(self, trainer: pl.Trainer, model: Any, curve: Trajectory, count: TransitionCount) -> np.ndarray:
        return _trajectory_figure(
            model,
            curve,
            count,
            self.chunk_size,
            f"epoch {trainer.current_epoch}: {count.transitions} transitions along on-manifold trajectory 0",
            lambda error: _warn_once(self, "jacobian", f"the figure has no Jacobian norm curve: {error}"),
            self._figure_output,
        )

    # --- state ----------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchors": self._anchors}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._anchors = state_dict["anchors"]
        self._curves.clear()
