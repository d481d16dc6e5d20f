"""``jacobian_penalty`` in a ``LightningModule``'s ``training_step`` (the documented one line), under the set-ups the
monitors support: ``bf16-mixed``, gradient accumulation, a compiled module, DDP on two processes; with the monitors
beside it; and at strength 0, training bit-identical to training without it.

References: the same training at ``32-true`` (the penalty turns autocast off), without accumulation at twice the
batch, with the eager module, in one process at twice the batch; each from the same initial weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import JacobianNormMonitor
from lightning_sensitivity.functional import jacobian_norm, jacobian_penalty
from tests._compiled import GraphCalls
from tests.integration._helpers import assert_same_training_state
from tests.integration._models import DigitsCNN
from tests.integration._penalty_ddp_script import BATCH, STEPS, STRENGTH, InOrder, PenalisedMLP

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch"),
]

ROOT = Path(__file__).resolve().parents[2]


class PenaltyOnly(MLPClassifier):
    """Trains on the penalty alone (plain SGD): what autocast would change is then all in the penalty."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return jacobian_penalty(self, batch[0], method="exact")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PenalisedCNN(DigitsCNN):
    """The digits CNN (batch norm, dropout, functional ReLU) with the penalty, its directions drawn from the
    module's own generator (reproducible runs); ``compile`` compiles its layers."""

    def __init__(self, strength: float, compile: bool = False, backend: Any = "eager") -> None:
        super().__init__()
        self.strength = strength
        self.generator = torch.Generator().manual_seed(0)
        if compile:
            self.conv1, self.conv2, self.head = (
                torch.compile(m, backend=backend) for m in (self.conv1, self.conv2, self.head)
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) + self.strength * jacobian_penalty(self, x, generator=self.generator)


def weights(model: pl.LightningModule) -> dict[str, Tensor]:
    return {k.replace("._orig_mod", ""): v.detach().clone() for k, v in model.state_dict().items()}


def seeded(make: Any, *args: Any, **kwargs: Any) -> pl.LightningModule:
    """A model built right after seeding: the runs compared start from the same weights."""
    pl.seed_everything(0, verbose=False)
    return make(*args, **kwargs)


def test_under_bf16_mixed_the_penalty_trains_as_in_full_precision():
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        _, model = train(
            max_epochs=1, model=seeded(PenaltyOnly), precision=precision, limit_train_batches=3, limit_val_batches=0
        )
        runs[precision] = weights(model)
    initial = weights(seeded(PenaltyOnly))
    for key, value in runs["32-true"].items():
        assert not torch.equal(value, initial[key]), key  # the penalty trained every parameter
        assert torch.equal(runs["bf16-mixed"][key], value), key


def test_gradient_accumulation_gives_the_step_of_the_whole_batch():
    """Two accumulated batches of 32 are one batch of 64: the penalty is a mean over the batch, as the loss is."""
    runs = {}
    for accumulate, batch in ((2, 32), (1, 64)):
        _, model = train(
            max_epochs=1,
            model=seeded(PenalisedMLP, strength=0.5),
            datamodule=DigitsDataModule(batch_size=batch),
            accumulate_grad_batches=accumulate,
            limit_train_batches=2 * accumulate,  # two optimizer steps
            limit_val_batches=0,
        )
        runs[accumulate] = weights(model)
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[2][key], value, rtol=1e-5, atol=1e-6)


def test_a_compiled_module_trains_with_the_penalty_as_its_eager_twin():
    """The loss's forward pass runs the compiled graphs; the penalty runs their eager originals (a compiled graph
    refuses double backward) with the same parameters."""
    backend = GraphCalls()
    runs = {}
    for compiled in (False, True):
        datamodule = DigitsDataModule(batch_size=64)
        model = seeded(PenalisedCNN, strength=1.0, compile=compiled, backend=backend)
        _, model = train(max_epochs=1, model=model, datamodule=datamodule, limit_train_batches=3, limit_val_batches=0)
        runs[compiled] = weights(model)
    assert backend.calls >= 3 * 3  # three compiled layers in each of the three training forward passes
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6)


def training_state(tmp_path: Path, strength: float | None) -> dict[str, Any]:
    """Two epochs of the CNN (dropout, batch norm) on augmented digits, with ``strength * penalty`` in its loss
    (``None``: the plain loss, no penalty computed)."""

    class Model(DigitsCNN):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss if strength is None else loss + strength * jacobian_penalty(self, batch[0])

    pl.seed_everything(0)
    trainer, model = train(
        max_epochs=2, model=Model(), datamodule=DigitsDataModule(augment=True, batch_size=128), default_root_dir=tmp_path
    )
    return {
        "model": model.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def test_at_strength_zero_training_is_bit_identical_to_training_without_the_penalty(tmp_path):
    """The penalty's forward pass runs in eval mode (no dropout draw from the global stream, no batch-norm update),
    draws its directions from its own generator and touches no ``.grad``: zero times it changes nothing."""
    assert_same_training_state(training_state(tmp_path / "plain", None), training_state(tmp_path / "zero", 0.0))


def test_the_monitor_beside_it_measures_the_penalised_model_and_the_penalty_lowers_the_jacobian_norm():
    logged = {}
    for strength in (0.0, 3.0):
        monitor = JacobianNormMonitor(max_points=128)
        model = seeded(PenalisedMLP, strength=strength, method="projection")
        trainer, model = train([monitor], max_epochs=3, model=model)
        logged[strength] = float(trainer.callback_metrics["sensitivity/jacobian_norm"])
        x_val = DigitsDataModule().x_val[:128]
        assert logged[strength] == pytest.approx(float(jacobian_norm(model, x_val).mean()), rel=1e-5)
    assert logged[3.0] < 0.7 * logged[0.0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_ddp_two_processes_train_as_one_process_on_both_halves(tmp_path):
    """No unused-parameter error (``find_unused_parameters=False``, the default), no gradient reduced twice: the
    weights equal one process's on the same points, two ranks' batches at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("_penalty_ddp_script.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the DDP run did not finish in 300 s (deadlock?)")
    assert process.returncode == 0, output.decode()[-6000:]

    one_process = {}
    for strength in (STRENGTH, 0.0):
        _, model = train(
            max_epochs=1,
            model=seeded(PenalisedMLP, strength=strength),
            datamodule=InOrder(batch_size=2 * BATCH),
            limit_train_batches=STEPS,
            limit_val_batches=0,
        )
        one_process[strength] = model.state_dict()
    ddp = torch.load(tmp_path / "weights.pt")
    for key, value in one_process[STRENGTH].items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)
        # the penalty's share of the step, far above that tolerance (it was reduced, once)
        assert (value - one_process[0.0][key]).abs().max() > 1e-4, key
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(metrics["sensitivity/jacobian_norm"])
