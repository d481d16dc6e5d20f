"""GeneralizationGapMonitor: the gap against a direct evaluation, a fixed and seeded training subset, its loss
function, iterable training data, and the validation step's own logits taken only when they are the monitor's."""


import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor
from tests._logged import gap_values, loss_and_accuracy

KEYS = ["train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"]
FAST = dict(limit_train_batches=3, max_epochs=2)


def _expected(model: pl.LightningModule, dm: DigitsDataModule, indices: Tensor) -> dict[str, float]:
    """The six values, measured directly on ``model`` in eval mode."""
    train, val = (dm.x_train[indices], dm.y_train[indices]), (dm.x_val, dm.y_val)
    return gap_values(model.eval(), train, val)


def _logged(trainer: pl.Trainer, prefix: str = "generalization") -> dict[str, float]:
    return {key: float(trainer.callback_metrics[f"{prefix}/{key}"]) for key in KEYS}


def test_gap_equals_direct_evaluation_on_the_same_subsets():
    dm = DigitsDataModule()
    monitor = GeneralizationGapMonitor(prefix="gen")
    trainer, model = train([monitor], datamodule=dm, **FAST)
    indices = monitor.train_indices
    assert len(indices) == len(dm.x_val) == 539  # as large as the validation set
    assert len(set(indices.tolist())) == len(indices)
    assert _logged(trainer, "gen") == pytest.approx(_expected(model, dm, indices), abs=1e-5)
    assert not model.training  # left as Lightning leaves it after fit; the monitor restored eval mode itself


def test_the_subset_is_capped_and_seeded():
    dm = DigitsDataModule()
    first, same, other = (GeneralizationGapMonitor(max_train_points=100, seed=s) for s in (1, 1, 2))
    trainer, model = train([first], datamodule=dm, limit_train_batches=1, max_epochs=1)
    train([same], datamodule=dm, limit_train_batches=1, max_epochs=1)
    train([other], datamodule=dm, limit_train_batches=1, max_epochs=1)
    assert len(first.train_indices) == 100
    assert torch.equal(first.train_indices, same.train_indices)
    assert not torch.equal(first.train_indices, other.train_indices)
    assert _logged(trainer) == pytest.approx(_expected(model, dm, first.train_indices), abs=1e-5)


def _recording_forward(records: list[tuple[int, Tensor]]):
    def forward(module: pl.LightningModule, x: Tensor) -> Tensor:
        if not module.trainer.sanity_checking:  # the sanity check's forward pass is the configuration check
            records.append((module.trainer.current_epoch, x.detach().clone()))
        return module(x)

    return forward


