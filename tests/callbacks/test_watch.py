"""The watch set: at the defaults every quantity is logged at every pass from the first (its ``_watch`` key, on a fixed
subset of the full measurement), and the full measurement at the last pass; the watch set is the same at every pass,
its values are those of a direct measurement of that subset (the Jacobian norm's estimated at two products a point, with
the same directions at every pass), and at a full pass the gap's and the transitions' are the full measurement's own
values on it (the Jacobian's too with ``watch_projections=None``). Each value is checked against a direct measurement of the weights it was logged on
(``tests/_logged.py``)."""

from __future__ import annotations

import csv
import glob
import math

import pytest
import torch
import torch.nn.functional as F

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import count_transitions, jacobian_norm, trajectory_through
from tests._logged import CapturingLogger, Reference, gap_values

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*sampled count has not converged.*"),
]

WATCH_POINTS, WATCH_TRAIN_POINTS, WATCH_SEGMENTS = 8, 16, 8
NUM_POINTS = 32


def _monitors(watch_projections: int | None = 2, **schedule: int) -> list:
    """Small monitors with a watch set each, measured in full at ``schedule`` (``every_n_epochs``)."""
    return [
        JacobianNormMonitor(
            max_points=40, watch_points=WATCH_POINTS, watch_projections=watch_projections, record_epochs="all", **schedule
        ),
        TransitionMonitor(
            num_trajectories=2, num_points=NUM_POINTS, watch_segments=WATCH_SEGMENTS, log_figure=False, **schedule
        ),
        GeneralizationGapMonitor(max_train_points=64, watch_train_points=WATCH_TRAIN_POINTS, **schedule),
    ]


def _fit(monitors: list, max_epochs: int, **options) -> tuple:
    model = MLPClassifier()
    capture = CapturingLogger(model)
    trainer, model = train(monitors, model=model, logger=capture, max_epochs=max_epochs, **options)
    return trainer, model, capture


def test_the_defaults_log_every_quantity_at_every_pass_and_the_full_measurement_at_the_last():
    monitors = [JacobianNormMonitor(), TransitionMonitor(), GeneralizationGapMonitor()]
    trainer, _, capture = _fit(monitors, max_epochs=3)
    passes = capture.steps("val_loss")
    assert len(passes) == 3
    for monitor in monitors:  # (the transitions, logged at the training epoch's end, at the same step)
        steps = passes
        watch, full = monitor.logged_keys("scalar", watch=True), monitor.logged_keys("scalar", watch=False)
        assert len(watch) >= 2 and {f"{key}_watch" for key in full} >= set(watch)
        for key in watch:
            assert capture.steps(key) == steps, key  # every pass, from the first
        for key in full:
            assert capture.steps(key) == steps[-1:], key  # the last pass only
    for key in ("generalization/gap_accuracy_watch", "sensitivity/jacobian_norm_watch"):
        assert all(math.isfinite(r.metrics[key]) for r in capture.history if key in r.metrics)


def test_every_n_epochs_makes_the_full_measurement_at_those_passes_and_the_last():
    monitors = _monitors(every_n_epochs=2)
    _, _, capture = _fit(monitors, max_epochs=5)
    passes = capture.steps("val_loss")
    assert capture.steps("sensitivity/jacobian_norm") == [passes[1], passes[3], passes[4]]
    assert capture.steps("generalization/gap_loss") == [passes[1], passes[3], passes[4]]
    assert capture.steps("sensitivity/transition_density_on_manifold") == [passes[i] for i in (1, 3, 4)]
    for key in ("sensitivity/jacobian_norm_watch", "generalization/gap_loss_watch"):
        assert capture.steps(key) == passes
    assert capture.steps("sensitivity/transition_density_off_manifold_watch") == passes


def test_a_watch_size_of_0_or_none_is_the_old_behaviour():
    monitors = [
        JacobianNormMonitor(max_points=16, watch_points=0, every_n_epochs=2),
        TransitionMonitor(num_trajectories=1, num_points=16, watch_segments=None, every_n_epochs=2, log_figure=False),
        GeneralizationGapMonitor(max_train_points=16, watch_train_points=0, every_n_epochs=2),
    ]
    _, _, capture = _fit(monitors, max_epochs=3)
    assert not [key for key in capture.keys() if key.endswith("_watch")]
    assert not [key for monitor in monitors for key in monitor.logged_keys() if key.endswith("_watch")]
    passes = capture.steps("val_loss")
    assert capture.steps("sensitivity/jacobian_norm") == [passes[1], passes[2]]


def _watch_transitions(net, anchors: torch.Tensor) -> tuple[float, float]:
    """The watch values along trajectory 0 through ``anchors`` ``[N, 3, ...]``, measured directly: the boundaries
    crossed on segments ``floor(j k / m)`` of its sampled count, per unit of their length; and that density times
    the whole polygon's length."""
    curve = trajectory_through(anchors[0], NUM_POINTS)
    segments = count_transitions(net, curve, return_segments=True, warn_smooth=False).segments
    starts = torch.arange(WATCH_SEGMENTS) * NUM_POINTS // WATCH_SEGMENTS
    points = curve.at(curve.times, dtype=torch.float64).flatten(1)
    length = (points[(starts + 1) % NUM_POINTS] - points[starts]).norm(dim=1).sum().item()
    density = segments[starts].sum().item() / length
    return density, density * curve.arc_length()


