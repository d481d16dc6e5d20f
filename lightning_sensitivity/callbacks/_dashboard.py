"""The monitors' TensorBoard dashboard: one custom-scalars layout, and the monitors' values as the hparam metrics
of the run. (Histograms and figures go through the logging module, to every logger that takes them.)

Every monitor calls :func:`_register_dashboard` from ``on_fit_start`` with all the monitors of the trainer; it acts
once per run however many monitors call it. The charts and the hparam metrics come from each monitor's registry of
logged keys, under its own prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.tensorboard.summary import hparams

from lightning_sensitivity.callbacks._logging import _file_loggers, _tensorboard_writers

#: The suffix of a watch key (``_base.WATCH``, which imports this module).
WATCH = "_watch"

@dataclass(frozen=True)
class _Chart:
    """A chart of the dashboard, named by the keys it draws (names in the monitors' registries, without prefix): one
    key is a line per run; three keys are a margin chart, a line for the first and a band between the other two."""

    title: str
    keys: tuple[str, ...]


#: The dashboard's charts, in the order TensorBoard shows them (its margin charts after the others). Each chart holds
#: one quantity on one scale, so no line leaves its axis for another's range, and TensorBoard, which colours the lines
#: by run, needs no second colour: a pair compared on one scale (the training subset against validation) is a margin
#: chart, a line and a band whose other edge is the partner, so the band's height is the gap. They are drawn twice, in
#: two categories: for the watch keys (every pass) and for the full measurement.
CHARTS = (
    _Chart("Jacobian norm: mean over the validation points", ("jacobian_norm",)),
    _Chart("Loss gap: validation loss - training-subset loss", ("gap_loss",)),
    _Chart("Accuracy gap: training-subset accuracy - validation accuracy", ("gap_accuracy",)),
    _Chart("Transition density ON the data manifold (per unit arc length)", ("transition_density_on_manifold",)),
    _Chart("Transition density OFF the data manifold (per unit arc length)", ("transition_density_off_manifold",)),
    _Chart("Spearman correlation of per-point Jacobian norm and loss", ("jacobian_loss_spearman",)),
    _Chart("Transitions per trajectory ON the data manifold", ("transitions_on_manifold",)),
    _Chart("Transitions per trajectory OFF the data manifold", ("transitions_off_manifold",)),
    _Chart(
        "Resolution of the transition density ON the manifold (its share missed on every other point)",
        ("transitions_resolution_on_manifold",),
    ),
    _Chart(
        "Resolution of the transition density OFF the manifold (its share missed on every other point)",
        ("transitions_resolution_off_manifold",),
    ),
    _Chart(
        "Accuracy: training subset (line), down to validation (band)",
        ("train_accuracy", "val_accuracy", "train_accuracy"),
    ),
    _Chart("Loss: validation (line), down to the training subset (band)", ("val_loss", "train_loss", "val_loss")),
)
_PAPER = "sensitivity and generalization, Novak et al. 2018"
#: The two categories of the layout: the watch keys (suffix ``_watch``), then the full measurement's.
CATEGORIES = (
    (WATCH, f"Every pass, on the watch set ({_PAPER})"),
    ("", f"Full measurement: every n-th pass and the last ({_PAPER})"),
)
#: The keys the HPARAMS tab lists first (it shows a few metrics by default): the generalization gaps and the Jacobian
#: norm, whose relation is the paper's first finding. The other keys follow in the monitors' order.
HPARAMS_FIRST = ("gap_accuracy", "gap_loss", "jacobian_norm")


def _first_time(obj: Any, what: str) -> bool:
    """True the first time it is asked about ``what`` for ``obj``, False afterwards.

    The mark lives on the object (a writer, a trainer), not in this module: a module can be imported twice (pytest
    imports every module again for its doctests), and both copies must agree.
    """
    flag = f"_lightning_sensitivity_{what}"
    if getattr(obj, flag, False):
        return False
    setattr(obj, flag, True)
    return True


def _exact_tag(key: str) -> str:
    # The custom-scalars plugin matches tags with `re.match`: anchor the end too, so that
    # `sensitivity/jacobian_norm` does not also pull in `sensitivity/jacobian_norm_<anything>`.
    return f"^{re.escape(key)}$"


def _dashboard_layout(monitors: Sequence[Any]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: the charts of :data:`CHARTS` that the given monitors log, with the keys under their
    own prefixes, for the watch keys (when a monitor's watch set is on) and for the full measurement, each in its own
    category. A chart no monitor logs is left out; several monitors that log its keys each add their lines.

    >>> from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor
    >>> layout = _dashboard_layout([JacobianNormMonitor(prefix="sens"), GeneralizationGapMonitor(prefix="gen")])
    >>> watch, full = layout.values()
    >>> full["Jacobian norm: mean over the validation points"]
    ['Multiline', ['^sens/jacobian_norm$']]
    >>> watch["Loss: validation (line), down to the training subset (band)"]
    ['Margin', ['gen/val_loss_watch', 'gen/train_loss_watch', 'gen/val_loss_watch']]
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for suffix, category in CATEGORIES:
        charts: dict[str, list[Any]] = {}
        for chart in CHARTS:
            for monitor in monitors:
                logged = set(monitor.logged_keys("scalar"))
                tags = [f"{monitor.prefix}/{name}{suffix}" for name in chart.keys]
                if not all(tag in logged for tag in tags):
                    continue
                if len(tags) == 1:
                    charts.setdefault(chart.title, ["Multiline", []])[1].append(_exact_tag(tags[0]))
                elif chart.title not in charts:  # a margin chart holds one series
                    charts[chart.title] = ["Margin", tags]
        if charts:
            layout[category] = charts
    return layout


def _register_dashboard(trainer: pl.Trainer, monitors: Sequence[Any]) -> None:
    """Write the dashboard layout of ``monitors`` (every monitor of the trainer) to every TensorBoard logger of the
    trainer, once per writer, and declare their keys as the hparam metrics (:func:`_log_hparam_metrics`). Every
    monitor calls it from ``on_fit_start``; the first call does the work.

    Says once per trainer (``rank_zero_info``) what does not reach a logger its own way: without a TensorBoard logger,
    that the layout is skipped; for a logger with no API for histograms and images (``CSVLogger``, ...), the directory
    where they go as PNG files, with the per-point records as CSV files.
    """
    writers = _tensorboard_writers(trainer)
    if _first_time(trainer, "told_where_media_go"):
        said = []
        if not writers:
            loggers = [type(logger).__name__ for logger in trainer.loggers] or ["no logger"]
            said.append(f"the trainer has no TensorBoardLogger ({', '.join(loggers)}), so the dashboard layout is skipped")
        said += [
            f"{name} has no API for histograms and figures: they go, with the per-point records, to PNG and CSV files "
            f"under {directory}"
            for name, directory in _file_loggers(trainer).items()
        ]
        if said:
            rank_zero_info(f"lightning_sensitivity: {'; '.join(said)}.")
    if not writers:
        return
    layout = _dashboard_layout(monitors)
    for writer in writers:
        if _first_time(writer, "dashboard"):
            writer.add_custom_scalars(layout)
    _log_hparam_metrics(trainer, trainer.lightning_module, monitors)


def _hyperparameters(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """The hyper-parameters Lightning logs at the start of a fit (the data module's, then the module's), flattened
    to the numbers, booleans and strings an hparams summary holds.

    >>> _flat_params({"lr": 0.1, "net": {"hidden_sizes": (128, 128)}, "act": "relu", "ckpt": None})
    {'lr': 0.1, 'net/hidden_sizes': '(128, 128)', 'act': 'relu'}
    """
    params: dict[str, Any] = {}
    datamodule = trainer.datamodule
    if datamodule is not None:
        params.update(datamodule.hparams_initial)
    params.update(pl_module.hparams_initial)
    return _flat_params(params)


def _flat_params(params: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def _hparam_metrics(monitors: Sequence[Any]) -> list[str]:
    """The monitors' keys that are the run's hparam metrics: the full measurement's scalars (the final values; the
    watch keys' last points are the watch subset of the same measurement), :data:`HPARAMS_FIRST` first.

    >>> from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor
    >>> _hparam_metrics([JacobianNormMonitor(), GeneralizationGapMonitor()])[:4]
    ['generalization/gap_accuracy', 'generalization/gap_loss', 'sensitivity/jacobian_norm', 'sensitivity/jacobian_loss_spearman']
    """
    keys = [key for monitor in monitors for key in monitor.logged_keys("scalar", watch=False)]
    first = [key for name in HPARAMS_FIRST for key in keys if key.rsplit("/", 1)[-1] == name]
    return first + [key for key in keys if key not in first]


def _log_hparam_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule, monitors: Sequence[Any]) -> None:
    """Make the monitors' keys the hparam metrics of the run, so the HPARAMS tab compares the runs of a sweep by
    their final ``sensitivity/*`` and ``generalization/*`` values.

    TensorBoard keeps the *first* hparams summary of a run and reads each metric's value from the last point of the
    scalar with the metric's name. So this writes, when the module (or data module) saved hyper-parameters, one
    hparams summary that names those hyper-parameters and the monitors' full-measurement keys
    (:func:`_hparam_metrics`; ``hp_metric`` too when the logger logs it), before Lightning writes its own just after
    ``on_fit_start``. The final values then come from the scalars the monitors log, and nothing is logged twice.
    :func:`_register_dashboard` calls this; it acts once per trainer, and a later call (say from ``on_fit_end``) does
    nothing.
    """
    if not _first_time(trainer, "hparam_metrics"):
        return
    params = _hyperparameters(trainer, pl_module)
    if not params:
        return
    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    metrics = dict.fromkeys(_hparam_metrics(monitors), 0.0)
    if any(logger._default_hp_metric for logger in loggers):
        metrics["hp_metric"] = -1.0
    experiment, session_start, session_end = hparams(params, metrics)
    for writer in _tensorboard_writers(trainer):
        # The run's own event file (SummaryWriter.add_hparams would open a new run in a subdirectory).
        file_writer = writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
