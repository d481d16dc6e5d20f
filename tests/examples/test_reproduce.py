"""``python -m examples.reproduce``: the quick reproduction end to end, its outputs, and the parts it is made of."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from examples.paper.analysis import FACTORS, HPARAM_COLUMNS, f3_paired_effects, pairs
from examples.paper.data import DataSpec
from examples.paper.report import FIGURES, num
from examples.paper.runner import run_sweep
from examples.paper.sweep import VARIANTS, sweep_grid
from examples.reproduce import main, parse_args

MEASUREMENTS = [
    "train_loss",
    "val_loss",
    "gap_loss",
    "train_accuracy",
    "val_accuracy",
    "gap_accuracy",
    "jacobian_norm",
    "jacobian_norm_train",
    "f4_spearman",
    "f4_auc_misclassified",
    "num_misclassified",
]
BOOKKEEPING = [
    "model_id",
    "num_train_points",
    "num_val_points",
    "epochs_trained",
    "reached_target",
    "train_seconds",
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of ``python -m examples.reproduce --quick``; its output folder (runs under ``<tmp>/runs``)."""
    root = tmp_path_factory.mktemp("reproduce")
    main(["--quick", "--out", str(root / "out"), "--runs-dir", str(root / "runs")])
    return root


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}")[1].split("\n## ")[0]


@pytest.mark.slow
def test_table_has_every_hyper_parameter_and_measurement(quick: Path) -> None:
    table = pd.read_csv(quick / "out" / "results.csv")
    assert set(HPARAM_COLUMNS + MEASUREMENTS + BOOKKEEPING) <= set(table.columns)
    assert len(table) == len(sweep_grid(quick=True)) == table.model_id.nunique()
    assert not table[["gap_loss", "gap_accuracy", "jacobian_norm", "f4_spearman"]].isna().any().any()
    assert (table.jacobian_norm > 0).all()
    # the gap is what SPEC section 4 defines, computed from the two sides in the table
    np.testing.assert_allclose(table.gap_loss, table.val_loss - table.train_loss)
    np.testing.assert_allclose(table.gap_accuracy, table.train_accuracy - table.val_accuracy)
    # the per-point records are the measurements' data
    for row in table.itertuples():
        points = pd.read_csv(quick / "out" / "points" / f"{row.model_id}.csv")
        assert len(points) == row.num_val_points
        assert math.isclose(points.jacobian_norm.mean(), row.jacobian_norm, rel_tol=1e-9)
        assert math.isclose(points.loss.mean(), row.val_loss, rel_tol=1e-6)
        assert math.isclose(
            stats.spearmanr(points.jacobian_norm, points.loss).statistic, row.f4_spearman, rel_tol=1e-9
        )


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
        folder = quick / "runs" / "reproduce-digits" / model_id
        events = EventAccumulator(str(folder))
        events.Reload()
        assert "sensitivity/jacobian_norm" in events.Tags()["scalars"], model_id
        assert "val_loss" in events.Tags()["scalars"], model_id


@pytest.mark.slow
def test_report_numbers_equal_the_tables(quick: Path) -> None:
    report = (quick / "out" / "report.md").read_text()
    table = pd.read_csv(quick / "out" / "results.csv")
    for name in FIGURES.values():
        assert f"](figures/{name})" in report
    assert "seed 0" in report
    assert f"Sweep: {len(table)} fully-connected models; {int(table.reached_target.sum())} reached" in report

    # F1, recomputed here from the table with scipy directly
    f1 = _section(report, "F1")
    for gap in ("gap_loss", "gap_accuracy"):
        x, y = np.log10(table.jacobian_norm), table[gap]
        line = next(line for line in f1.splitlines() if line.startswith(f"| all models | {gap} |"))
        expected = [
            len(table),
            stats.pearsonr(x, y).statistic,
            stats.spearmanr(x, y).statistic,
            stats.kendalltau(x, y).statistic,
        ]
        assert line.split(" | ")[2:6] == [str(expected[0])] + [num(v) for v in expected[1:]]

    # F3: each factor's pairs, found here by changing the factor in each base model's id
    f3 = _section(report, "F3")
    ids = set(table.model_id)
    by_id = table.set_index("model_id")
    changed = {
        "augmentation": ("aug0", "aug1"),
        "random labels": ("rl0-", "rl0.25-"),
        "full batch": ("b64", "bfull"),
        "hardtanh instead of ReLU": ("relu", "hardtanh"),
        "hardsigmoid instead of ReLU": ("relu", "hardsigmoid"),
    }
    for factor, (old, new) in changed.items():
        bases = [i for i in ids if "-relu-" in i and "-b64-" in i and "aug0" in i and "rl0-" in i]
        ratios = [by_id.jacobian_norm[b.replace(old, new)] / by_id.jacobian_norm[b] for b in bases]
        line = next(line for line in f3.splitlines() if line.startswith(f"| {factor} |"))
        cells = line.split(" | ")
        assert cells[2] == str(len(bases)) and cells[3] == num(float(np.median(ratios)))

    # F4 over the sweep
    f4 = _section(report, "F4")
    assert f"median {num(table.f4_spearman.median())}" in f4
    assert f"median {num(table.f4_auc_misclassified.dropna().median())}" in f4

    # F2 from its own table
    curves = pd.read_csv(quick / "out" / "manifold.csv")
    trained_on = curves[(curves.model == "trained") & (curves.kind == "on manifold")]
    f2 = _section(report, "F2")
    assert num(trained_on.jacobian_norm_anchors.mean()) in f2
    assert num(trained_on.transition_density.mean()) in f2
    over = int((curves.transitions_sampled > curves.transitions).sum())
    assert (f"On {over} of {len(curves)} ellipses" in f2) if over else ("at most the exact count" in f2)
    summary = _section(report, "Summary")
    assert f"{num(trained_on.jacobian_norm_anchors.mean())} at training points" in summary


