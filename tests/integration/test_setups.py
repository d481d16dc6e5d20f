"""Set-ups real projects use, each checked against a direct measurement of the same weights: compiled modules,
one-logit binary classifiers, misconfigured batches and outputs (which fail before the first training step), early
stopping and checkpoints on a logged key, and the exact transition count of a float32 model."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

POINTS = 64


def _monitors(**kwargs: Any) -> list[pl.Callback]:
    return [
        JacobianNormMonitor(max_points=POINTS, every_n_epochs=1, **kwargs),
        GeneralizationGapMonitor(max_train_points=POINTS, every_n_epochs=1, **kwargs),
        TransitionMonitor(num_trajectories=2, num_points=32, every_n_epochs=1, log_figure=False, **kwargs),
    ]


def _direct(model: nn.Module, monitors: list[pl.Callback], dm: DigitsDataModule) -> dict[str, float]:
    """The monitors' values measured here on ``model`` (eager, eval mode)."""
    jacobian, gap, transitions = monitors
    model = model.eval()
    expected = {"sensitivity/jacobian_norm": jacobian_norm(model, dm.x_val[:POINTS]).mean().item()}
    with torch.no_grad():
        expected["generalization/val_loss"] = F.cross_entropy(model(dm.x_val), dm.y_val).item()
        x, y = dm.x_train[gap.train_indices], dm.y_train[gap.train_indices]
        expected["generalization/train_loss"] = F.cross_entropy(model(x), y).item()
    counts = [count_transitions(model, trajectory_through(a, 32)) for a in transitions.anchors["on_manifold"]]
    expected["sensitivity/transitions_on_manifold"] = sum(c.transitions for c in counts) / len(counts)
    return expected


def _eager_copy(model: MLPClassifier) -> MLPClassifier:
    eager = MLPClassifier()
    eager.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()})
    return eager


