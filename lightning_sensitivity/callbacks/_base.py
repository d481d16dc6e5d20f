"""The core every monitor builds on: the registry of the keys it logs, its arguments shared by all monitors, the
check it makes on the first batch, the callbacks that watch its keys, when and how it logs, and, for the monitors
that measure evaluation batches, the pass through those batches. It puts together the concept modules (the batch
reader, the schedule, the measured model, the logging, the evaluation positions, the dashboard); each monitor's own
file holds its measurement and its docs."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_sensitivity.callbacks._batch import _BatchReader
from lightning_sensitivity.callbacks._checks import (
    _check_callable,
    _check_choice,
    _check_positive,
    _check_strategy,
)
from lightning_sensitivity.callbacks._dashboard import WATCH, _register_dashboard
from lightning_sensitivity.callbacks._logging import _log_scalars, _Stopwatch
from lightning_sensitivity.callbacks._measured import (
    ForwardFn,
    _default_forward,
    _MeasuredModel,
    _on_device,
    _same_weights,
    _weights_fingerprint,
)
from lightning_sensitivity.callbacks._positions import _PointCounter
from lightning_sensitivity.callbacks._schedule import Measurement, _Schedule


@dataclass(frozen=True)
class _Key:
    """One thing a monitor logs: ``{prefix}/{name}``, a ``"scalar"``, ``"histogram"`` or ``"image"``, the monitor's
    boolean argument that switches it on (``None``: always logged), and whether it is a measured quantity with a
    watch twin, ``{prefix}/{name}_watch``, logged at every pass when the monitor's watch set is on. (The dashboard's
    charts name the keys they draw: ``_dashboard.CHARTS``.)"""

    name: str
    kind: str = "scalar"
    option: str | None = None
    watch: bool = False


class _HeldBy:
    """A monitor's argument that one of its parts holds (``_HeldBy("_reader")``: the batch reader): the monitor's
    attribute of the same name reads and sets the part's, so the value has one holder."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, monitor: Any, owner: type | None = None) -> Any:
        return self if monitor is None else getattr(getattr(monitor, self.part), self.name)

    def __set__(self, monitor: Any, value: Any) -> None:
        setattr(getattr(monitor, self.part), self.name, value)


# --- the monitor -------------------------------------------------------------------------------------------------


