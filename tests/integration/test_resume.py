"""Stop, resume from the checkpoint: every monitor's logged series is the uninterrupted one, and the
``TransitionMonitor`` measures along the same trajectories."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import TransitionMonitor
from tests.integration._helpers import all_monitors, fit_digits, scalar_series

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:lightning")]

EPOCHS = 3
#: Each monitor with its random stream in use: projections, anchors, the training subset.
OVERRIDES = {"JacobianNormMonitor": {"method": "projection", "num_projections": 3}}


def interrupted_series(tmp_path, monitor):
    checkpoints = tmp_path / "checkpoints"
    first = TensorBoardLogger(tmp_path, name="first")
    fit_digits(
        [*all_monitors(**OVERRIDES), ModelCheckpoint(checkpoints, monitor=monitor, save_last=True)],
        max_epochs=1,
        logger=first,
        enable_checkpointing=True,
    )
    second = TensorBoardLogger(tmp_path, name="second")
    fit_digits(
        all_monitors(**OVERRIDES),
        max_epochs=EPOCHS,
        logger=second,
        ckpt_path=str(checkpoints / "last.ckpt"),
    )
    before, after = scalar_series(first.log_dir), scalar_series(second.log_dir)
    return {key: before.get(key, []) + after.get(key, []) for key in before.keys() | after.keys()}


# With `monitor=None` the checkpoint is written at the end of the training epoch; with a monitored validation
# metric, at the end of validation, before `on_train_epoch_end`.
@pytest.mark.slow
@pytest.mark.parametrize("monitor", [None, "val_loss"])
def test_resumed_series_equal_the_uninterrupted_ones(tmp_path, monitor):
    logger = TensorBoardLogger(tmp_path, name="uninterrupted")
    fit_digits(all_monitors(**OVERRIDES), max_epochs=EPOCHS, logger=logger)
    expected = scalar_series(logger.log_dir)
    # every key and its watch twin, and the transitions' two resolutions (full measurement only)
    assert len(expected) == 2 * (2 + 4 + 6) + 2
    resumed = interrupted_series(tmp_path, monitor)
    assert resumed.keys() == expected.keys()
    for key, series in expected.items():
        assert len(series) == EPOCHS, key
        assert [step for step, _ in resumed[key]] == [step for step, _ in series], key
        assert [value for _, value in resumed[key]] == pytest.approx(
            [value for _, value in series], rel=1e-6
        ), key


def _transition_monitor() -> TransitionMonitor:
    return TransitionMonitor(num_trajectories=2, num_points=128, every_n_epochs=1)


def test_resume_from_a_checkpoint_measures_the_same_trajectories(tmp_path):
    first = _transition_monitor()
    trainer, _ = train([first], max_epochs=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)

    second = _transition_monitor()
    resumed = pl.Trainer(
        max_epochs=3, accelerator="cpu", callbacks=[second], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    resumed.fit(MLPClassifier(), datamodule=DigitsDataModule(), ckpt_path=path)
    assert resumed.current_epoch == 3
    for kind in ("on_manifold", "off_manifold"):
        assert torch.equal(second.anchors[kind], first.anchors[kind])
    assert torch.equal(second.state_dict()["generator_state"], first.state_dict()["generator_state"])
    assert "sensitivity/transition_density_on_manifold" in resumed.callback_metrics
