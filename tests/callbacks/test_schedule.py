"""When the monitors measure: every n-th validation pass that runs, and always the last one of the fit, whatever ends
the fit (``max_steps``, ``max_time``, early stopping, the validation schedule); and every pass under the ``Trainer``
options that change what a pass sees. Each logged value is checked against a direct measurement of the weights it
must have measured (``tests/_logged.py``)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, StochasticWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import jacobian_norm
from tests import _synthetic
from tests._logged import CapturingLogger, Reference, check_last_pass_measured, check_logged, fit
from tests._synthetic import ALL_KEYS, ImageClassifier, SyntheticImages
from tests.integration._helpers import scalar_series

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

MAX_POINTS = 40


class Snapshots(Callback):
    """The weights at the end of each validation pass of the fit (not the sanity check)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.weights.append(copy.deepcopy(pl_module.state_dict()))


def _monitors() -> list[Callback]:
    """The three monitors at their default schedule."""
    return [
        JacobianNormMonitor(max_points=MAX_POINTS),
        GeneralizationGapMonitor(max_train_points=MAX_POINTS),
        TransitionMonitor(num_trajectories=1, num_points=16, log_figure=False),
    ]


def _jacobian_of(model, weights=None) -> float:
    model = copy.deepcopy(model)
    if weights is not None:
        model.load_state_dict(weights)
    return jacobian_norm(model, DigitsDataModule().x_val[:MAX_POINTS]).mean().item()


CASES = {
    # the last validation pass is not known in advance: the final weights are measured after training
    "max_steps, max_epochs unset": (dict(max_epochs=-1, max_steps=32), "final"),
    "val_check_interval inside the epoch": (dict(max_epochs=2, val_check_interval=0.3), "final"),
    "max_time": (dict(max_epochs=1000, max_time={"seconds": 2}), "final"),
    "early stopping": (dict(max_epochs=50, extra=[EarlyStopping("val_loss", patience=0, min_delta=10)]), "final"),
    # the last validation pass is known (the next one would be past max_epochs) and measured, but the fit trains on
    # after it: the weights it returns differ from those measured, and are measured at the end of fit
    "check_val_every_n_epoch=2, max_epochs=3": (dict(max_epochs=3, check_val_every_n_epoch=2), "final"),
    "num_sanity_val_steps=0, max_epochs=2": (dict(max_epochs=2, num_sanity_val_steps=0), "last pass"),
    # the fit ends at the end of an epoch (20 steps each), right after the last validation pass
    "max_steps at an epoch's end, max_epochs unset": (dict(max_epochs=-1, max_steps=40), "last pass"),
}
TRANSITIONS = "sensitivity/transition_density_on_manifold"


@pytest.mark.parametrize("case", list(CASES))
def test_the_last_validation_pass_is_always_measured(case):
    options, expected_weights = CASES[case]
    options = dict(options)
    snapshots, monitors, model = Snapshots(), _monitors(), MLPClassifier()
    capture = CapturingLogger(model)
    trainer, model = train(
        monitors + [snapshots] + options.pop("extra", []), model=model, logger=capture, **options
    )
    assert snapshots.weights, "the fit ran at least one validation pass"
    weights = None if expected_weights == "final" else snapshots.weights[-1]
    logged = trainer.callback_metrics
    assert logged["sensitivity/jacobian_norm"].item() == pytest.approx(_jacobian_of(model, weights), rel=1e-5)
    for key in ("generalization/gap_loss", TRANSITIONS):
        assert torch.isfinite(logged[key])
    check_last_pass_measured(capture, ALL_KEYS)
    assert capture.steps(TRANSITIONS), "the TransitionMonitor never measured"
    check_logged(capture, monitors, Reference.of(model, DigitsDataModule()), rel=1e-5, trainer=trainer)


