"""Mixed and true precision: the monitors measure in float32 (or float64 for ``64-true``) whatever the training
precision.

Tolerance: the logged values equal the float32 measurement of the same weights to a relative 1e-5 (Jacobian norm,
losses; float32 summation order) and exactly for accuracies and transition counts (``tests/_logged.py``). A bf16 run
trains to other weights than a float32 run, so "the full-precision value" is the float32 measurement of the weights
the bf16 run reached; under a ``*-true`` precision, on the inputs as the precision plugin converts them (``bf16-true``
rounds the inputs too).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through
from tests._logged import CapturingLogger, Reference, check_logged
from tests.integration._helpers import all_monitors
from tests.integration._models import DigitsCNN

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning")]

RELATIVE_TOLERANCE = 1e-5
EPOCHS = 2


def check_mixed_precision_run(precision: str, accelerator: str, dtype: torch.dtype = torch.float32) -> None:
    pl.seed_everything(0)
    model, dm, monitors = DigitsCNN(), DigitsDataModule(), all_monitors()
    capture = CapturingLogger(model)
    trainer, _ = train(
        monitors,
        max_epochs=EPOCHS,
        model=model,
        datamodule=dm,
        precision=precision,
        accelerator=accelerator,
        logger=capture,
    )
    for key in ("sensitivity/jacobian_norm", "generalization/gap_loss"):  # every epoch, past the first
        assert len(capture.steps(key)) == EPOCHS, key
    reference = Reference.of(
        model, dm, dtype=dtype, convert=trainer.precision_plugin.convert_input, device=model.device
    )
    check_logged(capture, monitors, reference, rel=RELATIVE_TOLERANCE, trainer=trainer)


@pytest.mark.parametrize(
    "precision, dtype",
    [("bf16-true", torch.float32), ("16-true", torch.float32), ("64-true", torch.float64)],
)
def test_true_precision_logs_the_measurement_of_the_same_weights_in_full_precision(precision, dtype):
    check_mixed_precision_run(precision, "cpu", dtype)


def test_bf16_mixed_on_cpu_logs_float32_measurements():
    check_mixed_precision_run("bf16-mixed", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA device")
def test_16_mixed_on_cuda_logs_float32_measurements():
    check_mixed_precision_run("16-mixed", "cuda")


def test_jacobian_norm_inside_an_autocast_region_is_the_float32_value():
    pl.seed_everything(0)
    model, x = DigitsCNN().eval(), DigitsDataModule().x_val[:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = jacobian_norm(model, x)
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, jacobian_norm(model, x), rtol=RELATIVE_TOLERANCE)


def test_count_transitions_inside_an_autocast_region_is_the_float32_count():
    pl.seed_everything(0)
    model = MLPClassifier().eval()
    curve = trajectory_through(DigitsDataModule().x_train[:3], 256)
    outside = count_transitions(model, curve)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = count_transitions(model, curve)
    assert int(inside) == int(outside)
    assert inside.density == pytest.approx(outside.density, rel=1e-6)
