"""The TensorBoard dashboard layout and the hparam metrics, read back from the event files."""

import glob
import re

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

KEYS = ["train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"]
FAST = dict(limit_train_batches=2, max_epochs=2)


def _tag_count(log_dir: str, tag: str) -> int:
    """How many summary values with ``tag`` the run's event files hold."""
    return sum(
        value.tag == tag
        for path in glob.glob(f"{log_dir}/events.out.tfevents.*")
        for event in EventFileLoader(path).Load()
        for value in event.summary.value
    )


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir)
    events.Reload()
    return events


def _hparams_summaries(log_dir: str) -> list[set[str]]:
    """The metric tags of each hparams experiment summary in the run's event files, in the order written."""
    return [
        {info.name.tag for info in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos}
        for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*"))
        for event in EventFileLoader(path).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/experiment"
        for content in [value.metadata.plugin_data.content]
    ]


def _layout(log_dir: str) -> dict[str, list[str]]:
    tensor = _events(log_dir).Tensors("custom_scalars__config__")[-1].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor.string_val[0])
    (category,) = layout.category
    return {chart.title: list(chart.multiline.tag) for chart in category.chart}


def test_layout_is_written_once_and_names_the_charts(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [GeneralizationGapMonitor(prefix="generalization"), GeneralizationGapMonitor(prefix="gen2")]
    trainer, model = train(monitors, logger=logger, **FAST)
    # a second fit on the same trainer: every monitor registers again, on the same writer, and adds nothing
    trainer.fit(model, datamodule=DigitsDataModule())
    logger.experiment.flush()
    assert _tag_count(logger.log_dir, "custom_scalars__config__") == 1
    # Only keys that are logged are charted: no Jacobian norm or transition density without their monitors.
    assert _layout(logger.log_dir) == {
        "Jacobian norm beside the generalization gap (loss)": [
            "^generalization/gap_loss$",
            "^gen2/gap_loss$",
        ],
        "Loss in eval mode: training subset against validation": [
            "^generalization/train_loss$",
            "^generalization/val_loss$",
            "^gen2/train_loss$",
            "^gen2/val_loss$",
        ],
    }


def test_layout_and_hparam_metrics_follow_each_monitors_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [
        JacobianNormMonitor(prefix="sens", max_points=16),
        GeneralizationGapMonitor(prefix="gen", max_train_points=16),
        TransitionMonitor(prefix="tr", num_trajectories=1, num_points=16, log_figure=False),
    ]
    trainer, _ = train(monitors, logger=logger, model=MLPClassifier(lr=0.03), **FAST)
    logger.experiment.flush()
    assert _layout(logger.log_dir) == {
        "Jacobian norm beside the generalization gap (loss)": ["^sens/jacobian_norm$", "^gen/gap_loss$"],
        "Loss in eval mode: training subset against validation": ["^gen/train_loss$", "^gen/val_loss$"],
        "Transition density: on against off the data manifold": [
            "^tr/transition_density_on_manifold$",
            "^tr/transition_density_off_manifold$",
        ],
    }
    content = _events(logger.log_dir).PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert metric_tags == {"hp_metric", "sens/jacobian_norm", "sens/jacobian_loss_spearman"} | {
        f"gen/{k}" for k in KEYS
    } | {
        f"tr/{k}_{side}_manifold"
        for k in ("transition_density", "transitions", "transitions_resolution")
        for side in ("on", "off")
    }
    # every scalar in the hparams is one the run logged
    logged = set(_events(logger.log_dir).Tags()["scalars"])
    assert metric_tags - {"hp_metric"} <= logged


def test_hparam_metrics_are_the_final_values(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, model = train(
        [GeneralizationGapMonitor(every_n_epochs=1)], logger=logger, model=MLPClassifier(lr=0.03), **FAST
    )
    final = {key: float(trainer.callback_metrics[f"generalization/{key}"]) for key in KEYS}
    # A second fit on the same trainer (its monitors declare their hparam metrics again) adds none of ours.
    trainer.fit(model, datamodule=DigitsDataModule())
    logger.experiment.flush()
    # Ours, then Lightning's own (hp_metric only, once per fit), which TensorBoard ignores: it keeps a run's
    # first summary.
    ours = {f"generalization/{k}" for k in KEYS} | {"hp_metric"}
    assert _hparams_summaries(logger.log_dir) == [ours, {"hp_metric"}, {"hp_metric"}]

    events = _events(logger.log_dir)
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {f"generalization/{k}" for k in KEYS} | {"hp_metric"} == metric_tags  # only the keys logged
    assert {"lr", "hidden_sizes", "activation", "optimizer"} <= {h.name for h in experiment.hparam_infos}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["lr"].number_value == 0.03
    assert session.session_start_info.hparams["hidden_sizes"].string_value == "(128, 128)"
    # TensorBoard takes each metric's value from the last point of its scalar: the final logged value, and no
    # point was added to the chart for it.
    for key in KEYS:
        points = events.Scalars(f"generalization/{key}")
        assert len(points) == 2
        assert points[-1].value == final[key]


class _NoHyperparameters(MLPClassifier):
    def save_hyperparameters(self, *args, **kwargs) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _PlainData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        from examples.digits import DigitsDataModule

        self._digits = DigitsDataModule()
        self.train_dataloader = self._digits.train_dataloader
        self.val_dataloader = self._digits.val_dataloader


def test_no_hparam_metrics_without_hyperparameters(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    train(
        [GeneralizationGapMonitor()],
        logger=logger,
        model=_NoHyperparameters(),
        datamodule=_PlainData(),
        **FAST,
    )
    logger.experiment.flush()
    assert _tag_count(logger.log_dir, "_hparams_/experiment") == 0


def _layout_regexes(events: EventAccumulator) -> list[str]:
    (config,) = events.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return [tag for category in layout.category for chart in category.chart for tag in chart.multiline.tag]


def test_dashboard_charts_only_logged_keys(prefixed_run):
    events = prefixed_run.events
    scalars = events.Tags()["scalars"]
    regexes = _layout_regexes(events)
    assert regexes, "no custom-scalars chart"
    # TensorBoard's custom-scalars plugin selects tags with `re.match`
    unmatched = [regex for regex in regexes if not any(re.match(regex, tag) for tag in scalars)]
    assert not unmatched, f"charted but never logged: {unmatched}"


def test_hparams_metrics_hold_every_logged_key(prefixed_run):
    events = prefixed_run.events
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    logged = {tag for tag in events.Tags()["scalars"] if tag.startswith(("sens/", "gen/"))}
    assert logged <= metrics, f"logged but not an hparams metric: {sorted(logged - metrics)}"
