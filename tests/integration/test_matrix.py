"""The monitors on the set-ups real projects use: torchvision models, compiled modules, the ways a ``Trainer`` ends
a fit or schedules validation, precision plugins, one-logit and dict heads, ``EarlyStopping`` and
``ModelCheckpoint`` on a logged key, iterable datasets, prefixes.

Every cell checks the logged values against a direct measurement (``jacobian_norm``, ``count_transitions``, the
eval-mode loss and accuracy) on the weights the value was measured on: the capturing logger copies the weights
with each logged value, so a cell whose last measurement is not on the final weights is still checked exactly.

Tolerances: relative 1e-4 for Jacobian norms and losses (float32, batches of other sizes than the monitors'),
1e-5 for the compiled modules against their eager copy, 1e-6 for accuracies and transition densities (counts
of integers). Half-precision runs are compared with the float32 measurement of the same weights (cast to
float32) on the inputs as the precision plugin converts them (rounded to the half type).
"""

from __future__ import annotations

import inspect
import random
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through
from tests.integration._helpers import assert_same_training_state
from tests.integration._matrix_models import (
    CapturingLogger,
    MatrixClassifier,
    SyntheticImages,
    eager_copy,
    expected_densities,
    expected_jacobian,
    expected_loss_accuracy,
    weights_of,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
    pytest.mark.filterwarnings("ignore:.*per-point records.*"),
]

REL = 1e-4
REL_COMPILED = 1e-5
EXACT = 1e-6
MAX_POINTS = 12
NUM_POINTS = 16
MAX_TRAIN = 16
SMOOTH_WARNING = "(?i)not piecewise.linear"
#: A key of each monitor measured on validation passes.
ALL_KEYS = ("sensitivity/jacobian_norm", "generalization/gap_loss")


def monitors(
    every_n_epochs: int | None = 1,
    jacobian: bool = True,
    transitions: bool = True,
    gap: bool = True,
    gap_options: dict[str, Any] | None = None,
    **reading: Any,
) -> list[pl.Callback]:
    """The monitors of a cell, small: ``every_n_epochs=None`` keeps each monitor's default schedule; ``reading``
    (``forward_fn``, ...) goes to every monitor, ``gap_options`` to the gap monitor only."""
    schedule = {} if every_n_epochs is None else {"every_n_epochs": every_n_epochs}
    chosen: list[pl.Callback] = []
    if jacobian:
        chosen.append(JacobianNormMonitor(max_points=MAX_POINTS, **schedule, **reading))
    if transitions:
        transition_reading = {
            k: v for k, v in reading.items() if k in ("forward_fn", "get_input", "input_key")
        }
        chosen.append(
            TransitionMonitor(
                num_trajectories=1, num_points=NUM_POINTS, log_figure=False, **schedule, **transition_reading
            )
        )
    if gap:
        chosen.append(
            GeneralizationGapMonitor(max_train_points=MAX_TRAIN, **schedule, **reading, **(gap_options or {}))
        )
    return chosen


def fit(
    model: MatrixClassifier,
    dm: SyntheticImages,
    callbacks: list[pl.Callback],
    tmp_path: Any,
    fit_target: Any = None,
    loggers: list[Any] = (),
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, CapturingLogger]:
    """A seeded CPU fit of ``model`` (or ``fit_target``, a wrapped ``model``) with a capturing logger."""
    capture = CapturingLogger(model)
    options: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=[capture, *loggers],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model if fit_target is None else fit_target, datamodule=dm)
    return trainer, capture


