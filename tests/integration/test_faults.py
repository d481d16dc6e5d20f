"""Faults during a run: a NaN loss, an exception inside the user's model during a measurement, a keyboard
interrupt. A monitor never hides the user's error (the same exception object leaves ``fit``), never leaves a
module in another train/eval mode than it found, nor grad mode changed, and the TensorBoard files stay readable."""

from __future__ import annotations

import math
import signal
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from examples.digits import MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests.integration._helpers import all_monitors, scalar_series

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning")]


class UserBug(RuntimeError):
    pass


class FaultyMLP(MLPClassifier):
    """Raises ``armed`` from ``forward`` once armed (in eval mode: during a measurement), and can turn its loss
    into NaN at one training step."""

    def __init__(self, nan_at_step: int | None = None) -> None:
        super().__init__()
        self.armed: BaseException | None = None
        self.nan_at_step = nan_at_step

    def forward(self, x: Tensor) -> Tensor:
        if self.armed is not None and not self.training:
            raise self.armed
        return super().forward(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step == self.nan_at_step else loss


class Trap(pl.Callback):
    """In ``hook`` of the second epoch, arms the model and records every module's mode; listed
    before a monitor, the monitor's measurement in the same hook is the next call of the model."""

    def __init__(self, hook: str, error: BaseException) -> None:
        self.error = error
        self.modes: dict[str, bool] | None = None
        setattr(self, hook, self._arm)

    def _arm(self, trainer: pl.Trainer, pl_module: FaultyMLP, *args: Any) -> None:
        if trainer.current_epoch == 1 and pl_module.armed is None:
            self.modes = {name: m.training for name, m in pl_module.named_modules()}
            pl_module.armed = self.error


MONITORS = {
    "jacobian": (
        lambda: JacobianNormMonitor(max_points=101, every_n_epochs=1),
        "on_validation_batch_end",
        "sensitivity/jacobian_norm",
    ),
    "transitions": (
        lambda: TransitionMonitor(num_trajectories=2, num_points=64, every_n_epochs=1),
        "on_train_epoch_end",
        "sensitivity/transition_density_on_manifold",
    ),
    "gap": (
        lambda: GeneralizationGapMonitor(max_train_points=101, every_n_epochs=1),
        "on_validation_batch_end",
        "generalization/gap_loss",
    ),
}


@pytest.fixture
def _restore_sigint():
    """Lightning ignores SIGINT after a keyboard interrupt (so that a second Ctrl+C cannot stop its shutdown)."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def run_with_trap(
    tmp_path, name: str, error: BaseException
) -> tuple[Trap, FaultyMLP, TensorBoardLogger, Any]:
    monitor, hook, key = MONITORS[name]
    trap, model = Trap(hook, error), FaultyMLP()
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(BaseException) as raised:
        train([trap, monitor()], max_epochs=3, model=model, logger=logger)
    return trap, model, logger, raised


def check_state_after_fault(trap: Trap, model: FaultyMLP, logger: TensorBoardLogger, key: str) -> None:
    assert trap.modes is not None, "the trap never fired"
    assert {name: m.training for name, m in model.named_modules()} == trap.modes
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    series = scalar_series(logger.log_dir)
    assert len(series[key]) == 1 and math.isfinite(series[key][0][1])  # the first epoch's value, read back


@pytest.mark.parametrize("name", list(MONITORS))
def test_an_exception_in_the_model_during_a_measurement_propagates_unchanged(tmp_path, name):
    error = UserBug("a bug in the user's model")
    trap, model, logger, raised = run_with_trap(tmp_path, name, error)
    assert raised.value is error
    check_state_after_fault(trap, model, logger, MONITORS[name][2])


@pytest.mark.usefixtures("_restore_sigint")
@pytest.mark.parametrize("name", list(MONITORS))
def test_a_keyboard_interrupt_during_a_measurement_shuts_down_as_lightning_does(tmp_path, name):
    trap, model, logger, raised = run_with_trap(tmp_path, name, KeyboardInterrupt())
    assert raised.type is SystemExit and raised.value.code == 1  # Lightning's graceful shutdown
    check_state_after_fault(trap, model, logger, MONITORS[name][2])


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> tuple[FaultyMLP, dict]:
    """Three epochs, the loss NaN at step 25 (in the second epoch of 20 steps): the weights are NaN from then on."""
    logger = TensorBoardLogger(tmp_path_factory.mktemp("nan"))
    model = FaultyMLP(nan_at_step=25)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        trainer, _ = train(all_monitors(), max_epochs=3, model=model, logger=logger)
    assert trainer.current_epoch == 3
    return model, scalar_series(logger.log_dir)


def test_a_nan_loss_mid_run_leaves_the_model_as_it_was(nan_run):
    model, series = nan_run
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()
    assert all(len(values) == 3 for values in series.values())


_NAN_HIDDEN = (
    "{}: after the weights turned NaN, it logs {} instead of NaN (and warns nothing), which hides the fault."
)


@pytest.mark.parametrize(
    "key",
    [
        "sensitivity/jacobian_norm",
        "generalization/val_loss",
        "generalization/gap_loss",
        "sensitivity/transition_density_on_manifold",
        "generalization/val_accuracy",
    ],
)
def test_after_a_nan_loss_the_measurements_show_nan(nan_run, key):
    _, series = nan_run
    values = [value for _, value in series[key]]
    assert math.isfinite(values[0])
    assert math.isnan(values[1]) and math.isnan(values[2])