def _compile(form: str, model: MLPClassifier) -> nn.Module:
    if form == "fit(torch.compile(module))":
        return torch.compile(model)
    if form == "module.compile()":
        model.compile()
    else:
        model.net = torch.compile(model.net)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "form",
    [
        "fit(torch.compile(module))",
        "module.compile()",
        "self.net = torch.compile(net)",
    ],
)
def test_a_compiled_module_is_measured_on_its_eager_original(form):
    pl.seed_everything(0)
    model, dm, monitors = MLPClassifier(), DigitsDataModule(), _monitors()
    trainer = pl.Trainer(
        callbacks=list(monitors), max_epochs=1, limit_train_batches=4, logger=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(_compile(form, model), datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key, value in _direct(_eager_copy(model), monitors, dm).items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_compiled_module_trains_bit_identically_with_the_monitors():
    def run(callbacks):
        pl.seed_everything(0)
        model = MLPClassifier()
        trainer = pl.Trainer(
            callbacks=callbacks, max_epochs=2, limit_train_batches=4, logger=False, accelerator="cpu",
            enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        )
        trainer.fit(torch.compile(model), datamodule=DigitsDataModule())
        return model.state_dict(), trainer.optimizers[0].state_dict()["state"], torch.get_rng_state()

    weights_a, optimizer_a, rng_a = run([])
    weights_b, optimizer_b, rng_b = run(_monitors())
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for index, state in optimizer_a.items():
        assert all(torch.equal(v, optimizer_b[index][k]) for k, v in state.items())
    assert torch.equal(rng_a, rng_b)


# --- one-logit binary classifiers ------------------------------------------------------------------------------


class BinaryDigits(pl.LightningModule):
    """Is the digit a 0-4 or a 5-9? One logit, trained with binary cross-entropy on float labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x)[:, 0], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_bce", F.binary_cross_entropy_with_logits(self(x)[:, 0], y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BinaryData(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_train, (self.y_train >= 5).float()), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_val, (self.y_val >= 5).float()), batch_size=100)


def test_a_one_logit_classifier_gets_the_sign_accuracy_and_the_binary_cross_entropy():
    dm = BinaryData()
    gap = GeneralizationGapMonitor(every_n_epochs=1)
    jacobian = JacobianNormMonitor(max_points=POINTS, every_n_epochs=1)
    trainer, model = train([gap, jacobian], max_epochs=3, model=BinaryDigits(), datamodule=dm)
    model.eval()
    y_val = (dm.y_val >= 5).float()
    with torch.no_grad():
        z = model(dm.x_val)[:, 0]
    accuracy = ((z > 0).float() == y_val).float().mean().item()
    assert accuracy > 0.8  # trained: the share of label 0 (the argmax of one column) would be about 0.5
    logged = trainer.callback_metrics
    assert logged["generalization/val_accuracy"].item() == pytest.approx(accuracy, abs=1e-6)
    bce = F.binary_cross_entropy_with_logits(z, y_val).item()
    assert logged["generalization/val_loss"].item() == pytest.approx(bce, rel=1e-5)
    # the Jacobian of the probabilities (1 - sigmoid(z), sigmoid(z)): sqrt(2) times that of sigmoid(z)
    x = dm.x_val[:POINTS]
    rows = torch.func.vmap(torch.func.jacrev(lambda v: torch.sigmoid(model(v[None]))[0, 0]))(x)
    expected = (2**0.5 * rows.flatten(1).norm(dim=1)).mean().item()
    assert logged["sensitivity/jacobian_norm"].item() == pytest.approx(expected, rel=1e-5)


# --- misconfiguration fails before the first training step -----------------------------------------------------


class DictOutput(MLPClassifier):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": self.net(x)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


class ScalarOutput(DictOutput):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.net(x).sum()


class InputsOnly(DigitsDataModule):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.x_val, batch_size=100)


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    "model, datamodule, error, match",
    [
        (DictOutput(), DigitsDataModule(), ValueError, "got a dict.*forward_fn"),
        (ScalarOutput(), DigitsDataModule(), ValueError, r"\[batch, num_classes\].*got \(\)"),
        (DictOutput(), InputsOnly(), TypeError, "Cannot find the labels"),
    ],
    ids=["dict output", "scalar output", "batches without labels"],
)
@pytest.mark.parametrize("sanity", [True, False], ids=["sanity check", "num_sanity_val_steps=0"])
def test_the_gap_monitor_fails_at_its_first_batch(model, datamodule, error, match, sanity):
    steps = CountSteps()
    # without a sanity check, the first validation batch comes after the first epoch of training
    extra: dict[str, Any] = {} if sanity else {"num_sanity_val_steps": 0, "limit_train_batches": 1}
    with pytest.raises(error, match=match):
        train([GeneralizationGapMonitor(), steps], max_epochs=1, model=copy.deepcopy(model), datamodule=datamodule,
              **extra)
    assert steps.steps == (0 if sanity else 1)


def test_a_dict_output_is_measured_through_forward_fn():
    pick = dict(forward_fn=lambda module, x: module(x)["logits"])
    trainer, model = train(_monitors(**pick), max_epochs=1, model=DictOutput(), limit_train_batches=3)
    plain = MLPClassifier()
    plain.load_state_dict(model.state_dict())
    assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(
        jacobian_norm(plain, DigitsDataModule().x_val[:POINTS]).mean().item(), rel=1e-5
    )


# --- early stopping and checkpoints on a logged key ------------------------------------------------------------


@pytest.mark.parametrize(
    "monitor, key",
    [
        (JacobianNormMonitor(max_points=POINTS), "sensitivity/jacobian_norm"),
        (GeneralizationGapMonitor(max_train_points=POINTS), "generalization/gap_loss"),
        (TransitionMonitor(num_trajectories=1, num_points=16, log_figure=False), "sensitivity/transitions_on_manifold"),
    ],
    ids=["jacobian", "gap", "transitions"],
)
@pytest.mark.parametrize("watcher", [EarlyStopping, ModelCheckpoint])
def test_a_watcher_at_the_default_schedule_fails_at_fit_start_saying_what_to_set(monitor, key, watcher, tmp_path):
    steps = CountSteps()
    options = {"dirpath": tmp_path} if watcher is ModelCheckpoint else {}
    with pytest.raises(MisconfigurationException, match=r"every_n_epochs=1"):
        train(
            [monitor, watcher(monitor=key, **options), steps],
            max_epochs=2,
            limit_train_batches=2,
            enable_checkpointing=watcher is ModelCheckpoint,
            default_root_dir=tmp_path,
        )
    assert steps.steps == 0


@pytest.mark.parametrize(
    "monitor, key",
    [
        (JacobianNormMonitor(max_points=POINTS, every_n_epochs=1), "sensitivity/jacobian_norm"),
        (GeneralizationGapMonitor(max_train_points=POINTS, every_n_epochs=1), "generalization/gap_loss"),
        (
            TransitionMonitor(num_trajectories=1, num_points=16, log_figure=False, every_n_epochs=1),
            "sensitivity/transitions_on_manifold",
        ),
    ],
    ids=["jacobian", "gap", "transitions"],
)
def test_early_stopping_and_checkpoints_work_on_a_key_at_every_n_epochs_1(monitor, key, tmp_path):
    stopping = EarlyStopping(monitor=key, patience=0, mode="max", stopping_threshold=-1e9)
    checkpoint = ModelCheckpoint(monitor=key, dirpath=tmp_path, mode="max")
    trainer, _ = train(
        [monitor, stopping, checkpoint], max_epochs=3, limit_train_batches=2, enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    assert trainer.current_epoch < 3  # the stopping threshold was met at the first check, on the key
    assert checkpoint.best_model_path and float(checkpoint.best_model_score) == pytest.approx(
        float(trainer.callback_metrics[key])
    )


# --- the exact transition count of an ordinary float32 model ---------------------------------------------------


def test_the_exact_transition_count_of_a_float32_model():
    monitor = TransitionMonitor(num_trajectories=1, num_points=16, method="exact", every_n_epochs=1, log_figure=False)
    trainer, model = train([monitor], max_epochs=1, limit_train_batches=3)
    (anchors,) = monitor.anchors["on_manifold"]
    expected = count_transitions(model.eval(), trajectory_through(anchors, 16), method="exact")
    assert trainer.callback_metrics["sensitivity/transitions_on_manifold"].item() == float(int(expected))