@pytest.mark.slow
def test_rerun_trains_nothing_new(quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = pd.read_csv(quick / "out" / "results.csv")
    run_sweep(
        sweep_grid(quick=True),
        DataSpec(),
        quick / "out" / "results.csv",
        quick / "runs",
        quick / "out" / "points",
    )
    assert "12 already in" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(quick / "out" / "results.csv"), before)


def test_a_table_of_another_data_set_is_not_mixed_in(tmp_path: Path) -> None:
    pd.DataFrame({"model_id": ["m"], "dataset": ["mnist"]}).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"holds models trained on \['mnist'\], not on 'digits'"):
        run_sweep(sweep_grid(quick=True), DataSpec(), tmp_path / "results.csv", tmp_path, tmp_path)


def test_pairs_differ_in_their_factor_only() -> None:
    configs = sweep_grid(quick=False)
    table = pd.DataFrame(
        [
            {
                **c.__dict__,
                "full_batch": c.batch_size is None,
                "dataset": "digits",
                "batch_size": c.batch_size or 1258,
                "model_id": c.model_id,
            }
            for c in configs
        ]
    )
    num_bases = 2 * 2 * 2  # widths x depths x optimizers
    assert len(configs) == len(table.model_id.unique()) == num_bases * (1 + len(VARIANTS))
    for factor in FACTORS:
        p = pairs(table, factor)
        assert len(p) == num_bases, factor.name
        for pair in p.itertuples():
            base, variant = (
                table.set_index("model_id")
                .loc[[pair.model_id_base, pair.model_id_variant]]
                .to_dict("records")
            )
            differing = {k for k in HPARAM_COLUMNS if k != "dataset" and base[k] != variant[k]}
            assert factor.column in differing and differing <= {factor.column, *factor.also_differs}


def test_paired_effects_count_directions() -> None:
    rows = []
    for width, (j_base, j_aug) in zip((8, 16, 32), ((1.0, 0.5), (2.0, 1.0), (1.0, 3.0)), strict=True):
        for augment, norm in ((False, j_base), (True, j_aug)):
            rows.append(
                {
                    "dataset": "d",
                    "seed": 0,
                    "width": width,
                    "depth": 1,
                    "activation": "relu",
                    "optimizer": "sgd",
                    "lr": 0.1,
                    "batch_size": 64,
                    "full_batch": False,
                    "augment": augment,
                    "random_label_fraction": 0.0,
                    "max_epochs": 1,
                    "jacobian_norm": norm,
                    "reached_target": augment,
                    "gap_loss": norm,
                    "gap_accuracy": -norm,
                }
            )
    effects = f3_paired_effects(pd.DataFrame(rows)).set_index("factor")
    assert list(effects.index) == ["augmentation"]
    aug = effects.loc["augmentation"]
    assert aug.pairs == 3 and aug.paper == "lower"
    assert aug.jacobian_ratio_median == pytest.approx(0.5)
    assert aug.jacobian_as_paper == pytest.approx(2 / 3)
    assert aug.gap_loss_as_paper == pytest.approx(2 / 3) and aug.gap_accuracy_as_paper == pytest.approx(1 / 3)
    assert aug.base_fitted == 0 and aug.variant_fitted == 1


def test_command_line_checks() -> None:
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


@pytest.mark.slow
def test_jobs_run_models_in_parallel_processes(tmp_path: Path) -> None:
    configs = sweep_grid(quick=True, max_epochs=2)[:3]
    table = run_sweep(
        configs, DataSpec(), tmp_path / "results.csv", tmp_path / "runs", tmp_path / "points", jobs=2
    )
    assert list(table.model_id) == [c.model_id for c in configs]
    serial = run_sweep(
        configs[:1], DataSpec(), tmp_path / "serial.csv", tmp_path / "runs-serial", tmp_path / "points-serial"
    )
    # the same seed gives the same model, whichever process trains it
    for column in ("jacobian_norm", "gap_loss", "val_accuracy"):
        assert serial[column].iloc[0] == pytest.approx(table[column].iloc[0], rel=1e-6)


@pytest.mark.slow
def test_quick_sweep_on_a_local_ray_instance(quick: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.tune")
    configs = sweep_grid(quick=True)
    table = run_sweep(
        configs,
        DataSpec(),
        tmp_path / "results.csv",
        tmp_path / "runs",
        tmp_path / "points",
        jobs=2,
        use_ray=True,
    )
    serial = pd.read_csv(quick / "out" / "results.csv")
    assert list(table.model_id) == list(serial.model_id)
    # Ray trials train the same models: the measurements equal those of the serial run
    for column in ("jacobian_norm", "gap_loss", "gap_accuracy", "f4_spearman", "epochs_trained"):
        np.testing.assert_allclose(table[column].astype(float), serial[column].astype(float), rtol=1e-6)
    assert (tmp_path / "runs" / "reproduce-digits" / configs[0].model_id).is_dir()
    assert re.fullmatch(r"[\w.\-]+", configs[0].model_id)