def test_every_n_epochs_counts_the_validation_passes_that_run(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    snapshots = Snapshots()
    monitor = JacobianNormMonitor(max_points=MAX_POINTS, every_n_epochs=2)
    trainer, model = train([monitor, snapshots], max_epochs=7, check_val_every_n_epoch=2, logger=logger)
    series = scalar_series(logger.log_dir)["sensitivity/jacobian_norm"]
    # validation runs after epochs 2, 4 and 6 (three passes): the 2nd is measured, and the 3rd, the last; epoch 7
    # trains on, and the weights the fit returns are measured at its end
    assert len(snapshots.weights) == 3
    assert [value for _, value in series] == pytest.approx(
        [_jacobian_of(model, snapshots.weights[i]) for i in (1, 2)] + [_jacobian_of(model)], rel=1e-5
    )


def test_every_n_epochs_skips_the_sanity_check_and_measures_the_last_epoch(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer, _ = train(
        [JacobianNormMonitor(every_n_epochs=2, max_points=32)],
        max_epochs=5,
        logger=logger,
        num_sanity_val_steps=2,
    )
    steps = [step for step, _ in scalar_series(logger.log_dir)["sensitivity/jacobian_norm"]]
    per_epoch = trainer.global_step // 5
    assert steps == [
        2 * per_epoch - 1,
        4 * per_epoch - 1,
        5 * per_epoch - 1,
    ]  # epochs 2, 4 and the last; no sanity check


def test_after_training_the_final_measurement_is_logged_at_the_last_step(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer, model = train(
        [JacobianNormMonitor(max_points=MAX_POINTS), GeneralizationGapMonitor(max_train_points=MAX_POINTS)],
        max_epochs=-1,
        max_steps=32,
        logger=logger,
    )
    series = scalar_series(logger.log_dir)
    (step, value), = series["sensitivity/jacobian_norm"]
    assert step == trainer.global_step - 1
    assert value == pytest.approx(_jacobian_of(model), rel=1e-5)
    assert [s for s, _ in series["generalization/gap_loss"]] == [step]


@pytest.mark.parametrize("net", ["mlp", "cnn"], ids=["without batch norm", "with batch norm"])
def test_weights_swa_copies_in_at_the_end_are_the_last_measured(net, tmp_path):
    """``StochasticWeightAveraging`` copies its averaged weights into the module at the end of training (with batch
    norm, it adds an epoch that recomputes the statistics with them first). Listed after the monitors, its
    ``on_train_end`` runs after theirs; the monitors' last values are still those of the model the fit returns (they
    see at the end of ``fit`` that the weights changed, and measure again), each against a direct computation on the
    returned weights."""
    pl.seed_everything(0)
    model, dm = ImageClassifier(net, size=16), SyntheticImages(size=16)
    monitors = _synthetic.monitors()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    trainer, capture = fit(model, dm, [*monitors, swa], tmp_path, max_epochs=3)
    returned = {name: value.cpu() for name, value in model.state_dict().items()}
    for monitor in monitors:
        record = capture.last(monitor.logged_keys("scalar")[0])
        assert all(torch.equal(value, returned[name]) for name, value in record.weights.items()), monitor
    reference = _synthetic.reference(model, dm)
    check_logged(capture, monitors, reference, trainer=trainer)
    direct = jacobian_norm(reference.network(returned), dm.x_val[: _synthetic.MAX_POINTS]).mean().item()
    assert float(trainer.callback_metrics["sensitivity/jacobian_norm"]) == pytest.approx(direct, rel=1e-4)


# --- every pass measured, whatever the Trainer options ------------------------------------------------------------


def test_val_check_interval_measures_every_validation_pass(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("cnn", size=16), SyntheticImages(num_train=64, size=16)  # 4 batches an epoch
    callbacks = _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2, val_check_interval=0.5)
    passes = capture.steps("val_loss")
    assert len(passes) == 4
    for key in ALL_KEYS:
        assert capture.steps(key) == passes, key
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)


@pytest.mark.parametrize(
    ("trainer_kwargs", "num_val"),
    [
        pytest.param({"limit_val_batches": 2}, 2 * 8, id="limit_val_batches_2"),
        pytest.param({"accumulate_grad_batches": 2}, None, id="accumulate_grad_batches_2"),
        pytest.param({"num_sanity_val_steps": 0}, None, id="num_sanity_val_steps_0"),
    ],
)
def test_trainer_option(trainer_kwargs, num_val, tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("cnn", size=16)
    dm = SyntheticImages(size=16, batch_size=8)  # 4 validation batches
    callbacks = _synthetic.monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2, **trainer_kwargs)
    check_last_pass_measured(capture, ALL_KEYS)
    check_logged(capture, callbacks, _synthetic.reference(model, dm, num_val=num_val), trainer=trainer)
