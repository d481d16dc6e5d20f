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


WATCH_CATEGORY = "Every pass, on the watch set (sensitivity and generalization, Novak et al. 2018)"
FULL_CATEGORY = "Full measurement: every n-th pass and the last (sensitivity and generalization, Novak et al. 2018)"
LOSS_PAIR = "Loss: validation (line), down to the training subset (band)"
ACCURACY_PAIR = "Accuracy: training subset (line), down to validation (band)"


def _layout(log_dir: str) -> dict[str, dict[str, list[str]]]:
    """``{category: {chart: tags}}``: a multiline chart's tag regexes, or a margin chart's value, lower and upper tags
    (one series each)."""
    tensor = _events(log_dir).Tensors("custom_scalars__config__")[-1].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor.string_val[0])
    return {
        category.title: {
            chart.title: list(chart.multiline.tag)
            or [tag for series in chart.margin.series for tag in (series.value, series.lower, series.upper)]
            for chart in category.chart
        }
        for category in layout.category
    }


def test_layout_is_written_once_and_names_the_charts(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [GeneralizationGapMonitor(prefix="generalization"), GeneralizationGapMonitor(prefix="gen2")]
    trainer, model = train(monitors, logger=logger, **FAST)
    # a second fit on the same trainer: every monitor registers again, on the same writer, and adds nothing
    trainer.fit(model, datamodule=DigitsDataModule())
    logger.experiment.flush()
    assert _tag_count(logger.log_dir, "custom_scalars__config__") == 1
    # Only keys that are logged are charted: no Jacobian norm or transition density without their monitors. A
    # margin chart holds one series: the first monitor's.
    layout = _layout(logger.log_dir)
    assert list(layout) == [WATCH_CATEGORY, FULL_CATEGORY]
    assert layout[FULL_CATEGORY] == {
        "Loss gap: validation loss - training-subset loss": ["^generalization/gap_loss$", "^gen2/gap_loss$"],
        "Accuracy gap: training-subset accuracy - validation accuracy": [
            "^generalization/gap_accuracy$",
            "^gen2/gap_accuracy$",
        ],
        LOSS_PAIR: ["generalization/val_loss", "generalization/train_loss", "generalization/val_loss"],
        ACCURACY_PAIR: [
            "generalization/train_accuracy",
            "generalization/val_accuracy",
            "generalization/train_accuracy",
        ],
    }
    assert layout[WATCH_CATEGORY] == {
        title: [tag.replace("$", "_watch$") if tag.endswith("$") else f"{tag}_watch" for tag in tags]
        for title, tags in layout[FULL_CATEGORY].items()
    }


def test_layout_and_hparam_metrics_follow_each_monitors_prefix(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitors = [
        JacobianNormMonitor(prefix="sens", max_points=16),
        GeneralizationGapMonitor(prefix="gen", max_train_points=16),
        TransitionMonitor(prefix="tr", num_trajectories=1, num_points=16, log_figure=False, watch_segments=0),
    ]
    trainer, _ = train(monitors, logger=logger, model=MLPClassifier(lr=0.03), **FAST)
    logger.experiment.flush()
    layout = _layout(logger.log_dir)
    assert layout[FULL_CATEGORY] == {
        "Jacobian norm: mean over the validation points": ["^sens/jacobian_norm$"],
        "Loss gap: validation loss - training-subset loss": ["^gen/gap_loss$"],
        "Accuracy gap: training-subset accuracy - validation accuracy": ["^gen/gap_accuracy$"],
        LOSS_PAIR: ["gen/val_loss", "gen/train_loss", "gen/val_loss"],
        ACCURACY_PAIR: ["gen/train_accuracy", "gen/val_accuracy", "gen/train_accuracy"],
        "Transition density ON the data manifold (per unit arc length)": ["^tr/transition_density_on_manifold$"],
        "Transition density OFF the data manifold (per unit arc length)": ["^tr/transition_density_off_manifold$"],
        "Spearman correlation of per-point Jacobian norm and loss": ["^sens/jacobian_loss_spearman$"],
        "Transitions per trajectory ON the data manifold": ["^tr/transitions_on_manifold$"],
        "Transitions per trajectory OFF the data manifold": ["^tr/transitions_off_manifold$"],
        "Resolution of the transition density ON the manifold (its share missed on every other point)": [
            "^tr/transitions_resolution_on_manifold$"
        ],
        "Resolution of the transition density OFF the manifold (its share missed on every other point)": [
            "^tr/transitions_resolution_off_manifold$"
        ],
    }
    # the transitions' watch set is off: their charts are in the full category only
    assert not [title for title in layout[WATCH_CATEGORY] if "ransition" in title]
    assert len(layout[WATCH_CATEGORY]) == 6
    content = _events(logger.log_dir).PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = [info.name.tag for info in experiment.metric_infos]
    # the gaps and the Jacobian norm first (the HPARAMS tab shows the first few), the full measurement's keys only
    assert metric_tags[:3] == ["gen/gap_accuracy", "gen/gap_loss", "sens/jacobian_norm"]
    assert set(metric_tags) == {"hp_metric", "sens/jacobian_norm", "sens/jacobian_loss_spearman"} | {
        f"gen/{k}" for k in KEYS
    } | {
        f"tr/{k}_{side}_manifold"
        for k in ("transition_density", "transitions", "transitions_resolution")
        for side in ("on", "off")
    }
    # every scalar in the hparams is one the run logged
    logged = set(_events(logger.log_dir).Tags()["scalars"])
    assert set(metric_tags) - {"hp_metric"} <= logged


def test_no_chart_mixes_two_quantities_and_every_headline_key_is_charted():
    """Each chart draws one quantity (a margin chart: one quantity on the two sets it compares), so the Jacobian norm
    (around 1) never shares an axis with a loss gap (around 3); every scalar the monitors log, but their timings, is
    in a chart, the watch keys in the watch category and the full measurement's in the other."""
    from lightning_sensitivity.callbacks._dashboard import _dashboard_layout

    monitors = [JacobianNormMonitor(log_seconds=True), TransitionMonitor(), GeneralizationGapMonitor()]
    layout = _dashboard_layout(monitors)
    assert list(layout) == [WATCH_CATEGORY, FULL_CATEGORY]
    charted: dict[str, set[str]] = {}
    for category, charts in layout.items():
        for title, (kind, tags) in charts.items():
            names = {tag.strip("^$") for tag in tags}
            quantities = {name.split("/")[-1].removesuffix("_watch").removeprefix("train_").removeprefix("val_")
                          for name in names}
            assert len(quantities) == 1, (title, names)
            assert (kind == "Margin") == (len(names) == 2), title
            assert all(name.endswith("_watch") == (category == WATCH_CATEGORY) for name in names), title
            charted.setdefault(category, set()).update(names)
    headline = {key for m in monitors for key in m.logged_keys("scalar") if not key.endswith("_seconds")}
    assert charted[WATCH_CATEGORY] | charted[FULL_CATEGORY] == headline
    assert "sensitivity/jacobian_norm" in charted[FULL_CATEGORY]
    assert "generalization/gap_accuracy_watch" in charted[WATCH_CATEGORY]


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


def _layout_tags(events: EventAccumulator) -> list[str]:
    """Every tag of the layout: the regexes of its multiline charts, the names of its margin charts' series."""
    (config,) = events.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return [
        tag
        for category in layout.category
        for chart in category.chart
        for tag in [
            *chart.multiline.tag,
            *(f"^{re.escape(t)}$" for s in chart.margin.series for t in (s.value, s.lower, s.upper)),
        ]
    ]


def test_dashboard_charts_only_logged_keys(prefixed_run):
    events = prefixed_run.events
    scalars = events.Tags()["scalars"]
    regexes = _layout_tags(events)
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
    full = {tag for tag in logged if not tag.endswith("_watch")}
    assert full <= metrics, f"logged but not an hparams metric: {sorted(full - metrics)}"
    # the watch keys are not: the full measurement's final values are the run's
    assert len(logged - full) >= 10 and not (logged - full) & metrics