def of_type(callbacks: list[pl.Callback], kind: type) -> Any:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def check_logged(
    trainer: pl.Trainer,
    capture: CapturingLogger,
    model: MatrixClassifier,
    dm: SyntheticImages,
    callbacks: list[pl.Callback],
    *,
    rel: float = REL,
    dtype: torch.dtype = torch.float32,
    input_dtype: torch.dtype | None = None,
    num_val: int | None = None,
) -> None:
    """Each monitor's last logged values equal the direct measurement on the weights they were measured on.

    ``input_dtype``: the type the precision plugin gives the inputs (their rounding); ``num_val``: the validation
    points that the validation passes see (``limit_val_batches``).
    """
    binary = model.hparams.binary
    as_seen = (lambda x: x) if input_dtype is None else (lambda x: x.to(input_dtype).to(torch.float32))
    x_val, y_val = as_seen(dm.x_val[:num_val]), dm.y_val[:num_val]
    jacobian = of_type(callbacks, JacobianNormMonitor)
    if jacobian is not None:
        key = f"{jacobian.prefix}/jacobian_norm"
        record = capture.last(key)
        net = eager_copy(model, record.weights, dtype)
        expected = expected_jacobian(net, x_val[: jacobian.max_points])
        assert record.metrics[key] == pytest.approx(expected, rel=rel), key
        if key in trainer.callback_metrics:  # what EarlyStopping and ModelCheckpoint read
            assert float(trainer.callback_metrics[key]) == pytest.approx(record.metrics[key], rel=1e-6)
    gap = of_type(callbacks, GeneralizationGapMonitor)
    if gap is not None:
        p = gap.prefix
        record = capture.last(f"{p}/val_loss")
        net = eager_copy(model, record.weights, dtype)
        indices = gap.train_indices
        assert indices is not None and len(indices) == min(len(x_val), gap.max_train_points or len(x_val))
        val_loss, val_accuracy = expected_loss_accuracy(net, x_val, y_val, binary)
        train_loss, train_accuracy = expected_loss_accuracy(
            net, as_seen(dm.x_train[indices]), dm.y_train[indices], binary
        )
        expected = {
            "val_loss": (val_loss, rel),
            "train_loss": (train_loss, rel),
            "gap_loss": (val_loss - train_loss, None),
            "val_accuracy": (val_accuracy, EXACT),
            "train_accuracy": (train_accuracy, EXACT),
            "gap_accuracy": (train_accuracy - val_accuracy, None),
        }
        for name, (value, tolerance) in expected.items():
            logged = record.metrics[f"{p}/{name}"]
            if tolerance is None:  # a difference: as exact as its two terms
                assert logged == pytest.approx(
                    value, rel=rel, abs=rel * (abs(val_loss) + abs(train_loss)) + EXACT
                ), name
            else:
                assert logged == pytest.approx(value, rel=tolerance, abs=EXACT), name
    transitions = of_type(callbacks, TransitionMonitor)
    if transitions is not None:
        p = transitions.prefix
        record = capture.last(f"{p}/transition_density_on_manifold")
        net = eager_copy(model, record.weights, dtype)
        anchors = transitions.state_dict()["anchors"]
        for kind, (density, count) in expected_densities(
            net, anchors, transitions.num_points, transitions.method
        ).items():
            assert record.metrics[f"{p}/transition_density_{kind}"] == pytest.approx(density, rel=EXACT), kind
            assert record.metrics[f"{p}/transitions_{kind}"] == pytest.approx(count, rel=EXACT), kind


def check_last_pass_measured(capture: CapturingLogger, keys: tuple[str, ...]) -> None:
    """Each key was logged at least once, and at or after the step of the last validation pass (where ``val_loss``
    is): when the fit ends where the schedule could not foresee it (``max_steps`` mid-epoch, ``max_time``), the
    monitors measure the final weights after training, at the step of the last epoch end. The values are checked
    against the weights of the moment they were logged (``check_logged``)."""
    passes = capture.steps("val_loss")
    assert passes, "no validation pass ran"
    for key in keys:
        steps = capture.steps(key)
        assert steps, f"{key} was never measured in {len(passes)} validation passes (at steps {passes})"
        assert steps[-1] >= passes[-1], (
            f"{key}: last measured at step {steps[-1]}, last validation pass at {passes[-1]}"
        )


# --- torchvision models ---------------------------------------------------------------------------------------

TORCHVISION_CELLS = [
    pytest.param("resnet18", False, id="resnet18"),
    pytest.param("mobilenet_v3_small", True, id="mobilenet_v3_small"),
    pytest.param("vgg11_bn", False, id="vgg11_bn", marks=pytest.mark.slow),
    pytest.param("googlenet", False, id="googlenet"),
]


