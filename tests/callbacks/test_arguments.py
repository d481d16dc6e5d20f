"""Every argument of every monitor is checked at construction, with ``ValueError`` naming it (Lightning's
convention), before any training is spent."""

import pytest
from torch.utils.data import DataLoader, TensorDataset

from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

J, G, T = JacobianNormMonitor, GeneralizationGapMonitor, TransitionMonitor

BAD = [
    # the arguments every monitor has
    *[(m, "every_n_epochs", v) for m in (J, G, T) for v in (0, -1, 1.5, True)],
    *[(m, "prefix", v) for m in (J, G, T) for v in ("", "sensitivity/", 3)],
    *[(m, "forward_fn", "logits") for m in (J, G, T)],
    *[(m, "get_input", v) for m in (J, G, T) for v in (0, "x")],
    *[(m, "input_key", v) for m in (J, G, T) for v in (1.5, True, ("x",))],
    *[(m, "target_key", v) for m in (J, G) for v in (2.0, 1.5)],
    *[(m, "get_target", "y") for m in (J, G)],
    *[(m, "seed", v) for m in (J, G, T) for v in ("0", 1.0)],
    *[(m, "log_seconds", v) for m in (J, G, T) for v in ("yes", 1, None)],
    # the watch set's size: an integer >= 0, or None
    *[(m, name, v) for m, name in ((J, "watch_points"), (G, "watch_train_points"), (T, "watch_segments"))
      for v in (-1, 1.5, True, "8")],
    # JacobianNormMonitor
    (J, "max_points", 0),
    (J, "max_points", -1),
    (J, "max_points", 2.5),
    (J, "max_points", "all"),
    (J, "output", "probs"),
    (J, "method", "sampled"),
    (J, "num_projections", 0),
    (J, "watch_projections", 0),
    (J, "watch_projections", -2),
    (J, "watch_projections", 1.5),
    (J, "watch_projections", True),
    (J, "chunk_size", 0),
    (J, "log_histogram", "yes"),
    (J, "log_histogram", 1),
    (J, "record_epochs", "first"),
    (J, "record_epochs", 3),
    (J, "record_epochs", [1, -1]),
    (J, "record_epochs", [-1]),
    (J, "record_epochs", [1.5]),
    (J, "measure_predict", "yes"),
    (J, "measure_predict", 0),
    # GeneralizationGapMonitor
    (G, "max_train_points", 0),
    (G, "loss_fn", "cross_entropy"),
    (G, "output", "softmax"),
    (G, "train_dataset", DataLoader(TensorDataset())),
    (G, "train_dataset", 3),
    (G, "batch_size", 0),
    (G, "batch_size", 2.5),
    # TransitionMonitor
    (T, "num_trajectories", 0),
    (T, "num_trajectories", 1.5),
    (T, "num_points", 7),
    (T, "num_points", 4),
    (T, "num_points", 64.0),
    (T, "off_manifold", "uniform"),
    (T, "method", "exactly"),
    (T, "method", "integrated"),
    (T, "chunk_size", 0),
    (T, "chunk_size", None),
    (T, "log_figure", "always"),
    (T, "log_figure", 1),
    (T, "log_figure", "start"),
    (T, "convergence_tolerance", -0.1),
    (T, "convergence_tolerance", float("nan")),
    (T, "convergence_tolerance", "0.1"),
]


@pytest.mark.parametrize(
    "monitor, name, value", BAD, ids=[f"{m.__name__}-{n}={v!r}" for m, n, v in BAD]
)
def test_a_bad_argument_fails_at_construction_naming_it(monitor, name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        monitor(**{name: value})


@pytest.mark.parametrize("monitor", [J, G, T])
def test_every_argument_has_a_check(monitor):
    """Each constructor argument appears in the table above (so a new argument needs its check and its test)."""
    import inspect

    arguments = set(inspect.signature(monitor).parameters)
    checked = {name for m, name, _ in BAD if m is monitor}
    assert arguments == checked


def test_good_arguments_are_kept():
    monitor = J(max_points=None, record_epochs=[0, 2], num_projections=4, method="projection", prefix="sens")
    assert monitor.max_points is None and monitor.record_epochs == [0, 2] and monitor.prefix == "sens"
    assert T(log_figure=True, convergence_tolerance=0).log_figure is True
    assert G(max_train_points=None, batch_size=7).batch_size == 7