def _watch_jacobian(net, x: torch.Tensor, watch_projections: int | None) -> torch.Tensor:
    """The watch set's Jacobian norms measured directly: exact, or estimated at ``watch_projections`` products a
    point, point ``i`` with the directions of a generator seeded with the monitor's seed (0) plus ``i``."""
    if watch_projections is None:
        return jacobian_norm(net, x)
    generators = [torch.Generator().manual_seed(i) for i in range(len(x))]
    return jacobian_norm(net, x, method="projection", num_projections=watch_projections, generator=generators)


@pytest.mark.parametrize(("every_n_epochs", "watch_projections"), [(None, 2), (2, 2), (2, None), (2, 3)])
def test_the_watch_set_is_fixed_and_each_value_is_its_direct_measurement(every_n_epochs, watch_projections):
    monitors = _monitors(watch_projections, every_n_epochs=every_n_epochs)
    jacobian, transitions, gap = monitors
    trainer, model, capture = _fit(monitors, max_epochs=4)
    data = DigitsDataModule()
    reference = Reference.of(model, data)
    indices = gap.train_indices
    train_points = (data.x_train[indices[:WATCH_TRAIN_POINTS]], data.y_train[indices[:WATCH_TRAIN_POINTS]])
    anchors = transitions.anchors
    records = [r for r in capture.history if "sensitivity/jacobian_norm_watch" in r.metrics]
    assert len(records) == 4
    for record in records:
        net = reference.network(record.weights)
        # the first `watch_points` of the validation points, at every pass (full ones included), with the same
        # directions: a curve that moves only with the model
        expected = _watch_jacobian(net, data.x_val[:WATCH_POINTS], watch_projections).mean().item()
        assert record.metrics["sensitivity/jacobian_norm_watch"] == pytest.approx(expected, rel=1e-5)
        # the first `watch_train_points` of the drawn subset, beside the whole validation set
        direct = gap_values(net, train_points, (data.x_val, data.y_val))
        for name, value in direct.items():
            assert record.metrics[f"generalization/{name}_watch"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for record in [r for r in capture.history if "sensitivity/transition_density_on_manifold_watch" in r.metrics]:
        net = reference.network(record.weights)
        for kind in ("on_manifold", "off_manifold"):
            density, count = _watch_transitions(net, anchors[kind])
            assert record.metrics[f"sensitivity/transition_density_{kind}_watch"] == pytest.approx(density, rel=1e-6)
            assert record.metrics[f"sensitivity/transitions_{kind}_watch"] == pytest.approx(count, rel=1e-6)
    # the anchors and the subset are those of the whole run: a resumed or continued run keeps them too
    assert torch.equal(gap.train_indices, indices) and transitions.anchors is anchors


def test_at_a_full_pass_the_watch_values_are_the_full_measurements_own(tmp_path):
    monitors = _monitors(watch_projections=None, every_n_epochs=1)
    jacobian, transitions, gap = monitors
    trainer, model, capture = _fit(monitors, max_epochs=2, default_root_dir=tmp_path)
    # the Jacobian norm measured exactly (`watch_projections=None`): the mean over the first points of the full
    # measurement's per-point records
    for path in sorted(glob.glob(str(tmp_path / "**" / "jacobian_norm_records" / "fit_epoch=*.csv"), recursive=True)):
        epoch = int(path.rsplit("=", 1)[1].removesuffix(".csv"))
        with open(path) as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["index"]) < WATCH_POINTS]
        assert len(rows) == WATCH_POINTS
        record = [r for r in capture.history if "sensitivity/jacobian_norm_watch" in r.metrics][epoch]
        mean = sum(float(row["jacobian_norm"]) for row in rows) / WATCH_POINTS
        assert record.metrics["sensitivity/jacobian_norm_watch"] == pytest.approx(mean, rel=1e-5)  # 6 digits
    # the gap: the validation side is the full measurement's, the training side its first points
    last = capture.last("generalization/val_loss")
    assert last.metrics["generalization/val_loss_watch"] == last.metrics["generalization/val_loss"]
    assert last.metrics["generalization/val_accuracy_watch"] == last.metrics["generalization/val_accuracy"]
    # the transitions: the full count's own segments (the same count the direct measurement makes)
    net = Reference.of(model, DigitsDataModule()).network(capture.last("sensitivity/transitions_on_manifold").weights)
    density, _ = _watch_transitions(net, transitions.anchors["on_manifold"])
    logged = capture.last("sensitivity/transition_density_on_manifold_watch").metrics
    assert logged["sensitivity/transition_density_on_manifold_watch"] == pytest.approx(density, rel=1e-6)


@pytest.mark.parametrize("watch_projections", [2, None])
def test_the_watch_spearman_correlation_is_that_of_the_watch_points(watch_projections):
    from torchmetrics.functional import spearman_corrcoef

    monitors = _monitors(watch_projections)
    _, model, capture = _fit(monitors[:1], max_epochs=2)
    data = DigitsDataModule()
    record = capture.last("sensitivity/jacobian_loss_spearman_watch")
    net = Reference.of(model, data).network(record.weights)
    x, y = data.x_val[:WATCH_POINTS], data.y_val[:WATCH_POINTS]
    with torch.no_grad():
        losses = F.cross_entropy(net(x), y, reduction="none")
    expected = spearman_corrcoef(_watch_jacobian(net, x, watch_projections), losses).item()
    assert record.metrics["sensitivity/jacobian_loss_spearman_watch"] == pytest.approx(expected, abs=1e-5)
