"""Stop after epoch 1, resume from the checkpoint: every monitor's logged series is the uninterrupted one."""

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from tests.integration._helpers import all_monitors, fit_digits, scalar_series

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning:lightning")]

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
@pytest.mark.parametrize("monitor", [None, "val_loss"])
def test_resumed_series_equal_the_uninterrupted_ones(tmp_path, monitor):
    logger = TensorBoardLogger(tmp_path, name="uninterrupted")
    fit_digits(all_monitors(**OVERRIDES), max_epochs=EPOCHS, logger=logger)
    expected = scalar_series(logger.log_dir)
    assert len(expected) == 2 + 4 + 6
    resumed = interrupted_series(tmp_path, monitor)
    assert resumed.keys() == expected.keys()
    for key, series in expected.items():
        assert len(series) == EPOCHS, key
        assert [step for step, _ in resumed[key]] == [step for step, _ in series], key
        assert [value for _, value in resumed[key]] == pytest.approx(
            [value for _, value in series], rel=1e-6
        ), key
