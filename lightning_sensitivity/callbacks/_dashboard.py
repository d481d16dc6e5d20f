"""The monitors' TensorBoard dashboard: one custom-scalars layout, and the monitors' values as the hparam metrics
of the run. (Histograms and figures go through the logging module, to every logger that takes them.)

Every monitor calls :func:`_register_dashboard` from ``on_fit_start`` with all the monitors of the trainer; it acts
once per run however many monitors call it. The charts and the hparam metrics come from each monitor's registry of
logged keys, under its own prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.tensorboard.summary import hparams

from lightning_sensitivity.callbacks._logging import _tensorboard_writers

_DASHBOARD_CATEGORY = "sensitivity and generalization (Novak et al. 2018)"
#: The charts of the dashboard; each monitor names, in its registry of keys, the chart each of its scalars goes to.
JACOBIAN_BESIDE_GAP = "Jacobian norm beside the generalization gap (loss)"
DENSITY_ON_OFF = "Transition density: on against off the data manifold"
EVAL_LOSSES = "Loss in eval mode: training subset against validation"


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
    """The custom-scalars layout: one category, one chart per comparison the paper makes, each holding the keys
    the given monitors log into it (under their own prefixes). A chart no monitor logs into is left out.

    >>> from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor
    >>> charts = _dashboard_layout([JacobianNormMonitor(prefix="sens"), GeneralizationGapMonitor(prefix="gen")])
    >>> charts[_DASHBOARD_CATEGORY]["Jacobian norm beside the generalization gap (loss)"]
    ['Multiline', ['^sens/jacobian_norm$', '^gen/gap_loss$']]
    """
    charts: dict[str, list[str]] = {}
    for monitor in monitors:
        for key in monitor.KEYS:
            if key.kind == "scalar" and key.chart is not None:
                tag = _exact_tag(f"{monitor.prefix}/{key.name}")
                if tag not in charts.setdefault(key.chart, []):
                    charts[key.chart].append(tag)
    return {_DASHBOARD_CATEGORY: {title: ["Multiline", tags] for title, tags in charts.items()}}


def _register_dashboard(trainer: pl.Trainer, monitors: Sequence[Any]) -> None:
    """Write the dashboard layout of ``monitors`` (every monitor of the trainer) to every TensorBoard logger of the
    trainer, once per writer, and declare their keys as the hparam metrics (:func:`_log_hparam_metrics`). Every
    monitor calls it from ``on_fit_start``; the first call does the work.

    Without a TensorBoard logger, says once per trainer (``rank_zero_info``) that scalars still reach the other
    loggers while the layout, histograms and figures are skipped.
    """
    writers = _tensorboard_writers(trainer)
    if not writers:
        if _first_time(trainer, "told_no_tensorboard"):
            loggers = [type(logger).__name__ for logger in trainer.loggers] or ["no logger"]
            rank_zero_info(
                f"lightning_sensitivity: the trainer has no TensorBoardLogger ({', '.join(loggers)}); the monitors' "
                "scalars go to the loggers it has, their dashboard layout, histograms and figures are skipped."
            )
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


def _log_hparam_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule, monitors: Sequence[Any]) -> None:
    """Make the monitors' keys the hparam metrics of the run, so the HPARAMS tab compares the runs of a sweep by
    their final ``sensitivity/*`` and ``generalization/*`` values.

    TensorBoard keeps the *first* hparams summary of a run and reads each metric's value from the last point of the
    scalar with the metric's name. So this writes, when the module (or data module) saved hyper-parameters, one
    hparams summary that names those hyper-parameters and every scalar key the ``monitors`` log (``hp_metric`` too
    when the logger logs it), before Lightning writes its own just after ``on_fit_start``. The final values then come from
    the scalars the monitors log, and nothing is logged twice.     :func:`_register_dashboard` calls this; it acts once per trainer, and a later call (say from ``on_fit_end``)
    does nothing.
    """
    if not _first_time(trainer, "hparam_metrics"):
        return
    params = _hyperparameters(trainer, pl_module)
    if not params:
        return
    loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    metrics = dict.fromkeys([key for monitor in monitors for key in monitor.logged_keys("scalar")], 0.0)
    if any(logger._default_hp_metric for logger in loggers):
        metrics["hp_metric"] = -1.0
    experiment, session_start, session_end = hparams(params, metrics)
    for writer in _tensorboard_writers(trainer):
        # The run's own event file (SummaryWriter.add_hparams would open a new run in a subdirectory).
        file_writer = writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary)