@pytest.mark.parametrize(
    ("name", "smooth"),
    [*TORCHVISION_CELLS, pytest.param("gelu_layernorm_relu", True, id="gelu_layernorm_relu")],
)
def test_model(name, smooth, tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier(name), SyntheticImages(num_train=32, num_val=16)
    callbacks = monitors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(trainer, capture, model, dm, callbacks)
    smooth_warnings = [w for w in caught if re.search(SMOOTH_WARNING, str(w.message))]
    if smooth:  # smooth units beside counted ones: a count of the counted units' boundaries, not of regions
        assert smooth_warnings, "the TransitionMonitor did not warn that the model is not piecewise linear"
        assert all(issubclass(w.category, UserWarning) for w in smooth_warnings)
    else:
        assert not smooth_warnings, [str(w.message) for w in smooth_warnings]


def test_efficientnet_b0_jacobian_and_gap(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("efficientnet_b0"), SyntheticImages(num_train=32, num_val=16)
    callbacks = monitors(transitions=False)
    trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(trainer, capture, model, dm, callbacks)


def test_efficientnet_b0_transition_monitor_refuses_before_training(tmp_path):
    """efficientnet_b0 has no piecewise-linear unit at all (SiLU and sigmoid only): no transitions to count, an
    error naming its non-linearities, before any optimizer step."""
    pl.seed_everything(0)
    model, dm = MatrixClassifier("efficientnet_b0"), SyntheticImages(num_train=32, num_val=16)
    callbacks = monitors(jacobian=False, gap=False)
    with pytest.raises(ValueError, match="(?i)silu"):
        fit(model, dm, callbacks, tmp_path)
    assert model.trainer.global_step == 0


def test_exact_count_refuses_a_model_with_smooth_units_before_training(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("gelu_layernorm_relu", size=8), SyntheticImages(size=8)
    callbacks = [
        TransitionMonitor(num_trajectories=1, num_points=NUM_POINTS, every_n_epochs=1, method="exact")
    ]
    with pytest.raises(ValueError, match="(?i)piecewise.linear|gelu|layer.?norm"):
        fit(model, dm, callbacks, tmp_path)
    assert model.trainer.global_step == 0


# --- compiled modules ---------------------------------------------------------------------------------------

COMPILE_FORMS = ["inner", "module_compile", "fit_compiled"]


def compiled(form: str) -> tuple[MatrixClassifier, Any]:
    """The module and what ``fit`` is given, for each way of compiling."""
    model = MatrixClassifier("cnn", size=16, compile_net=form == "inner")
    if form == "module_compile":
        model.compile()
    return model, torch.compile(model) if form == "fit_compiled" else model


@pytest.mark.slow
@pytest.mark.parametrize("form", COMPILE_FORMS)
def test_compiled_module_is_measured_as_its_eager_copy(form, tmp_path):
    pl.seed_everything(0)
    model, target = compiled(form)
    dm, callbacks = SyntheticImages(size=16), monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, fit_target=target, max_epochs=2)
    check_logged(trainer, capture, model, dm, callbacks, rel=REL_COMPILED)


def _net_and_compiled() -> tuple[torch.nn.Module, torch.nn.Module, SyntheticImages]:
    pl.seed_everything(0)
    net = MatrixClassifier("cnn", size=16).net.eval()
    return net, torch.compile(net), SyntheticImages(size=16)


@pytest.mark.slow
def test_functional_jacobian_norm_of_a_compiled_network_is_the_eager_one():
    net, compiled_net, dm = _net_and_compiled()
    x = dm.x_val[:MAX_POINTS]
    assert torch.allclose(jacobian_norm(compiled_net, x), jacobian_norm(net, x), rtol=REL_COMPILED, atol=0)


@pytest.mark.slow
def test_functional_count_transitions_of_a_compiled_network_is_the_eager_one():
    net, compiled_net, dm = _net_and_compiled()
    curve = trajectory_through(dm.x_train[:3], 64)
    assert int(count_transitions(compiled_net, curve)) == int(count_transitions(net, curve))


# --- how a fit ends, how validation is scheduled ------------------------------------------------------------


@pytest.mark.parametrize(
    "trainer_kwargs",
    [
        pytest.param({"max_steps": 6, "max_epochs": None}, id="max_steps_at_epoch_end"),
        pytest.param({"max_steps": 4, "max_epochs": None}, id="max_steps_mid_epoch"),
        pytest.param({"check_val_every_n_epoch": 2, "max_epochs": 3}, id="check_val_every_2_of_3_epochs"),
    ],
)
def test_default_schedule_measures_the_last_validation_pass(trainer_kwargs, tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)  # 3 batches an epoch
    callbacks = monitors(every_n_epochs=None)
    trainer, capture = fit(model, dm, callbacks, tmp_path, **trainer_kwargs)
    check_last_pass_measured(capture, ALL_KEYS)
    assert capture.steps("sensitivity/transition_density_on_manifold"), "the TransitionMonitor never measured"
    check_logged(trainer, capture, model, dm, callbacks)


def test_max_time_measures_at_least_once(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)
    callbacks = monitors(every_n_epochs=None)
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_time={"seconds": 3}, max_epochs=None)
    passes = capture.steps("val_loss")
    assert passes, "no validation pass ran in 3 s"
    for key in (*ALL_KEYS, "sensitivity/transition_density_on_manifold"):
        assert capture.steps(key), f"{key} was never measured in {len(passes)} validation passes"
    check_logged(trainer, capture, model, dm, callbacks)


def test_val_check_interval_measures_every_validation_pass(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(num_train=64, size=16)  # 4 batches an epoch
    callbacks = monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2, val_check_interval=0.5)
    passes = capture.steps("val_loss")
    assert len(passes) == 4
    for key in ALL_KEYS:
        assert capture.steps(key) == passes, key
    check_logged(trainer, capture, model, dm, callbacks)


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
    model = MatrixClassifier("cnn", size=16)
    dm = SyntheticImages(size=16, batch_size=8)  # 4 validation batches
    callbacks = monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2, **trainer_kwargs)
    check_last_pass_measured(capture, ALL_KEYS)
    check_logged(trainer, capture, model, dm, callbacks, num_val=num_val)


