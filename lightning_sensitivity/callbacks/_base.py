"""The core every monitor builds on: when it measures, the model it measures, the checks it makes on the first
batch, the keys it logs, and how it logs them. Each monitor's own file holds only its measurement."""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from typing_extensions import override

from lightning_sensitivity.callbacks._checks import _check_callable, _check_choice, _check_positive
from lightning_sensitivity.callbacks._dashboard import _register_dashboard
from lightning_sensitivity.callbacks._utils import (
    ForwardFn,
    _default_forward,
    _log_scalars,
    _step,
    _tensorboard_writers,
    _warn_once,
)

#: Floating dtypes a measurement never runs in: their rounding would be the measurement's noise.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Key:
    """One thing a monitor logs: ``{prefix}/{name}``, a ``"scalar"``, ``"histogram"`` or ``"image"``, the title
    of the dashboard chart it is drawn in (scalars only), and the monitor's boolean argument that switches it on
    (``None``: always logged)."""

    name: str
    kind: str = "scalar"
    chart: str | None = None
    option: str | None = None


# --- the model as measured ---------------------------------------------------------------------------------------


class _MeasuredModel(nn.Module):
    """``forward_fn(pl_module, x)`` as an ``nn.Module``, the one model every measurement of a monitor runs.

    Being a module, it gets the functional layer's guarantees (eval mode with every submodule's mode restored, the
    float64 copy of the exact count). Two things are added here, both without touching the module:

    - a module compiled with ``trainer.fit(torch.compile(module))`` has its ``forward`` replaced by Lightning with
      a compiled one; the measurement runs the eager original, with the same parameters (a compiled graph does not
      take the repeated and batched backward passes of a Jacobian);
    - half-precision parameters, buffers and inputs (``precision="bf16-true"`` or ``"16-true"``) are read as
      float32 copies, so the measurement is that of the same weights in float32.
    """

    def __init__(self, pl_module: pl.LightningModule, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.module = pl_module
        self.forward_fn = forward_fn

    def forward(self, x: Tensor, upcast: bool = True) -> Any:
        if upcast:
            x = _full_precision(x)
            low = {
                name: t.detach().float()
                for name, t in [*self.named_parameters(), *self.named_buffers()]
                if t.dtype in _LOW_PRECISION
            }
            if low:
                return torch.func.functional_call(self, low, (x,), {"upcast": False})
        with _eager_forward(self.module):
            return self.forward_fn(self.module, x)


def _full_precision(x: Tensor) -> Tensor:
    """A half-precision input as float32: a Jacobian is taken with respect to the input in its own dtype."""
    return x.float() if x.dtype in _LOW_PRECISION else x


@contextlib.contextmanager
def _eager_forward(pl_module: pl.LightningModule) -> Iterator[None]:
    """The module's own ``forward`` in place of the compiled one Lightning puts there for a compiled module."""
    ctx = getattr(pl_module, "_compiler_ctx", None)
    compiled = pl_module.__dict__.get("forward")
    if not ctx or compiled is None or "original_forward" not in ctx:
        yield
        return
    pl_module.forward = ctx["original_forward"]
    try:
        yield
    finally:
        pl_module.forward = compiled


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


def _load_batch(trainer: pl.Trainer, batch: Any, dataloader_idx: int = 0) -> Any:
    """A batch the monitor reads itself, brought to the module as Lightning's loops bring theirs: the precision
    plugin's input conversion, the module's batch-transfer hooks, the strategy's device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


# --- when to measure ---------------------------------------------------------------------------------------------


class _Schedule:
    """Measure on every ``every_n``-th pass that runs (validation passes, or training epochs for a monitor that
    measures on training data), and on the last one of the fit.

    The last pass is known in advance when a limit says so (``max_epochs``, ``max_steps``, the next validation
    epoch past ``max_epochs``) or ``trainer.should_stop`` is already set. When the fit ends otherwise (early
    stopping decided after the pass, ``max_time``), :attr:`owes_last` tells the monitor to measure again at the end
    of training, on the final weights.
    """

    def __init__(self, every_n: int) -> None:
        self.every_n = every_n
        self.passes = 0
        self.ran = False
        self.last_measured = False

    def start(self, trainer: pl.Trainer, *, validation: bool) -> bool:
        self.passes += 1
        self.ran = True
        self.last_measured = self.passes % self.every_n == 0 or _fit_ends_here(trainer, validation)
        return self.last_measured

    @property
    def owes_last(self) -> bool:
        return self.ran and not self.last_measured

    def reset_fit(self) -> None:
        self.ran = self.last_measured = False


def _fit_ends_here(trainer: pl.Trainer, validation: bool) -> bool:
    """True when no pass of the same kind will follow this one in the current fit."""
    if trainer.should_stop:
        return True
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    if not validation:
        return trainer.current_epoch + 1 >= max_epochs
    if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return False  # a validation inside the epoch: more batches, and maybe more validations, follow
    return trainer.current_epoch + (trainer.check_val_every_n_epoch or 1) >= max_epochs


# --- the monitor -------------------------------------------------------------------------------------------------


class _Monitor(Callback):
    """What every monitor shares: its schedule, its model wrapper, its first-batch check, its registry of logged
    keys (its dashboard charts and hparam metrics come from it), the check of callbacks that monitor those keys,
    and logging at an epoch end or, after training, straight to the loggers."""

    #: Every key the monitor logs (without the prefix), in the order of its docs.
    KEYS: ClassVar[tuple[_Key, ...]]
    #: The key of the wall time of one measurement (one of ``KEYS``, switched on by ``log_seconds``).
    SECONDS_KEY: ClassVar[str]

    def __init__(
        self,
        every_n_epochs: int,
        prefix: str,
        forward_fn: ForwardFn | None,
        log_seconds: bool = False,
        **state_key: Any,
    ) -> None:
        _check_positive("every_n_epochs", every_n_epochs)
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"`prefix` must be a non-empty string without a trailing '/', got {prefix!r}.")
        _check_callable("forward_fn", forward_fn)
        _check_choice("log_seconds", log_seconds, (True, False))
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.log_seconds = log_seconds
        self._stopwatch = _Stopwatch(log_seconds)
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self._schedule = _Schedule(every_n_epochs)
        self._checked = False
        self._after_training = False
        self._model: _MeasuredModel | None = None
        self._warned: set[str] = set()
        # Lightning reads `state_key` around every hook call: build it once.
        self._state_key = self._generate_state_key(prefix=prefix, **state_key)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    def logged_keys(self, kind: str | None = None) -> list[str]:
        """The full names of the keys this monitor logs (of one ``kind``: ``"scalar"``, ``"histogram"`` or
        ``"image"``), under its prefix; with several dataloaders each gets Lightning's ``/dataloader_idx_{i}``."""
        return [
            f"{self.prefix}/{key.name}"
            for key in self.KEYS
            if (kind is None or key.kind == kind) and (key.option is None or getattr(self, key.option))
        ]

    def _key(self, name: str) -> str:
        assert any(key.name == name for key in self.KEYS), name
        return f"{self.prefix}/{name}"

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

    def _warn_once(self, key: str, message: str) -> None:
        _warn_once(self._warned, key, f"{type(self).__name__}: {message}")

    # --- logging ---------------------------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, Tensor]) -> None:
        if scalars and self.log_seconds:
            scalars = {**scalars, self._key(self.SECONDS_KEY): self._stopwatch.take(pl_module.device)}
        if not self._after_training:
            _log_scalars(pl_module, scalars)
            return
        # After training Lightning takes no `self.log`: the values go to the loggers and `callback_metrics` directly.
        values = {key: value.detach().float() for key, value in scalars.items()}
        trainer.callback_metrics.update(values)
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics({k: v.item() for k, v in values.items()}, step=_step(trainer))
                logger.save()

    @contextlib.contextmanager
    def _measuring_after_training(self) -> Iterator[None]:
        self._after_training = True
        try:
            with isolate_rng():  # reading data draws worker seeds from the global generator
                yield
        finally:
            self._after_training = False

    # --- Lightning hooks ----------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule.reset_fit()
        self._check_watchers(trainer)
        _register_dashboard(trainer, [cb for cb in trainer.callbacks if isinstance(cb, _Monitor)])

    def _check_watchers(self, trainer: pl.Trainer) -> None:
        """An ``EarlyStopping`` or ``ModelCheckpoint`` that monitors one of this monitor's keys needs the key at
        each of its checks: fail at fit start, saying what to set, rather than with Lightning's "not available"."""
        keys = set(self.logged_keys("scalar"))
        for callback in trainer.callbacks:
            if not isinstance(callback, (EarlyStopping, ModelCheckpoint)) or callback.monitor not in keys:
                continue
            name = type(callback).__name__
            if self.every_n_epochs != 1:
                raise MisconfigurationException(
                    f"{name}(monitor={callback.monitor!r}) checks the key after every validation, but "
                    f"{type(self).__name__} logs it every {self.every_n_epochs} passes: set "
                    f"`{type(self).__name__}(every_n_epochs=1)`."
                )
            self._check_watcher_timing(trainer, callback)

    def _check_watcher_timing(self, trainer: pl.Trainer, callback: EarlyStopping | ModelCheckpoint) -> None:
        """Whether ``callback`` checks at a time the key exists; a monitor that logs at another time overrides it."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"passes": self._schedule.passes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.passes = state_dict.get("passes", 0)


class _EvaluationMonitor(_Monitor, abc.ABC):
    """A monitor that measures on validation (and test) batches as they pass, and logs at the epoch end.

    A subclass defines ``_begin`` (a measured pass starts), ``_measure_batch`` and ``_finish`` (returns the
    scalars to log). When the fit's last validation pass was not measured (the fit ended in a way not known in
    advance), the monitor reads the validation data itself at the end of training and measures the final weights.
    """

    #: Whether ``trainer.validate`` and ``trainer.test`` runs are measured too.
    MEASURES_OUTSIDE_FIT: ClassVar[bool] = True

    def __init__(
        self,
        every_n_epochs: int,
        prefix: str,
        forward_fn: ForwardFn | None,
        log_seconds: bool = False,
        **state_key: Any,
    ) -> None:
        super().__init__(every_n_epochs, prefix, forward_fn, log_seconds, **state_key)
        self._measuring = False

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
            self._measuring = False
        elif trainer.state.fn != "fit":
            self._measuring = self.MEASURES_OUTSIDE_FIT
        else:
            self._measuring = self._schedule.start(trainer, validation=True)
        if self._measuring:
            self._stopwatch.seconds = 0.0
            with self._stopwatch.running(pl_module.device):
                self._begin(trainer, pl_module)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._first_batch(trainer, pl_module, batch)
        if self._measuring:
            with self._stopwatch.running(pl_module.device):
                self._measure_batch(trainer, pl_module, batch, idx)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._measuring:
            self._measuring = False
            with self._stopwatch.running(pl_module.device):
                scalars = self._finish(trainer, pl_module, stage)
            self._log(trainer, pl_module, scalars)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module)

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
        self._batch_end(trainer, pl_module, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "fit" if trainer.state.fn == "fit" else "validate")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._schedule.owes_last:
            return
        self._schedule.last_measured = True
        loaders = trainer.val_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        with self._measuring_after_training():
            self._stopwatch.seconds = 0.0
            with self._stopwatch.running(pl_module.device):
                self._begin(trainer, pl_module)
                for idx, (loader, limit) in enumerate(zip(loaders, trainer.num_val_batches, strict=False)):
                    for i, batch in enumerate(loader):
                        if i >= limit:
                            break
                        self._measure_batch(trainer, pl_module, _load_batch(trainer, batch, idx), idx)
                scalars = self._finish(trainer, pl_module, "fit")
            self._log(trainer, pl_module, scalars)


def _has_tensorboard(trainer: pl.Trainer) -> bool:
    return bool(_tensorboard_writers(trainer))
