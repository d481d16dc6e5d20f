"""Which strategies the monitors measure under: those that keep whole parameters on every process (single device,
DDP, DeepSpeed ZeRO stages 1 and 2), and not those that shard them (FSDP, model parallelism, DeepSpeed ZeRO stage 3),
which fail in ``setup``, naming the strategy and what to do instead. (Two DDP processes are run in
``test_ddp.py``.)

FSDP needs a GPU to run and DeepSpeed is not installed here: the checks are run on strategy objects built on the
CPU (``FSDPStrategy()``, ``ModelParallelStrategy()``; a ``DeepSpeedStrategy`` given only its configuration, as its
constructor needs DeepSpeed), through each monitor's ``setup``, which reads only ``trainer.strategy``."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from examples.digits import MLPClassifier
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

MONITORS = [JacobianNormMonitor, TransitionMonitor, GeneralizationGapMonitor]


def _deepspeed(stage: int) -> DeepSpeedStrategy:
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its constructor needs DeepSpeed installed
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


def _trainer(strategy) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, limit_val_batches=1.0)


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        (FSDPStrategy, "FSDPStrategy"),
        (ModelParallelStrategy, "ModelParallelStrategy"),
        (lambda: _deepspeed(3), "DeepSpeedStrategy (ZeRO stage 3)"),
    ],
    ids=["fsdp", "model_parallel", "deepspeed_stage_3"],
)
@pytest.mark.parametrize("monitor", MONITORS)
@pytest.mark.parametrize("stage", ["fit", "validate", "predict"])
def test_strategies_that_shard_the_parameters_fail_in_setup_naming_them(strategy, name, monitor, stage):
    with pytest.raises(MisconfigurationException, match=rf"{monitor.__name__} cannot measure under {re.escape(name)}.*ddp"):
        monitor().setup(_trainer(strategy()), MLPClassifier(), stage)


@pytest.mark.parametrize(
    "strategy",
    [lambda: SingleDeviceStrategy("cpu"), DDPStrategy, lambda: _deepspeed(2), lambda: _deepspeed(1)],
    ids=["single_device", "ddp", "deepspeed_stage_2", "deepspeed_stage_1"],
)
@pytest.mark.parametrize("monitor", MONITORS)
def test_strategies_with_whole_parameters_pass_setup(strategy, monitor):
    monitor().setup(_trainer(strategy()), MLPClassifier(), "fit")
