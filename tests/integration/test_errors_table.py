"""``docs/errors.md`` lists every error and warning the package emits, and each row is triggered here.

The table is the source of truth: a row gives the exception (or warning) class, where it is raised, and a piece of
its message. ``test_every_raise_and_warning_has_a_row`` reads the package's source and fails when a ``raise`` or a
warning is added or removed without its row; ``test_the_row_is_triggered`` runs each row's trigger below and checks
the class and the message.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import (
    NonFiniteOutputError,
    activation_codes,
    class_logits,
    count_transitions,
    ellipse_through,
    jacobian_norm,
    jacobian_penalty,
    trajectory_through,
)
from lightning_sensitivity.metrics import (
    ClassificationLossAccuracy,
    JacobianNorm,
    PointRecords,
    TransitionDensity,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_sensitivity"
TABLE = ROOT / "docs" / "errors.md"
CLASSES = {
    cls.__name__: cls
    for cls in (
        ValueError,
        TypeError,
        KeyError,
        RuntimeError,
        IndexError,
        MisconfigurationException,
        ModuleNotFoundError,
        UserWarning,
        NonFiniteOutputError,
    )
}
#: Functions that build an exception for a ``raise`` elsewhere.
EXCEPTION_FACTORIES = {"_no_units_error": "ValueError"}
WARNING_CALLS = {"rank_zero_warn", "_warn_once", "warn"}

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]


@dataclass(frozen=True)
class Row:
    id: str
    raised: str
    message: str


def read_table() -> list[Row]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows.append(Row(cells[0].strip("`"), cells[1].strip("`"), cells[2][2:-2].strip()))
    return rows


@dataclass(frozen=True)
class Site:
    """A ``raise`` or a warning call in the package's source: where it is (for the failure message only), its class,
    and the literal text of its message (the constant parts of its strings, joined)."""

    where: str
    raised: str
    text: str


def _literal_text(node: ast.AST) -> str:
    parts = []
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            parts.append(child.value)
    return "\x00".join(parts)


def package_sites() -> list[Site]:
    """Every ``raise`` and every warning call in the package's source. A ``raise`` of an exception built by a
    factory function (``EXCEPTION_FACTORIES``) carries the factory's message."""
    trees = {
        path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    factories = {
        node.name: _literal_text(node)
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name in EXCEPTION_FACTORIES
    }
    sites = []
    for module, tree in trees.items():

        def visit(node: ast.AST, scope: list[str], module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                inner = scope + [child.name] if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else scope
                where = f"{module}::{'.'.join(inner)}"
                if isinstance(child, ast.Raise) and child.exc is not None:
                    exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                    name = getattr(exc, "id", getattr(exc, "attr", "?"))
                    text = factories.get(name, _literal_text(child.exc))
                    sites.append(Site(where, EXCEPTION_FACTORIES.get(name, name), text))
                if isinstance(child, ast.Call) and inner and inner[-1] != "_warn_once":
                    name = getattr(child.func, "id", getattr(child.func, "attr", None))
                    if name in WARNING_CALLS:
                        sites.append(Site(where, "UserWarning", _literal_text(child)))
                visit(child, inner)

        visit(tree, [])
    return sites


def _matches(row: Row, site: Site) -> bool:
    return row.raised == site.raised and row.message in site.text


# --- triggers ------------------------------------------------------------------------------------------------------


def _trainer(**kwargs: Any) -> pl.Trainer:
    options = dict(logger=False, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**options, **kwargs})


def _setup(monitor: pl.Callback, **trainer_kwargs: Any) -> None:
    monitor.setup(_trainer(**trainer_kwargs), MLPClassifier(), "fit")


def _nan_model() -> MLPClassifier:
    """A classifier whose weights are NaN (as after a NaN loss), and that stays so: its learning rate is 0."""
    model = MLPClassifier(lr=0.0)
    with torch.no_grad():
        model.net[1].weight.fill_(float("nan"))
    return model


def _fit(callbacks: list[pl.Callback], **kwargs: Any) -> None:
    train(callbacks, max_epochs=1, **{"limit_train_batches": 2, **kwargs})


class _NoValidation(MLPClassifier):
    validation_step = pl.LightningModule.validation_step


class _InputsOnly(MLPClassifier):
    """Validation batches that are bare input tensors (no labels)."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self(batch)


class _SkipsValidation(MLPClassifier):
    """A ``validation_step`` that does nothing: the batches reach the callbacks as they are."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


class _TwoValidationSets(MLPClassifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")


class _ProbabilitiesOut(MLPClassifier):
    """A ``forward`` that ends in a softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).softmax(dim=1)


class _Uncopyable(TensorDataset):
    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError("cannot pickle '_thread.lock' object")


def _digits(n: int = 16) -> TensorDataset:
    data = DigitsDataModule()
    return TensorDataset(data.x_val[:n], data.y_val[:n])


class _ItemBackward(torch.autograd.Function):
    """The identity, whose backward reads a number off the gradient: no batching rule for ``.item()``."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * (1.0 + 0.0 * grad.sum().item())


class _ItemInBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(_ItemBackward.apply(self.first(x)).relu())


def _without_matplotlib(call: Callable[[], Any]) -> None:
    """``call()`` where ``import matplotlib`` fails, as without it installed."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
            patch.delitem(sys.modules, name)
        patch.setitem(sys.modules, "matplotlib", None)
        call()


def _model_and_x() -> tuple[nn.Module, torch.Tensor]:
    return MLPClassifier().eval(), DigitsDataModule().x_val[:4]


def _curve(num_points: int = 64, anchors: int = 3):
    return trajectory_through(DigitsDataModule().x_train[:anchors], num_points)


def _validate_with(monitor: pl.Callback, model: pl.LightningModule, loader: DataLoader) -> None:
    _trainer(callbacks=[monitor]).validate(model, loader, verbose=False)


def _validate_batches(monitor: pl.Callback, batch: Any) -> None:
    """A validation run whose one batch is ``batch``, as the collate function makes it."""
    loader = DataLoader(range(1), collate_fn=lambda items: batch)
    _validate_with(monitor, _SkipsValidation(), loader)


def _not_affine() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _SquareOutsideTorch(), nn.ReLU(), nn.Linear(16, 10))
    count_transitions(model, _curve(), method="exact")


class _GeluThenRelu(MLPClassifier):
    """A GELU layer before a ReLU layer: counted units beside a smooth one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
        )


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class _SquareOutsideTorch(nn.Module):
    """A square computed by NumPy, where the forward pass cannot be followed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() ** 2)


class _PlainWeights:
    """A callable that keeps float32 weights as plain tensors."""

    def __init__(self) -> None:
        self.weight = torch.randn(10, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.weight.T)


class _ReentrantCheckpointed(nn.Module):
    """A linear layer run through a reentrant activation checkpoint in every mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.net, x, use_reentrant=True)


