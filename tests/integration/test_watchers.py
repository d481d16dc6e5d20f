"""``EarlyStopping`` and ``ModelCheckpoint`` watching a monitor's key: at the monitors' default schedule a full key is
not logged every validation pass, and the fit fails at its start saying what to set (its ``_watch`` twin, or
``every_n_epochs=1``); on a ``_watch`` key at the defaults, or on a full key with ``every_n_epochs=1``, both callbacks
work."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from examples.digits import train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from tests.integration._helpers import CountSteps

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

POINTS = 64


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


def test_a_watcher_of_a_full_key_at_the_defaults_is_told_of_the_watch_key(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"'sensitivity/jacobian_norm_watch'.*every_n_epochs=1"):
        train([JacobianNormMonitor(max_points=16), EarlyStopping("sensitivity/jacobian_norm")], max_epochs=2)


@pytest.mark.parametrize(
    "monitor, key",
    [
        (JacobianNormMonitor(max_points=POINTS, every_n_epochs=1), "sensitivity/jacobian_norm"),
        (GeneralizationGapMonitor(max_train_points=POINTS, every_n_epochs=1), "generalization/gap_loss"),
        (
            TransitionMonitor(num_trajectories=1, num_points=16, log_figure=False, every_n_epochs=1),
            "sensitivity/transitions_on_manifold",
        ),
        (JacobianNormMonitor(max_points=16), "sensitivity/jacobian_norm_watch"),
        (GeneralizationGapMonitor(max_train_points=32), "generalization/gap_loss_watch"),
        (
            TransitionMonitor(num_trajectories=1, num_points=16, log_figure=False),
            "sensitivity/transitions_on_manifold_watch",
        ),
    ],
    ids=["jacobian", "gap", "transitions", "jacobian-watch", "gap-watch", "transitions-watch"],
)
def test_early_stopping_and_checkpoints_work_on_a_key_logged_at_every_pass(monitor, key, tmp_path):
    """A full key with ``every_n_epochs=1``, or a ``_watch`` key at the defaults."""
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
