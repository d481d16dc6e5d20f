"""``TransitionMonitor`` inside real ``Trainer`` runs: the logged counts along its fixed trajectories, the anchors,
the curves, its figure, the exact count, and the models it cannot count."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import TransitionMonitor
from lightning_sensitivity.functional import count_transitions, gaussian_anchors, trajectory_through
from tests import _synthetic
from tests._logged import check_logged, fit, transition_counts
from tests._synthetic import ImageClassifier, SyntheticImages

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

KEYS = [
    f"sensitivity/{name}_{kind}"
    for name in ("transition_density", "transitions")
    for kind in ("on_manifold", "off_manifold")
]
FIGURE = "sensitivity/transitions_along_trajectory"


def small_monitor(**kwargs):
    return TransitionMonitor(num_trajectories=2, num_points=128, every_n_epochs=1, **kwargs)


@pytest.mark.parametrize(("log_figure", "num_figures"), [("end", 1), (True, 2)])
def test_scalars_and_figure_are_read_back_from_the_event_files(tmp_path, log_figure, num_figures):
    logger = TensorBoardLogger(tmp_path)
    monitor = small_monitor(log_figure=log_figure)
    trainer, model = train([monitor], max_epochs=2, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in KEYS:
        assert len(events.Scalars(key)) == 2
    images = events.Images(FIGURE)
    assert len(images) == num_figures and images[-1].width > 100 and images[-1].height > 100
    assert images[-1].step == events.Scalars(KEYS[0])[-1].step

    # the logged values are those of the trained model along the monitor's fixed trajectories
    anchors = monitor.anchors
    assert anchors["on_manifold"].shape == anchors["off_manifold"].shape == (2, 3, 1, 8, 8)
    for kind in ("on_manifold", "off_manifold"):
        density, count = transition_counts(model, anchors[kind], 128)
        assert events.Scalars(f"sensitivity/transition_density_{kind}")[-1].value == pytest.approx(
            density, rel=1e-5
        )
        assert events.Scalars(f"sensitivity/transitions_{kind}")[-1].value == count
    on_manifold = {tuple(p.flatten().tolist()) for p in anchors["on_manifold"].flatten(0, 1)}
    training_points = {tuple(p.flatten().tolist()) for p in DigitsDataModule().x_train}
    assert on_manifold <= training_points


def test_the_anchors_are_algorithm_r_with_the_monitors_generator():
    # Points are copied to the reservoir batch by batch; the anchors must be those of the one-point-at-a-time
    # Algorithm R over the first epoch's batches, shuffled, and Gaussian anchors with the data's mean and std.
    points = torch.arange(400, dtype=torch.float32)[:, None]
    data = torch.utils.data.TensorDataset(points, torch.zeros(400, dtype=torch.long))
    monitor = TransitionMonitor(num_trajectories=2, num_points=16, seed=3, log_figure=False)  # 6 anchors each
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = MLPClassifier(in_features=1, num_classes=2, hidden_sizes=(8,))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=40))

    generator, reservoir, seen = torch.Generator().manual_seed(3), [], 0
    for batch in points.split(40):
        draws = torch.rand(len(batch), generator=generator, dtype=torch.float64).tolist()
        for point, draw in zip(batch, draws, strict=True):
            slot = int(draw * (seen + 1))
            if seen < 6:
                reservoir.append(point)
            elif slot < 6:
                reservoir[slot] = point
            seen += 1
    on = torch.stack(reservoir)[torch.randperm(6, generator=generator)]
    mean, std = points.double().mean(0), points.double().std(0, correction=0)
    off = gaussian_anchors(mean, std, 6, generator=generator).float()
    assert torch.equal(monitor.anchors["on_manifold"].flatten(0, 1), on)
    assert int(on.max()) >= 40  # later batches did enter
    assert torch.allclose(monitor.anchors["off_manifold"].flatten(0, 1), off)


def _expected_density(model, anchors, dtype=torch.float32):
    """The mean density along the closed curves through ``anchors`` ``[N, 3, ...]``, counted directly."""
    return pytest.approx(transition_counts(model, anchors, 128, dtype=dtype)[0], rel=1e-5)


def test_the_curves_are_built_once_and_again_when_dtype_or_anchors_change(monkeypatch):
    from lightning_sensitivity.callbacks import _anchors  # the one place the monitor builds its curves

    built = []
    monkeypatch.setattr(
        _anchors, "trajectory_through", lambda a, n: built.append(a.dtype) or trajectory_through(a, n)
    )
    monitor = small_monitor()
    train([monitor], max_epochs=2)
    assert built == [torch.float32] * 4  # two measurements, one build of the 2 + 2 curves

    # a float64 run measures along float64 curves (float32 ones would fail in a float64 model), built once
    built.clear()
    trainer, model = train([monitor], max_epochs=1, precision="64-true")
    assert built == [torch.float64] * 4
    for kind in ("on_manifold", "off_manifold"):
        logged = trainer.callback_metrics[f"sensitivity/transition_density_{kind}"]
        assert float(logged) == _expected_density(model, monitor.anchors[kind], torch.float64)

    # new anchors from a state dict: the next run measures along the curves through them
    state = monitor.state_dict()
    state["anchors"] = {kind: anchors + 1 for kind, anchors in state["anchors"].items()}  # off the data
    monitor.load_state_dict(state)
    built.clear()
    trainer, model = train([monitor], max_epochs=1)
    assert built == [torch.float32] * 4
    for kind in ("on_manifold", "off_manifold"):
        logged = trainer.callback_metrics[f"sensitivity/transition_density_{kind}"]
        assert float(logged) == _expected_density(model, state["anchors"][kind])


def test_outputs_that_are_not_logits_still_count(tmp_path):
    monitor = small_monitor(forward_fn=lambda module, x: module(x)[:, :, None])
    with pytest.warns(UserWarning, match="no Jacobian norm curve"):
        trainer, _ = train([monitor], max_epochs=1, logger=TensorBoardLogger(tmp_path))
    assert set(KEYS) <= set(trainer.callback_metrics)


def test_a_model_without_piecewise_linear_units_fails_at_the_first_batch():
    with pytest.raises(ValueError, match="tanh"):
        train([small_monitor()], max_epochs=1, model=MLPClassifier(activation="tanh"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_points": 7}, "num_points"),
        ({"num_trajectories": 0}, "num_trajectories"),
        ({"off_manifold": "x"}, "off_manifold"),
    ],
)
def test_misconfiguration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransitionMonitor(**kwargs)


def test_the_monitor_pickles_with_its_generator_state():
    import pickle

    monitor = small_monitor()
    generator = torch.Generator().manual_seed(123)
    torch.rand(3, generator=generator)
    monitor.load_state_dict({**monitor.state_dict(), "generator_state": generator.get_state()})
    copy = pickle.loads(pickle.dumps(monitor))
    assert torch.equal(copy.state_dict()["generator_state"], generator.get_state())
    assert torch.equal(copy.state_dict()["generator_state"], monitor.state_dict()["generator_state"])
    assert copy.state_key == monitor.state_key


def test_token_ids_fail_at_the_first_batch_with_a_hint():
    class Tokens(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embedding, self.head = (
                torch.nn.Embedding(10, 4),
                torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2)),
            )

        def forward(self, ids):
            return self.head(self.embedding(ids))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randint(0, 10, (16,)), torch.randint(0, 2, (16,)))
    trainer = pl.Trainer(max_epochs=1, callbacks=[small_monitor()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(TypeError, match="embeddings"):
        trainer.fit(Tokens(), torch.utils.data.DataLoader(data, batch_size=8))


# --- the resolution evidence ---------------------------------------------------------------------------------------


class Lines(pl.LightningModule):
    """Three fixed ReLU units on 2-D inputs, each on only within 20 degrees of its normal (at 60, 180 and 300
    degrees) along the unit circle; the one trained parameter, added to the logits, leaves them alone."""

    def __init__(self):
        super().__init__()
        normals = torch.tensor([60.0, 180.0, 300.0]).deg2rad()
        self.lines = torch.nn.Linear(2, 3).requires_grad_(False)
        with torch.no_grad():
            self.lines.weight.copy_(torch.stack([normals.cos(), normals.sin()], dim=1))
            self.lines.bias.fill_(-math.cos(math.radians(20)))
        self.head = torch.nn.Linear(3, 2).requires_grad_(False)
        self.offset = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.head(torch.relu(self.lines(x))) + self.offset

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_lines(num_points):
    """The monitor on ``Lines``, whose only 3 training points, at 0, 120 and 240 degrees on the unit circle, are the
    on-manifold anchors: the ellipse through them (in any order) is the unit circle, its points at 6 points per curve
    are every 60 degrees, and every other one is an anchor. So each unit is on around one of the 6 points and off at
    the 3 anchors: 6 transitions, none on every other point, a resolution of 1."""
    angles = torch.tensor([0.0, 120.0, 240.0]).deg2rad()
    data = torch.utils.data.TensorDataset(torch.stack([angles.cos(), angles.sin()], dim=1), torch.tensor([0, 1, 0]))
    monitor = TransitionMonitor(num_trajectories=1, num_points=num_points, every_n_epochs=1, log_figure=False)
    model = Lines()
    trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=3))
    return trainer, model, monitor


def test_an_unresolved_count_is_logged_and_warned_of_once_naming_the_model_and_what_to_set():
    with pytest.warns(UserWarning) as warned:
        trainer, model, monitor = fit_lines(num_points=6)
    messages = [str(w.message) for w in warned if "has not converged" in str(w.message)]
    assert len(messages) == 1
    for part in ("Lines", "on-manifold", "100.0%", "num_points=24", "method='exact'", "fewer units"):
        assert part in messages[0], part
    curve = trajectory_through(monitor.anchors["on_manifold"][0], 6)
    direct = count_transitions(model, curve)
    assert (direct.transitions, direct.transitions_half, direct.resolution) == (6, 0, 1.0)
    assert float(trainer.callback_metrics["sensitivity/transitions_resolution_on_manifold"]) == direct.resolution
    assert float(trainer.callback_metrics["sensitivity/transitions_on_manifold"]) == 6


def test_a_resolved_count_is_not_warned_of():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has not converged.*")
        trainer, model, monitor = fit_lines(num_points=600)
    for kind in ("on_manifold", "off_manifold"):
        curve = trajectory_through(monitor.anchors[kind][0], 600)
        direct = count_transitions(model, curve)
        logged = float(trainer.callback_metrics[f"sensitivity/transitions_resolution_{kind}"])
        assert logged == pytest.approx(direct.resolution, abs=1e-7) and logged <= monitor.convergence_tolerance
    assert float(trainer.callback_metrics["sensitivity/transitions_on_manifold"]) == 6


# --- the exact count ---------------------------------------------------------------------------------------------


def test_transition_monitor_exact_count_on_a_float32_relu_model(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("mlp", size=8), SyntheticImages(size=8)
    callbacks = [
        TransitionMonitor(
            num_trajectories=2, num_points=_synthetic.NUM_POINTS, every_n_epochs=1, method="exact", log_figure=False
        )
    ]
    trainer, capture = fit(model, dm, callbacks, tmp_path)
    check_logged(capture, callbacks, _synthetic.reference(model, dm), trainer=trainer)


def test_exact_count_refuses_a_model_with_smooth_units_before_training(tmp_path):
    pl.seed_everything(0)
    model, dm = ImageClassifier("gelu_layernorm_relu", size=8), SyntheticImages(size=8)
    callbacks = [
        TransitionMonitor(num_trajectories=1, num_points=_synthetic.NUM_POINTS, every_n_epochs=1, method="exact")
    ]
    with pytest.raises(ValueError, match="(?i)piecewise.linear|gelu|layer.?norm"):
        fit(model, dm, callbacks, tmp_path)
    assert model.trainer.global_step == 0
