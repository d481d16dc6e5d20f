"""``python -m examples.reproduce``: the quick reproduction end to end (its table, figures, logs and report) and its
command line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from examples.paper.analysis import GAPS, HPARAM_COLUMNS, MEASURES
from examples.paper.figures import FIGURES
from examples.paper.grid import sweep_grid
from examples.paper.report import SECTIONS, num
from examples.reproduce import parse_args

MEASUREMENTS = [
    "train_loss",
    "val_loss",
    "gap_loss",
    "train_accuracy",
    "val_accuracy",
    "gap_accuracy",
    "jacobian_norm",
    "jacobian_norm_train",
    "param_norm",
    "distance_from_init",
    "log_spectral_product",
    "sharpness",
    "confidence",
    "f4_spearman_jacobian",
    "f4_auc_jacobian",
    "f4_spearman_max_softmax",
    "f4_auc_max_softmax",
    "f4_spearman_entropy",
    "f4_auc_entropy",
    "f4_partial_spearman",
    "f4_auc_jacobian_within_confidence",
    "num_misclassified",
    "transitions",
    "transitions_half",
    "transition_density",
]
BOOKKEEPING = [
    "model_id",
    "status",
    "diverged_epoch",
    "error",
    "num_units",
    "lr_level",
    "num_train_points",
    "num_val_points",
    "epochs_trained",
    "reached_target",
    "train_seconds",
    "cpu_seconds",
]


def _section(report: str, title: str) -> str:
    return report.split(f"\n## {title}")[1].split("\n## ")[0]


def _row(section: str, first_cells: str) -> list[str]:
    line = next(line for line in section.splitlines() if line.startswith(f"| {first_cells} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_table_has_every_hyper_parameter_and_measurement(quick: Path) -> None:
    table = pd.read_csv(quick / "out" / "results.csv")
    assert set(HPARAM_COLUMNS + MEASUREMENTS + BOOKKEEPING) <= set(table.columns)
    assert len(table) == len(sweep_grid("quick").configs) == table.model_id.nunique()
    assert set(table.status) <= {"fit", "did not fit"} and (table.status == "fit").eq(table.reached_target).all()
    assert (table.num_units == table.width * table.depth).all()
    assert not table[["gap_loss", "gap_accuracy", "jacobian_norm", "sharpness", "transitions"]].isna().any().any()
    assert (table.jacobian_norm > 0).all() and (table.param_norm > table.distance_from_init * 0).all()
    np.testing.assert_allclose(table.gap_loss, table.val_loss - table.train_loss)
    np.testing.assert_allclose(table.gap_accuracy, table.train_accuracy - table.val_accuracy)
    # the fit criterion is what the table says it is
    assert (table.reached_target == (table.train_accuracy == 1.0)).all()
    assert (table[~table.reached_target].epochs_trained == table[~table.reached_target].max_epochs).all()
    for row in table.itertuples():
        points = pd.read_csv(quick / "out" / "points" / f"{row.model_id}.csv")
        assert len(points) == row.num_val_points
        assert math.isclose(points.jacobian_norm.mean(), row.jacobian_norm, rel_tol=1e-9)
        assert math.isclose(points.loss.mean(), row.val_loss, rel_tol=1e-6)
        assert math.isclose(points.max_softmax.mean(), row.confidence, rel_tol=1e-9)
        assert math.isclose(stats.spearmanr(points.jacobian_norm, points.loss).statistic, row.f4_spearman_jacobian,
                            rel_tol=1e-9)
        wrong = points.label != points.prediction
        assert int(wrong.sum()) == row.num_misclassified
        if 0 < wrong.sum() < len(wrong):
            assert math.isclose(roc_auc_score(wrong, points.entropy), row.f4_auc_entropy, rel_tol=1e-9)


@pytest.mark.slow
def test_figures_are_valid_pngs(quick: Path) -> None:
    import matplotlib.image

    for name in FIGURES.values():
        path = quick / "out" / "figures" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_every_run_is_logged_to_tensorboard(quick: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    table = pd.read_csv(quick / "out" / "results.csv")
    for model_id in table.model_id:
        events = EventAccumulator(str(quick / "runs" / "reproduce-digits" / model_id))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert {"sensitivity/jacobian_norm", "generalization/gap_loss", "train_loss_epoch"} <= set(tags), model_id
    # the F2 model trains with the package's monitors
    f2 = next((quick / "runs" / "reproduce-digits").glob("f2-*"))
    events = EventAccumulator(str(f2))
    events.Reload()
    assert {"sensitivity/jacobian_norm", "generalization/gap_loss"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_report_has_every_section_and_its_numbers_equal_the_tables(quick: Path) -> None:
    report = (quick / "out" / "report.md").read_text()
    table = pd.read_csv(quick / "out" / "results.csv")
    for title in SECTIONS:
        assert f"\n## {title}" in report, title
    assert report.index("## Verdict rules") < report.index("## Summary") < report.index("## F1")
    assert "SPEC" not in report
    for name in FIGURES.values():
        assert f"](figures/{name})" in report
    assert "Wall time: " in _section(report, "Closing note")
    summary = _section(report, "Summary")
    # F1's verdict is the accuracy gap's, and the summary opens with it; the loss gap is a further check
    lines = summary.strip().splitlines()
    first = lines[lines.index("|---|---|---|---|") + 1]
    assert first.startswith("| F1 |") and "1 - test accuracy" in first
    assert "| F1, further check: the loss gap |" in summary and "check, not a verdict" in summary
    assert summary.index("| F1 |") < summary.index("further check")
    assert "| Sizes |" in summary and "| F2 (transitions per unit length) |" in summary
    # the findings table is printed once, in the summary
    assert report.count("| Finding | Paper | Measured here | Reproduced |") == 1
    assert "| F1 |" not in _section(report, "Closing note")

    # F1, recomputed here from the table with scipy directly, over the fitted grid models
    grid = table[(table.activation == "relu") & (table.augment == "none") & (table.random_label_fraction == 0)
                 & ~table.full_batch]
    fitted = grid[grid.reached_target]
    f1 = _section(report, "F1")
    assert f"Population: {len(fitted)} of the {len(grid)} grid models" in f1
    head = stats.kendalltau(fitted.jacobian_norm, fitted.gap_accuracy).statistic
    assert f"Kendall tau {num(head)} [" in first
    for column, label in MEASURES.items():
        values = fitted[column] if column != "uncertainty" else 1 - fitted.confidence
        for gap, gap_label in GAPS.items():
            tau = stats.kendalltau(values, fitted[gap])
            cells = _row(f1, f"{label} | {gap_label}")
            assert cells[2] == str(len(fitted)) and cells[3] == num(tau.statistic)
            low, high = (float(v) for v in cells[4].strip("[]").split(","))
            assert low <= tau.statistic <= high

    # F3: the clean pairs, found here from the model ids
    f3 = _section(report, "F3")
    by_id = table.set_index("model_id")
    base = next(i for i in table.model_id if i.startswith("w256-d1-relu-adam") and "augnone-rl0-" in i)
    changed = {"augmentation": ("augnone", "augnoise"), "hardtanh": ("relu", "hardtanh"),
               "random labels 100%": ("rl0-", "rl1-")}
    for factor, (old, new) in changed.items():
        variant = base.replace(old, new)
        both = bool(by_id.reached_target[base] and by_id.reached_target[variant])
        cells = _row(f3, factor)
        assert cells[2] == "1" and cells[5] == str(int(both))
        if both:
            assert cells[6] == num(by_id.jacobian_norm[variant] / by_id.jacobian_norm[base])
        else:
            assert cells[9] == "**undecided**"

    # F4 over the fitted true-label models
    f4 = _section(report, "F4")
    models = table[table.reached_target & (table.random_label_fraction == 0)]
    for column in ("f4_spearman_jacobian", "f4_auc_max_softmax", "f4_partial_spearman"):
        assert _row(f4, column)[1:3] == [str(models[column].notna().sum()), num(models[column].median())]

    # Sizes: the raw count's tau with the units, from the table
    sizes = _section(report, "Sizes")
    units_tau = stats.kendalltau(fitted.transitions, fitted.width * fitted.depth)
    assert _row(sizes, "raw count")[1:4] == [str(len(fitted)), num(units_tau.statistic), f"{units_tau.pvalue:.2g}"]

    # F2 from its own profiles: the density per unit length is the segments' transitions over their length
    profiles = pd.read_csv(quick / "out" / "manifold_profiles.csv")
    f2 = _section(report, "F2")
    trained = profiles[(profiles.model == "trained") & (profiles.kind == "different classes")]
    near_points = trained[trained.u < 0.1]
    near = near_points.groupby("ellipse").jacobian_norm.mean().mean()
    assert _row(f2, "trained | Jacobian norm | different classes: near < between")[3] == num(near)
    near_segments = trained[trained.u_segment < 0.1].groupby("ellipse")[["segment_transitions", "segment_length"]].sum()
    density = (near_segments.segment_transitions / near_segments.segment_length).mean()
    cells = _row(f2, "trained | transitions per unit length | different classes: near < between")
    assert cells[3] == num(density)
    assert _row(f2, "first fit | transitions per unit length | different classes: near < between")
    curves = pd.read_csv(quick / "out" / "manifold.csv")
    random = curves[curves.kind == "random ellipse"]
    assert (random.min_distance > 0).all() and (curves[curves.kind != "random ellipse"].min_distance == 0).all()
    unfitted = _section(report, "Models that did not fit")
    for model_id, status in zip(table[~table.reached_target].model_id, table[~table.reached_target].status,
                                strict=True):
        assert f"| {model_id} | {status} |" in unfitted


def test_command_line_checks(tmp_path: Path) -> None:
    args = parse_args(["--quick", "--jobs", "2", "--dataset", "cifar100", "--data-dir", "d", "--download"])
    assert args.quick and args.jobs == 2 and args.dataset == "cifar100" and args.download
    with pytest.raises(SystemExit):
        parse_args(["--address", "ray://host:10001"])
    with pytest.raises(SystemExit):
        parse_args(["--jobs", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        parse_args(["--ellipse-points", "100"])
    assert parse_args([]).grid == "default" and parse_args(["--grid", "small"]).grid == "small"
    with pytest.raises(SystemExit):
        parse_args(["--grid", "huge"])
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--grid", "small"])
    with pytest.raises(SystemExit):
        parse_args(["--data-file", "no-such-file.npz"])
    (tmp_path / "mine.npz").write_bytes(b"")
    assert parse_args(["--data-file", str(tmp_path / "mine.npz")]).data_file == tmp_path / "mine.npz"
    with pytest.raises(SystemExit):
        parse_args(["--data-file", str(tmp_path / "mine.npz"), "--dataset", "mnist"])