def test_shuffle_and_augmentation_keep_the_same_training_points():
    dm = DigitsDataModule(augment=True, batch_size=32)
    records: list[tuple[int, Tensor]] = []
    monitor = GeneralizationGapMonitor(
        forward_fn=_recording_forward(records), batch_size=100, every_n_epochs=1
    )
    train([monitor], datamodule=dm, limit_train_batches=2, max_epochs=3)
    num_val = len(dm.x_val)
    per_epoch = [torch.cat([x for epoch, x in records if epoch == e]) for e in range(3)]
    train_inputs = [inputs[num_val:] for inputs in per_epoch]  # validation batches first, then the subset
    assert len(train_inputs[0]) == num_val
    assert torch.equal(train_inputs[0], train_inputs[1]) and torch.equal(train_inputs[0], train_inputs[2])
    # Each evaluated training input is its indexed digit, shifted by at most one pixel (the augmentation).
    originals = dm.x_train[monitor.train_indices]
    padded = F.pad(originals, [1, 1, 1, 1])
    shifts = torch.stack(
        [padded[..., 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )
    matches = (shifts == train_inputs[0]).flatten(2).all(-1).any(0)
    assert matches.all()


def test_state_dict_restores_the_subset():
    dm = DigitsDataModule()
    monitor = GeneralizationGapMonitor(max_train_points=50, seed=3)
    train([monitor], datamodule=dm, limit_train_batches=1, max_epochs=1)
    resumed = GeneralizationGapMonitor(max_train_points=50, seed=4)
    resumed.load_state_dict(monitor.state_dict())
    trainer, model = train([resumed], datamodule=dm, limit_train_batches=1, max_epochs=1)
    assert torch.equal(resumed.train_indices, monitor.train_indices)
    assert _logged(trainer) == pytest.approx(_expected(model, dm, monitor.train_indices), abs=1e-5)
    assert monitor.state_key != GeneralizationGapMonitor(prefix="other").state_key


def test_loss_fn_per_point_or_mean_and_another_loss():
    dm = DigitsDataModule()
    per_point = GeneralizationGapMonitor(
        loss_fn=lambda z, y: F.cross_entropy(z, y, reduction="none"), prefix="a"
    )
    margin = GeneralizationGapMonitor(loss_fn=F.multi_margin_loss, prefix="b")
    trainer, model = train([per_point, margin], datamodule=dm, limit_train_batches=1, max_epochs=1)
    assert _logged(trainer, "a") == pytest.approx(_expected(model, dm, per_point.train_indices), abs=1e-5)
    model.eval()
    with torch.no_grad():
        val_margin = F.multi_margin_loss(model(dm.x_val), dm.y_val).item()
    assert float(trainer.callback_metrics["b/val_loss"]) == pytest.approx(val_margin, abs=1e-6)


class _Stream(IterableDataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        order = torch.randperm(len(self.x))  # global RNG, as a shuffling stream would
        return iter(zip(self.x[order], self.y[order], strict=True))


class _StreamData(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.x_train, self.y_train), batch_size=64)


def test_iterable_dataset_uses_the_first_batches():
    dm = _StreamData()
    monitor = GeneralizationGapMonitor(max_train_points=100, batch_size=64)
    trainer, model = train([monitor], datamodule=dm, limit_train_batches=2, max_epochs=2)
    assert torch.equal(monitor.train_indices, torch.arange(128))  # two whole batches of 64 hold 100 points
    torch.manual_seed(monitor.seed)  # the monitor reads the stream with the global RNG seeded by `seed`
    x, y = next(iter(DataLoader(_Stream(dm.x_train, dm.y_train), batch_size=128)))
    with torch.no_grad():
        train_loss, train_acc = loss_and_accuracy(model.eval()(x), y)
    assert float(trainer.callback_metrics["generalization/train_loss"]) == pytest.approx(train_loss, abs=1e-5)
    assert float(trainer.callback_metrics["generalization/train_accuracy"]) == pytest.approx(
        train_acc, abs=1e-6
    )


class _NoValidation(MLPClassifier):
    validation_step = pl.LightningModule.validation_step


def test_misconfiguration_fails_early():
    with pytest.raises(ValueError, match="every_n_epochs"):
        GeneralizationGapMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_train_points"):
        GeneralizationGapMonitor(max_train_points=0)
    with pytest.raises(MisconfigurationException, match="validation_step"):
        train([GeneralizationGapMonitor()], model=_NoValidation(), max_epochs=1)
    with pytest.raises(MisconfigurationException, match="limit_val_batches"):
        train([GeneralizationGapMonitor()], max_epochs=1, limit_val_batches=0)


class _CountingForward(MLPClassifier):
    """Counts the points of every forward call outside the training step, and can validate on a copy of ``x``, or
    in train mode with dropout (whose logits are not the eval-mode ones)."""

    def __init__(self, validate_on: str = "x") -> None:
        super().__init__()
        self.validate_on = validate_on
        self.points = 0
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        if not self.training:
            self.points += len(x)
        return self.net(self.dropout(x)) / temperature

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.validate_on == "copy":
            x = x.clone()
        elif self.validate_on == "train mode":
            self.train()
        if self.validate_on == "other arguments":  # not the logits `self(x)` gives: not to be taken
            self.log("val_loss", F.cross_entropy(self(x, temperature=3.0), y))
            self.eval()
            return
        self.log("val_loss", F.cross_entropy(self(x), y))
        self.eval()


@pytest.mark.parametrize("validate_on", ["x", "copy", "train mode", "other arguments"])
def test_the_validation_steps_own_logits_are_used_only_when_they_are_the_monitors(validate_on):
    dm = DigitsDataModule()
    model = _CountingForward(validate_on)
    monitor = GeneralizationGapMonitor(every_n_epochs=1)
    trainer, _ = train([monitor], datamodule=dm, model=model, limit_train_batches=3, max_epochs=1,
                       num_sanity_val_steps=0)
    num_val, num_train = len(dm.x_val), len(monitor.train_indices)
    # validation_step's own calls (eval mode for "x" and "copy"), the checks of the first training batch (there is
    # no sanity check) and of the first validation batch (two points each), the subset, and the monitor's second pass
    # over the validation batches unless it could take the module's logits
    own = num_val if validate_on != "train mode" else 0
    second = 0 if validate_on == "x" else num_val
    assert model.points == own + 2 + 2 + num_train + second
    torch.manual_seed(0)  # dropout is off in eval mode: the values are the eval-mode ones in every case
    assert _logged(trainer) == pytest.approx(_expected(model, dm, monitor.train_indices), abs=1e-5)
