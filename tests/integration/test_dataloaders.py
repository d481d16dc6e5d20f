"""The data a fit is given: datasets that are streams without a length, and several validation dataloaders (the
Jacobian norm logged per dataloader, the gap's validation side the first). Logged values are checked against a direct
measurement of the weights they were logged on (``tests/_logged.py``)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from examples.digits import train
from tests import _synthetic
from tests._logged import CapturingLogger, Reference, check_last_pass_measured, check_logged, fit
from tests._synthetic import ALL_KEYS, ImageClassifier, SyntheticImages
from tests.integration import _models

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]


def test_iterable_datasets(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("cnn", size=16), SyntheticImages(size=16, iterable=True)
    callbacks = _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    check_last_pass_measured(capture, ALL_KEYS)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)


def test_several_validation_dataloaders_are_logged_per_dataloader():
    pl.seed_everything(0)
    model, dm = _models.TwoValidationSetsMLP(), _models.TwoValidationSets()
    watched = _models.monitors({})
    capture = CapturingLogger(model)
    trainer, _ = train(watched, max_epochs=1, model=model, datamodule=dm, logger=capture)
    assert "sensitivity/jacobian_norm" not in trainer.callback_metrics
    assert "sensitivity/jacobian_norm" not in capture.keys()
    reference = Reference.of(model, dm, splits=[slice(0, 200), slice(200, None)])
    check_logged(capture, watched, reference, rel=1e-5, trainer=trainer)