class _Monitor(Callback):
    """What every monitor shares: its schedule, its model wrapper, its batch reader (built by the monitor from its
    own arguments), its first-batch check (on the first batch it sees, a validation batch of the sanity check when
    there is one), its registry of logged keys (its dashboard charts and hparam metrics come from it), the check of
    callbacks that monitor those keys, and logging at an epoch end or, after training, straight to the loggers.

    At the end of ``fit``, when the weights differ from those of the fit's last measurement (a callback changed them
    after it: ``StochasticWeightAveraging`` copies its averages in at the end of training), the monitor measures
    again (:meth:`_measure_final`), so that its last logged values are those of the model the fit returns."""

    #: Every key the monitor logs (without the prefix), in the order of its docs; the one switched on by
    #: ``log_seconds`` is the wall time of one measurement.
    KEYS: ClassVar[tuple[_Key, ...]]

    input_key = _HeldBy("_reader")
    get_input = _HeldBy("_reader")

    def __init__(
        self,
        *,
        every_n_epochs: int | None,
        watch: bool,
        prefix: str,
        forward_fn: ForwardFn | None,
        log_seconds: bool,
        reader: _BatchReader,
        state_key: dict[str, Any],
    ) -> None:
        """``watch``: whether the monitor's watch set is on (its size argument is not 0 or ``None``);
        ``state_key``: the arguments besides ``prefix`` that tell two instances apart in a checkpoint."""
        _check_positive("every_n_epochs", every_n_epochs, optional=True)
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"`prefix` must be a non-empty string without a trailing '/', got {prefix!r}.")
        _check_callable("forward_fn", forward_fn)
        _check_choice("log_seconds", log_seconds, (True, False))
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.log_seconds = log_seconds
        self._stopwatch = _Stopwatch(log_seconds)
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self._reader = reader
        self._schedule = _Schedule(every_n_epochs, watch)
        self._checked = False
        self._after_training = False
        self._model: _MeasuredModel | None = None
        # The fingerprint of the weights of the fit's latest measurement (`_weights_fingerprint`), or None.
        self._measured_weights: torch.Tensor | None = None
        # Lightning reads `state_key` around every hook call: build it once.
        self._state_key = self._generate_state_key(prefix=prefix, **state_key)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @property
    def watching(self) -> bool:
        """Whether the monitor measures its watch set at every pass (and logs the ``_watch`` keys)."""
        return self._schedule.watch

    def logged_keys(self, kind: str | None = None, *, watch: bool | None = None) -> list[str]:
        """The full names of the keys this monitor logs (of one ``kind``: ``"scalar"``, ``"histogram"`` or
        ``"image"``), under its prefix, each measured quantity followed by its ``_watch`` twin when the watch set is
        on; ``watch=False`` leaves the twins out, ``watch=True`` lists only them. With several dataloaders each key
        gets Lightning's ``/dataloader_idx_{i}``."""
        names = []
        for key in self.KEYS:
            if (kind is not None and key.kind != kind) or (key.option is not None and not getattr(self, key.option)):
                continue
            if watch is not True:
                names.append(f"{self.prefix}/{key.name}")
            if watch is not False and key.watch and self.watching:
                names.append(f"{self.prefix}/{key.name}{WATCH}")
        return names

    def _key(self, name: str) -> str:
        assert any(key.name == name for key in self.KEYS), name
        return f"{self.prefix}/{name}"

    def _watch_key(self, name: str) -> str:
        assert any(key.name == name and key.watch for key in self.KEYS), name
        return f"{self.prefix}/{name}{WATCH}"

    @property
    def _logs_watch(self) -> bool:
        """Whether the measurement under way logs the watch keys: when the watch set is on, at every pass, but not
        after training (the final weights' full measurement completes the full series; the watch series has its
        point at the last pass already)."""
        return self.watching and not self._after_training

    def _measured_model(self, pl_module: pl.LightningModule) -> _MeasuredModel:
        if self._model is None or self._model.module is not pl_module:
            self._model = _MeasuredModel(pl_module, self.forward_fn)
        return self._model

    def _first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._checked:
            self._check_batch(trainer, pl_module, batch)
            self._checked = True

    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Fail on the first batch the monitor sees (the sanity check when there is one) if the model or the batch
        cannot be measured, rather than at the first measurement."""

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
        self._batch_end(trainer, pl_module, batch, dataloader_idx)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """An evaluation batch of dataloader ``idx`` has passed."""
        self._first_batch(trainer, pl_module, batch)

    # --- logging ---------------------------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, Tensor]) -> None:
        """Log a measurement's scalars, with its wall time when ``log_seconds``; in ``fit``, keep the fingerprint of
        the weights they were measured on."""
        if scalars and self.log_seconds:
            (seconds,) = [key.name for key in self.KEYS if key.option == "log_seconds"]
            scalars = {**scalars, self._key(seconds): self._stopwatch.take(pl_module.device)}
        _log_scalars(trainer, pl_module, scalars, after_training=self._after_training)
        if scalars and trainer.state.fn == "fit":
            self._measured_weights = _weights_fingerprint(pl_module)

    @contextlib.contextmanager
    def _measuring_after_training(self) -> Iterator[None]:
        self._after_training = True
        try:
            with isolate_rng():  # reading data draws worker seeds from the global generator
                yield
        finally:
            self._after_training = False

    def _measure_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the final weights after training, logged straight to the loggers (:meth:`_measuring_after_training`)
        at the step of the fit's last epoch end."""

    # --- Lightning hooks ----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_strategy(type(self).__name__, trainer.strategy)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule.reset_fit()
        self._measured_weights = None
        self._check_watchers(trainer)
        _register_dashboard(trainer, [cb for cb in trainer.callbacks if isinstance(cb, _Monitor)])

    def _check_watchers(self, trainer: pl.Trainer) -> None:
        """An ``EarlyStopping`` or ``ModelCheckpoint`` that monitors one of this monitor's keys needs the key at
        each of its checks: fail at fit start, saying what to set, rather than with Lightning's "not available"."""
        every_pass = set(self.logged_keys("scalar", watch=True))
        full = set(self.logged_keys("scalar", watch=False))
        for callback in trainer.callbacks:
            watched = isinstance(callback, (EarlyStopping, ModelCheckpoint)) and callback.monitor in every_pass | full
            if not watched:
                continue
            name = type(callback).__name__
            if callback.monitor in full and self.every_n_epochs != 1:
                n = self.every_n_epochs
                how_often = "at the last pass only" if n is None else f"every {n} passes"
                watch = f"{callback.monitor}{WATCH}"
                on_watch = f"monitor {watch!r}, its value on the watch set, logged at every pass, or "
                instead = on_watch if watch in every_pass else ""
                raise MisconfigurationException(
                    f"{name}(monitor={callback.monitor!r}) checks the key after every validation, but "
                    f"{type(self).__name__} logs it {how_often}: {instead}set "
                    f"`{type(self).__name__}(every_n_epochs=1)`."
                )
            self._check_watcher_timing(trainer, callback)

    def _check_watcher_timing(self, trainer: pl.Trainer, callback: EarlyStopping | ModelCheckpoint) -> None:
        """Whether ``callback`` checks at a time the key exists; a monitor that logs at another time overrides it."""

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's `on_train_end` (SWA's copy of its averages among them, in whatever order the
        # callbacks are listed), and after the strategy moved the module to the CPU: it is measured where it trained.
        if self._measured_weights is None or _same_weights(self._measured_weights, _weights_fingerprint(pl_module)):
            return
        with _on_device(pl_module, trainer.strategy.root_device):
            self._measure_final(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"passes": self._schedule.passes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.passes = state_dict.get("passes", 0)


class _EvaluationMonitor(_Monitor, abc.ABC):
    """A monitor that measures on validation (and test) batches as they pass, and logs at the epoch end.

    A subclass defines ``_begin`` (a measured pass starts), ``_measure_batch`` and ``_finish`` (returns the
    scalars to log); :attr:`_pass` says what the pass measures (``"full"``: the full measurement, whose watch values
    come from its parts; ``"watch"``: the watch set alone), :attr:`_points` counts the points of each dataloader that
    the pass has seen, for their positions in the evaluation order. Its batch reader also reads labels
    (``target_key``, ``get_target``).

    When the fit's last validation pass was not measured (the fit ended in a way not known in advance), the monitor
    reads the validation data itself at the end of training and measures the final weights.
    """

    #: Whether ``trainer.validate`` and ``trainer.test`` runs are measured too.
    MEASURES_OUTSIDE_FIT: ClassVar[bool] = True

    target_key = _HeldBy("_reader")
    get_target = _HeldBy("_reader")

    def __init__(self, **arguments: Any) -> None:
        """``arguments``: those of :class:`_Monitor`."""
        super().__init__(**arguments)
        self._pass: Measurement = None
        self._points = _PointCounter()
        self._checked_training = False

    @abc.abstractmethod
    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A measured pass starts: reset the pass's states."""

    @abc.abstractmethod
    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Measure one batch of dataloader ``idx``."""

    @abc.abstractmethod
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Tensor]:
        """The pass ends: the scalars to log (histograms and files are the monitor's to write)."""

    def _epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._pass = None
        elif trainer.state.fn != "fit":
            self._pass = "full" if self.MEASURES_OUTSIDE_FIT else None
        else:
            self._pass = self._schedule.start(trainer, validation=True)
        if self._pass:
            self._start_pass(trainer, pl_module)

    def _start_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stopwatch.seconds = 0.0
        self._points.reset()
        with self._stopwatch.running(pl_module.device):
            self._begin(trainer, pl_module)

    @override
    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._first_batch(trainer, pl_module, batch)
        if self._pass:
            with self._stopwatch.running(pl_module.device):
                self._measure_batch(trainer, pl_module, batch, idx)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._pass:
            with self._stopwatch.running(pl_module.device):
                scalars = self._finish(trainer, pl_module, stage)
            self._pass = None
            self._log(trainer, pl_module, scalars)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module)

    on_test_epoch_start = on_validation_epoch_start

    on_test_batch_end = _Monitor.on_validation_batch_end

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Without a sanity check the first evaluation batch comes after an epoch of training: the first training batch
        # is checked before its step (and the first evaluation batch still is, when it comes).
        if not self._checked and not self._checked_training:
            self._check_batch(trainer, pl_module, batch)
            self._checked_training = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "fit" if trainer.state.fn == "fit" else "validate")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._schedule.owes_last:
            self._schedule.last_measured = True
            self._measure_final(trainer, pl_module)

    @override
    def _measure_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the validation data again (as the fit's validation passes read it) and measure it."""
        loaders = trainer.val_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        with self._measuring_after_training():
            self._pass = "full"
            self._start_pass(trainer, pl_module)
            with self._stopwatch.running(pl_module.device):
                for idx, (loader, limit) in enumerate(zip(loaders, trainer.num_val_batches, strict=False)):
                    for i, batch in enumerate(loader):
                        if i >= limit:
                            break
                        self._measure_batch(trainer, pl_module, self._reader.load(trainer, batch, idx), idx)
                scalars = self._finish(trainer, pl_module, "fit")
            self._pass = None
            self._log(trainer, pl_module, scalars)
