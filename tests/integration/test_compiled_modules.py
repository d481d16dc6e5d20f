"""The monitors on a module compiled with ``torch.compile``, in each of its three forms (a compiled submodule,
``LightningModule.compile()``, ``fit(torch.compile(module))``): every logged value is the measurement of an eager copy
with the same weights (``tests/_logged.py``), to a relative 1e-5 for Jacobian norms and losses.

That training is unchanged by the monitors on a compiled module is in ``test_training_unchanged.py``; the functional
measurements of compiled modules are in ``tests/functional/test_compiled.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests import _synthetic
from tests._logged import check_logged, fit
from tests._synthetic import ImageClassifier, SyntheticImages

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

REL_COMPILED = 1e-5
COMPILE_FORMS = ["inner", "module_compile", "fit_compiled"]


def compiled(form: str) -> tuple[ImageClassifier, Any]:
    """The module and what ``fit`` is given, for each way of compiling."""
    model = ImageClassifier("cnn", size=16, compile_net=form == "inner")
    if form == "module_compile":
        model.compile()
    return model, torch.compile(model) if form == "fit_compiled" else model


@pytest.mark.slow
@pytest.mark.parametrize("form", COMPILE_FORMS)
def test_compiled_module_is_measured_as_its_eager_copy(form, tmp_path):
    pl.seed_everything(0)
    model, target = compiled(form)
    dm, callbacks = SyntheticImages(size=16), _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, fit_target=target, max_epochs=2)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), rel=REL_COMPILED, trainer=trainer)