TRIGGERS: dict[str, Callable[[], Any]] = {
    # the batches the monitors read
    "input-key-missing": lambda: _validate_batches(JacobianNormMonitor(), {"image": torch.zeros(2, 1, 8, 8)}),
    "input-not-found": lambda: _validate_batches(JacobianNormMonitor(), object()),
    "input-not-tensor": lambda: _validate_batches(JacobianNormMonitor(), ((torch.zeros(2, 64), torch.zeros(2, 3)), 0)),
    "get-input-not-tensor": lambda: _validate_batches(
        JacobianNormMonitor(get_input=lambda batch: batch[0]), ((torch.zeros(2, 64), torch.zeros(2, 3)), 0)
    ),
    "input-position-missing": lambda: _validate_batches(JacobianNormMonitor(input_key=2), (torch.zeros(2, 64), 0)),
    "target-position-missing": lambda: _validate_batches(
        GeneralizationGapMonitor(target_key=2), (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    ),
    "target-key-missing": lambda: _validate_batches(GeneralizationGapMonitor(), {"x": torch.zeros(2, 1, 8, 8)}),
    "target-not-found": lambda: _validate_batches(GeneralizationGapMonitor(), torch.zeros(2, 1, 8, 8)),
    # callbacks/generalization_gap_monitor.py
    "gap-no-validation-step": lambda: GeneralizationGapMonitor().setup(_trainer(), _NoValidation(), "fit"),
    "gap-limit-val-batches": lambda: _setup(GeneralizationGapMonitor(), limit_val_batches=0),
    "gap-train-loader": lambda: _trainer(max_epochs=1, callbacks=[GeneralizationGapMonitor()]).fit(
        MLPClassifier(), {"digits": DataLoader(_digits(), batch_size=8)}, DataLoader(_digits(), batch_size=8)
    ),
    "gap-no-validation-batch": lambda: _fit(
        [GeneralizationGapMonitor()],
        model=_TwoValidationSets(),
        datamodule=_FirstValidationSetEmpty(),
    ),
    "gap-dataset-not-copied": lambda: _fit(
        [GeneralizationGapMonitor(train_dataset=_Uncopyable(*_digits(32).tensors))]
    ),
    # the monitors' arguments, at construction
    "monitor-argument-positive": lambda: TransitionMonitor(num_trajectories=0),
    "monitor-argument-positive-or-none": lambda: GeneralizationGapMonitor(max_train_points=0),
    "monitor-watch-size": lambda: TransitionMonitor(watch_segments=-1),
    "monitor-argument-choice": lambda: JacobianNormMonitor(output="probs"),
    "monitor-argument-callable": lambda: GeneralizationGapMonitor(loss_fn="cross_entropy"),
    "monitor-argument-batch-key": lambda: JacobianNormMonitor(input_key=1.5),
    "monitor-seed": lambda: TransitionMonitor(seed="0"),
    "monitor-prefix": lambda: JacobianNormMonitor(prefix=""),
    "gap-train-dataset": lambda: GeneralizationGapMonitor(train_dataset=DataLoader(_digits())),
    "transition-monitor-convergence-tolerance": lambda: TransitionMonitor(convergence_tolerance=-1),
    # the monitors' first batch, and the callbacks watching their keys
    "monitor-input-not-continuous": lambda: _validate_with(
        JacobianNormMonitor(), _SkipsValidation(), DataLoader(torch.zeros(4, 1, 8, 8, dtype=torch.long))
    ),
    "gap-labels-shape": lambda: _validate_with(
        GeneralizationGapMonitor(get_target=lambda batch: torch.zeros(3, dtype=torch.long)),
        MLPClassifier(),
        DataLoader(_digits(), batch_size=8),
    ),
    "monitor-watcher-every-n": lambda: _fit(
        [JacobianNormMonitor(), EarlyStopping(monitor="sensitivity/jacobian_norm")]
    ),
    "transition-monitor-watcher-timing": lambda: _fit(
        [
            TransitionMonitor(every_n_epochs=1),
            EarlyStopping(monitor="sensitivity/transition_density_on_manifold", check_on_train_epoch_end=False),
        ]
    ),
    # callbacks/jacobian_norm_monitor.py
    "jacobian-monitor-record-epochs": lambda: JacobianNormMonitor(record_epochs="first"),
    "jacobian-monitor-no-labels": lambda: _validate_with(
        JacobianNormMonitor(), _InputsOnly(), DataLoader(DigitsDataModule().x_val[:16], batch_size=8)
    ),
    "jacobian-monitor-non-finite": lambda: _validate_with(
        JacobianNormMonitor(),
        MLPClassifier(),
        DataLoader(TensorDataset(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))),
    ),
    "jacobian-monitor-no-validation": lambda: _fit([JacobianNormMonitor()], limit_val_batches=0),
    # callbacks/transition_monitor.py
    "transition-monitor-num-points": lambda: TransitionMonitor(num_points=7),
    "uncounted-piecewise-linear": lambda: activation_codes(
        nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Hardshrink()), torch.randn(2, 4)
    ),
    "non-finite-output": lambda: activation_codes(_nan_model(), torch.zeros(2, 1, 8, 8)),
    "non-finite-output-exact": lambda: count_transitions(
        _nan_model(), ellipse_through(*DigitsDataModule().x_train[:3], num_points=16), method="exact"
    ),
    "units-differ-between-chunks": lambda: count_transitions(
        lambda x: F.relu(x) if len(x) > 8 else F.relu(F.relu(x) - 1), torch.randn(16, 3), chunk_size=10
    ),
    "transition-monitor-non-finite": lambda: _fit(
        [TransitionMonitor(num_trajectories=1, every_n_epochs=1, log_figure=False)], model=_nan_model()
    ),
    "transition-monitor-non-finite-figure": lambda: _fit(
        [TransitionMonitor(num_trajectories=1, every_n_epochs=1)],
        model=_nan_model(),
        logger=TensorBoardLogger("logs"),
    ),
    "transition-monitor-few-points": lambda: _fit(
        [TransitionMonitor(num_trajectories=4, every_n_epochs=1, log_figure=False)],
        datamodule=DigitsDataModule(batch_size=4),
        limit_train_batches=1,
    ),
    "transition-monitor-exact-smooth": lambda: _fit(
        [TransitionMonitor(num_trajectories=1, method="exact")], model=_GeluThenRelu()
    ),
    "transition-monitor-smooth": lambda: _fit(
        [TransitionMonitor(num_trajectories=1, every_n_epochs=1, log_figure=False)],
        model=_GeluThenRelu(),
    ),
    "transition-monitor-not-converged": lambda: _fit(
        [TransitionMonitor(num_trajectories=1, num_points=6, every_n_epochs=1, log_figure=False)]
    ),
    "transition-monitor-figure-jacobian": lambda: _fit(
        [TransitionMonitor(num_points=64, every_n_epochs=1, forward_fn=lambda m, x: m(x)[:, :, None])],
        logger=TensorBoardLogger("logs"),
    ),
    # functional/evaluation.py
    "input-not-continuous": lambda: jacobian_norm(MLPClassifier(), torch.zeros(2, 1, 8, 8, dtype=torch.long)),
    "output-not-tensor": lambda: class_logits({"logits": torch.zeros(2, 4)}),
    "output-shape": lambda: class_logits(torch.zeros(2, 4, 1)),
    "output-not-logits": lambda: jacobian_norm(lambda x: x[:, :, None], torch.zeros(2, 4)),
    "monitor-output-probabilities": lambda: _validate_with(
        JacobianNormMonitor(), _ProbabilitiesOut(), DataLoader(_digits(), batch_size=8)
    ),
    "monitor-output-not-probabilities": lambda: _validate_with(
        GeneralizationGapMonitor(output="probabilities"), MLPClassifier(), DataLoader(_digits(), batch_size=8)
    ),
    "monitor-strategy": lambda: JacobianNormMonitor().setup(
        SimpleNamespace(strategy=FSDPStrategy()), MLPClassifier(), "fit"
    ),
    "monitor-output-not-logits": lambda: _fit(
        [JacobianNormMonitor(every_n_epochs=1, forward_fn=lambda m, x: {"logits": m(x)})]
    ),
    # functional/activations.py
    "no-piecewise-linear-unit": lambda: activation_codes(
        MLPClassifier(activation="tanh"), torch.zeros(2, 1, 8, 8)
    ),
    # functional/jacobian.py
    "jacobian-output": lambda: jacobian_norm(*_model_and_x(), output="probs"),
    "jacobian-method": lambda: jacobian_norm(*_model_and_x(), method="sampled"),
    "jacobian-num-projections": lambda: jacobian_norm(
        *_model_and_x(), method="projection", num_projections=0
    ),
    "jacobian-chunk-size": lambda: jacobian_norm(*_model_and_x(), chunk_size=0),
    "jacobian-generators": lambda: jacobian_norm(
        *_model_and_x(), method="projection", generator=[torch.Generator()]
    ),
    "jacobian-rows-one-at-a-time": lambda: jacobian_norm(_ItemInBackward(), torch.randn(3, 8)),
    "penalty-output": lambda: jacobian_penalty(nn.Linear(4, 3), torch.randn(2, 4), output="probabilities"),
    "penalty-reentrant-checkpoint": lambda: jacobian_penalty(_ReentrantCheckpointed(), torch.randn(3, 8)),
    # functional/trajectories.py
    "trajectory-anchors": lambda: trajectory_through(torch.zeros(2, 4), 16),
    "trajectory-anchors-dtype": lambda: trajectory_through(torch.zeros(3, 4, dtype=torch.long), 16),
    "trajectory-num-points": lambda: trajectory_through(torch.randn(3, 4), 2),
    "ellipse-anchor-shapes": lambda: ellipse_through(torch.zeros(4), torch.zeros(4), torch.zeros(5), 16),
    # functional/transitions.py
    "transitions-method": lambda: count_transitions(MLPClassifier(), _curve(), method="exactly"),
    "transitions-chunk-size": lambda: count_transitions(MLPClassifier(), _curve(), chunk_size=0),
    "transitions-num-points-tensor": lambda: count_transitions(
        MLPClassifier(), _curve().points, num_points=8
    ),
    "transitions-exact-tensor": lambda: count_transitions(MLPClassifier(), _curve().points, method="exact"),
    "transitions-exact-order": lambda: count_transitions(MLPClassifier(), _curve(anchors=5), method="exact"),
    "transitions-exact-segments": lambda: count_transitions(
        MLPClassifier(), _curve(), method="exact", return_segments=True
    ),
    "transitions-sequence-items": lambda: count_transitions(MLPClassifier(), [_curve().points]),
    "transitions-sampled-points": lambda: count_transitions(MLPClassifier(), _curve(num_points=4)),
    "transitions-max-regions": lambda: count_transitions(
        MLPClassifier(), _curve(), method="exact", max_regions=1
    ),
    "transitions-exact-no-units": lambda: count_transitions(
        MLPClassifier(activation="tanh"), _curve(), method="exact"
    ),
    "transitions-exact-not-piecewise-linear": lambda: count_transitions(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _Square(), nn.ReLU(), nn.Linear(16, 10)),
        _curve(),
        method="exact",
    ),
    "transitions-not-affine": _not_affine,
    "transitions-exact-float64-callable": lambda: count_transitions(_PlainWeights(), _curve(), method="exact"),
    "transitions-not-piecewise-linear": lambda: count_transitions(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.ReLU(), nn.Linear(16, 10)), _curve()
    ),
    "density-shapes": lambda: TransitionDensity().update(torch.tensor([1.0, 2.0]), torch.tensor([1.0])),
    "density-arc-length": lambda: TransitionDensity().update(torch.tensor([1.0]), torch.tensor([0.0])),
    "loss-accuracy-loss-fn": lambda: ClassificationLossAccuracy(loss_fn="bce"),
    "loss-accuracy-output": lambda: ClassificationLossAccuracy(output="softmax"),
    "point-records-plot-matplotlib": lambda: _without_matplotlib(PointRecords().plot),
    "point-records-shapes": lambda: PointRecords().update(
        torch.arange(3), torch.ones(2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    ),
    # metrics/jacobian.py
    "jacobian-metric-shape": lambda: JacobianNorm().update(torch.ones(2, 3)),
    "jacobian-metric-keep-values": lambda: JacobianNorm(keep_values=False).per_point(),
}