# --- precision plugins ---------------------------------------------------------------------------------------


def _runs_on_cpu(dtype: torch.dtype) -> bool:
    try:
        conv = torch.nn.Conv2d(3, 2, 3).to(dtype)
        conv(torch.ones(1, 3, 4, 4, dtype=dtype)).sum().backward()
    except RuntimeError:
        return False
    return True


PRECISIONS = [
    pytest.param("bf16-mixed", torch.float32, None, id="bf16-mixed"),
    pytest.param("bf16-true", torch.float32, torch.bfloat16, id="bf16-true"),
    pytest.param(
        "16-true",
        torch.float32,
        torch.float16,
        id="16-true",
        marks=pytest.mark.skipif(
            not _runs_on_cpu(torch.float16), reason="float16 convolutions do not run on this CPU"
        ),
    ),
    pytest.param("64-true", torch.float64, torch.float64, id="64-true"),
]


@pytest.mark.parametrize(("precision", "reference_dtype", "input_dtype"), PRECISIONS)
def test_precision(precision, reference_dtype, input_dtype, tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)
    callbacks = monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2, precision=precision)
    for key in ALL_KEYS:  # past the first epoch
        assert len(capture.steps(key)) == 2, key
    check_logged(trainer, capture, model, dm, callbacks, dtype=reference_dtype, input_dtype=input_dtype)


# --- heads: one logit, a dict, no labels ---------------------------------------------------------------------


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(1), y.to(logits.dtype))


@pytest.mark.parametrize(
    "loss_fn", [pytest.param(None, id="default_loss"), pytest.param(_bce, id="bce_loss_fn")]
)
def test_one_logit_binary_classifier(loss_fn, tmp_path):
    """``[B, 1]`` logits: accuracy is the sign of the logit, the loss binary cross-entropy (a softmax over one
    column is 1 whatever the logit, so cross-entropy would be 0 and argmax would always say class 0)."""
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16, binary=True), SyntheticImages(size=16, binary=True)
    callbacks = monitors(gap_options=None if loss_fn is None else {"loss_fn": loss_fn})
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    check_logged(trainer, capture, model, dm, callbacks)


def _logits_of(module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
    return module(x)["logits"]


def test_dict_output_with_forward_fn(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16, dict_output=True), SyntheticImages(size=16)
    callbacks = monitors(forward_fn=_logits_of)
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    check_logged(trainer, capture, model, dm, callbacks)


def test_gap_monitor_on_dict_output_without_forward_fn_fails_before_training(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16, dict_output=True), SyntheticImages(size=16)
    with pytest.raises(Exception, match="forward_fn"):  # any class: the message is what the user reads
        fit(model, dm, [GeneralizationGapMonitor(every_n_epochs=1)], tmp_path, max_epochs=2)
    assert model.trainer.global_step == 0


def test_gap_monitor_on_label_less_batches_fails_before_training(tmp_path):
    pl.seed_everything(0)
    model = MatrixClassifier("cnn", size=16, labelled=False)
    dm = SyntheticImages(size=16, labelled=False)
    with pytest.raises(Exception, match="(?i)label|target"):  # any class: the message is what the user reads
        fit(model, dm, [GeneralizationGapMonitor(every_n_epochs=1)], tmp_path, max_epochs=2)
    assert model.trainer.global_step == 0


# --- EarlyStopping and ModelCheckpoint on a logged key, at the monitors' defaults ---------------------------

WHAT_TO_SET = "every_n_epochs"


def _works_or_fails_at_start(run, model: pl.LightningModule, key: str) -> pl.Trainer | None:
    """Either the fit works, and ``key`` was logged; or it fails before the first optimizer step, saying what to
    set. Returns the trainer when the fit worked."""
    try:
        trainer, capture = run()
    except Exception as error:  # any class is fine, if it comes at once and says what to set
        assert model.trainer.global_step == 0, f"failed after {model.trainer.global_step} steps: {error!r}"
        assert WHAT_TO_SET in str(error), f"the message does not say what to set: {error}"
        return None
    assert capture.steps(key), f"the fit worked but {key} was never logged"
    return trainer


def test_early_stopping_on_the_jacobian_norm(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)
    callbacks = [JacobianNormMonitor(), EarlyStopping(monitor="sensitivity/jacobian_norm")]
    _works_or_fails_at_start(
        lambda: fit(model, dm, callbacks, tmp_path, max_epochs=3), model, "sensitivity/jacobian_norm"
    )


def test_model_checkpoint_on_the_gap_loss(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="generalization/gap_loss")
    callbacks = [GeneralizationGapMonitor(), checkpoint]
    trainer = _works_or_fails_at_start(
        lambda: fit(model, dm, callbacks, tmp_path, max_epochs=3, enable_checkpointing=True),
        model,
        "generalization/gap_loss",
    )
    if trainer is not None:
        assert checkpoint.best_model_path and checkpoint.best_model_score is not None


# --- iterable datasets ----------------------------------------------------------------------------------------


def test_iterable_datasets(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16, iterable=True)
    callbacks = monitors()
    trainer, capture = fit(model, dm, callbacks, tmp_path, max_epochs=2)
    check_last_pass_measured(capture, ALL_KEYS)
    check_logged(trainer, capture, model, dm, callbacks)


# --- training is unchanged ------------------------------------------------------------------------------------


def training_state(
    model_args: dict[str, Any], callbacks: list[pl.Callback], tmp_path: Any, deterministic: bool
) -> dict[str, Any]:
    """Weights, buffers, optimizer state and the global random streams after two seeded epochs, and the keys
    logged."""
    pl.seed_everything(0)
    model = MatrixClassifier(**model_args)
    trainer, capture = fit(
        model,
        SyntheticImages(size=model_args.get("size", 32)),
        callbacks,
        tmp_path,
        max_epochs=2,
        deterministic=deterministic,
    )
    return {
        "logged": {key for record in capture.history for key in record.metrics},
        "model": weights_of(model),
        "optimizer": trainer.optimizers[0].state_dict()["state"],
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "training": model.training,
    }


UNCHANGED_CELLS = [
    pytest.param({"net": "resnet18"}, True, id="resnet18"),
    # Not `deterministic=True`: that keeps the compiled backward from donating its buffers, which users' runs do.
    # Two plain runs of this model on a CPU are bit-identical without it.
    pytest.param(
        {"net": "cnn", "size": 16, "compile_net": True}, False, id="compiled_cnn", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("model_args", "deterministic"), UNCHANGED_CELLS)
def test_monitors_leave_training_bit_identical(model_args, deterministic, tmp_path):
    plain = training_state(model_args, [], tmp_path / "plain", deterministic)
    monitored = training_state(model_args, monitors(), tmp_path / "monitored", deterministic)
    measured = {*ALL_KEYS, "sensitivity/transition_density_on_manifold"}
    assert measured <= monitored["logged"], "the monitors measured nothing: nothing to compare"
    assert_same_training_state(plain, monitored)
    assert plain["training"] == monitored["training"]


# --- every constructor argument is checked at construction ---------------------------------------------------

#: Out-of-range values and unknown options: ``ValueError``.
BAD_VALUES = {
    JacobianNormMonitor: [
        ("max_points", 0),
        ("max_points", -1),
        ("every_n_epochs", 0),
        ("output", "probabilities"),
        ("method", "sampled"),
        ("num_projections", 0),
        ("chunk_size", 0),
        ("prefix", ""),
        ("record_epochs", "first"),
        ("record_epochs", [-1]),
        ("measure_predict", "yes"),
        ("log_seconds", "yes"),
    ],
    TransitionMonitor: [
        ("num_trajectories", 0),
        ("num_points", 4),
        ("num_points", 7),
        ("every_n_epochs", 0),
        ("off_manifold", "uniform"),
        ("method", "integrated"),
        ("chunk_size", 0),
        ("prefix", ""),
        ("log_figure", "start"),
        ("convergence_tolerance", -0.1),
        ("log_seconds", "yes"),
    ],
    GeneralizationGapMonitor: [
        ("every_n_epochs", 0),
        ("max_train_points", 0),
        ("batch_size", 0),
        ("prefix", ""),
        ("log_seconds", "yes"),
    ],
}

#: Wrong types that both evaluation monitors take alike: where the input, labels and logits are, and the prefix.
_READING_TYPES = [
    ("input_key", 1.5),
    ("target_key", 1.5),
    ("get_input", "x"),
    ("get_target", "y"),
    ("forward_fn", "logits"),
    ("prefix", 3),
]

#: Values of the wrong type: ``ValueError`` or ``TypeError`` (Python's convention for a wrong type).
BAD_TYPES = {
    JacobianNormMonitor: [
        ("max_points", 2.5),
        ("every_n_epochs", 1.5),
        *_READING_TYPES,
        ("log_histogram", "yes"),
        ("record_epochs", 3),
        ("seed", "0"),
    ],
    TransitionMonitor: [
        ("num_trajectories", 1.5),
        ("input_key", 1.5),
        ("get_input", "x"),
        ("forward_fn", "logits"),
        ("prefix", 3),
        ("convergence_tolerance", "0.1"),
        ("seed", "0"),
    ],
    GeneralizationGapMonitor: [
        ("batch_size", 2.5),
        ("loss_fn", "cross_entropy"),
        ("train_dataset", 3),
        ("seed", "0"),
        *_READING_TYPES,
    ],
}


def _cases(table: dict[type, list[tuple[str, Any]]]) -> list[Any]:
    return [
        pytest.param(monitor, name, value, id=f"{monitor.__name__}-{name}={value!r}")
        for monitor, cases in table.items()
        for name, value in cases
    ]


@pytest.mark.parametrize(("monitor", "name", "value"), _cases(BAD_VALUES))
def test_bad_value_raises_at_construction(monitor, name, value):
    with pytest.raises(ValueError, match=name):
        monitor(**{name: value})


@pytest.mark.parametrize(("monitor", "name", "value"), _cases(BAD_TYPES))
def test_bad_type_raises_at_construction(monitor, name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        monitor(**{name: value})


@pytest.mark.parametrize("monitor", list(BAD_VALUES), ids=lambda m: m.__name__)
def test_every_argument_has_a_bad_value_case(monitor):
    arguments = set(inspect.signature(monitor.__init__).parameters) - {"self"}
    covered = {name for name, _ in BAD_VALUES[monitor] + BAD_TYPES[monitor]}
    assert arguments <= covered, f"no invalid-value case for {sorted(arguments - covered)}"


# --- the exact count in the monitor ----------------------------------------------------------------------------


def test_transition_monitor_exact_count_on_a_float32_relu_model(tmp_path):
    pl.seed_everything(0)
    model, dm = MatrixClassifier("mlp", size=8), SyntheticImages(size=8)
    callbacks = [
        TransitionMonitor(
            num_trajectories=2, num_points=NUM_POINTS, every_n_epochs=1, method="exact", log_figure=False
        )
    ]
    trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(trainer, capture, model, dm, callbacks)


# --- prefixes, the dashboard layout and the hparams metrics ----------------------------------------------------

PREFIXED_KEYS = {
    "sens/jacobian_norm",
    "sens/transition_density_on_manifold",
    "sens/transition_density_off_manifold",
    *(f"gen/{side}_{what}" for side in ("train", "val", "gap") for what in ("loss", "accuracy")),
}


@pytest.fixture(scope="module")
def prefixed_run(tmp_path_factory):
    """All three monitors with ``prefix="sens"`` / ``"gen"``, logging to TensorBoard as well."""
    tmp_path = tmp_path_factory.mktemp("prefixed")
    pl.seed_everything(0)
    model, dm = MatrixClassifier("cnn", size=16), SyntheticImages(size=16)
    callbacks = [
        JacobianNormMonitor(max_points=MAX_POINTS, every_n_epochs=1, prefix="sens"),
        TransitionMonitor(num_trajectories=1, num_points=NUM_POINTS, every_n_epochs=1, prefix="sens"),
        GeneralizationGapMonitor(max_train_points=MAX_TRAIN, every_n_epochs=1, prefix="gen"),
    ]
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    trainer, capture = fit(model, dm, callbacks, tmp_path, loggers=[tensorboard], max_epochs=2)
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return trainer, capture, model, dm, callbacks, events


def test_prefixes_name_every_logged_key(prefixed_run):
    trainer, capture, model, dm, callbacks, events = prefixed_run
    logged = {key for record in capture.history for key in record.metrics}
    assert PREFIXED_KEYS <= logged, sorted(PREFIXED_KEYS - logged)
    assert not [k for k in logged if k.startswith(("sensitivity/", "generalization/"))]
    assert PREFIXED_KEYS <= set(events.Tags()["scalars"])
    check_logged(trainer, capture, model, dm, callbacks)


def _layout_regexes(events: EventAccumulator) -> list[str]:
    (config,) = events.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return [tag for category in layout.category for chart in category.chart for tag in chart.multiline.tag]


def test_dashboard_charts_only_logged_keys(prefixed_run):
    *_, events = prefixed_run
    scalars = events.Tags()["scalars"]
    regexes = _layout_regexes(events)
    assert regexes, "no custom-scalars chart"
    # TensorBoard's custom-scalars plugin selects tags with `re.match`
    unmatched = [regex for regex in regexes if not any(re.match(regex, tag) for tag in scalars)]
    assert not unmatched, f"charted but never logged: {unmatched}"


def test_hparams_metrics_hold_every_logged_key(prefixed_run):
    *_, events = prefixed_run
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    logged = {tag for tag in events.Tags()["scalars"] if tag.startswith(("sens/", "gen/"))}
    assert logged <= metrics, f"logged but not an hparams metric: {sorted(logged - metrics)}"