class _FirstValidationSetEmpty(DigitsDataModule):
    def val_dataloader(self) -> list[DataLoader]:
        empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
        return [DataLoader(empty, batch_size=8), DataLoader(_digits(), batch_size=8)]


# --- tests ---------------------------------------------------------------------------------------------------------

ROWS = read_table()


def test_every_raise_and_warning_has_a_row():
    # Rows are keyed by the class and a piece of the message, never by where the code is: moving a function
    # between files needs no edit here.
    sites = package_sites()
    unlisted = [f"{s.where} raises {s.raised}" for s in sites if not any(_matches(r, s) for r in ROWS)]
    assert unlisted == [], "raises or warnings without a row in docs/errors.md"
    orphans = [row.id for row in ROWS if not any(_matches(row, s) for s in sites)]
    assert orphans == [], "rows whose class and message no raise or warning in the source has"


def test_every_row_has_one_trigger():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(TRIGGERS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_row_is_triggered(row):
    expected = CLASSES[row.raised]
    if issubclass(expected, Warning):
        with pytest.warns(expected, match=re.escape(row.message)):
            TRIGGERS[row.id]()
    else:
        with pytest.raises(expected, match=re.escape(row.message)):
            TRIGGERS[row.id]()


#: Where the monitors read a batch (the batch reader and its lookups) or check what they read (the input's dtype, the
#: output's shape).
READING = (
    "callbacks/_batch.py::_BatchReader.",
    "callbacks/_batch.py::_position",
    "callbacks/_batch.py::_lookup",
    "callbacks/_checks.py::_check_continuous_input",
    "callbacks/_checks.py::_check_classifier_output",
)


def _reading_rows() -> list[Row]:
    sites = [site for site in package_sites() if site.where.startswith(READING)]
    assert sites, "the reader's raises were not found"
    return [row for row in ROWS if any(_matches(row, site) for site in sites)]


@pytest.mark.parametrize("row", _reading_rows(), ids=lambda row: row.id)
def test_every_reading_error_names_the_way_out(row):
    """Every error the monitors raise while reading a batch, or checking the input and output they read, says what
    to pass: ``get_input`` with ``input_key`` or ``forward_fn`` for the input and the output, ``get_target`` with
    ``target_key`` for the labels. The rows are those of the raises in the reader's source, so a new raise there is
    walked too."""
    with pytest.raises(CLASSES[row.raised]) as raised:
        TRIGGERS[row.id]()
    message = str(raised.value)
    if row.id.startswith("target-"):
        assert "get_target" in message and "target_key" in message, message
    elif "output" in row.id:
        assert "forward_fn" in message, message
    else:
        assert "get_input" in message and ("input_key" in message or "forward_fn" in message), message
