"""The exact count: against the closed form of one hidden layer, at crossings that follow each other closely, and in
float64 whatever form the model takes (an ``nn.Module``, a module wrapping another one, a ``functools.partial``, a
closure or a bound method; a callable that holds no module and fails on float64 inputs gets a clear error)."""

import functools
import math

import pytest
import torch
from torch import nn

from lightning_sensitivity.functional import count_transitions, ellipse_through


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU6(), nn.Linear(32, 4))


class Wrapper(nn.Module):
    """What a monitor passes: a module whose forward calls the user's module through a function of both."""

    def __init__(self, module: nn.Module, forward_fn) -> None:
        super().__init__()
        self.module, self.forward_fn = module, forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.module, x)


def forward_fn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class PlainWeights:
    """A callable that keeps float32 weights as plain tensors: nothing to cast."""

    def __init__(self, module: nn.Module) -> None:
        self.weights = [(layer.weight.detach(), layer.bias.detach()) for layer in module if isinstance(layer, nn.Linear)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for weight, bias in self.weights[:-1]:
            x = torch.relu(x @ weight.T + bias)
        return x @ self.weights[-1][0].T + self.weights[-1][1]


def test_every_form_of_a_float32_model_is_counted_exactly_in_float64():
    model = network()
    along = ellipse_through(*torch.randn(3, 5), num_points=600)
    expected = count_transitions(model, along, method="exact")
    dense = count_transitions(model, along, num_points=40_000)
    assert dense.converged and int(dense) == int(expected) > 10
    forms = {
        "wrapper module": Wrapper(model, forward_fn),
        "functools.partial": functools.partial(forward_fn, model),
        "closure": lambda x: model(x),
        "bound method": model.forward,
    }
    for name, form in forms.items():
        count = count_transitions(form, along, method="exact")
        assert (count.transitions, count.regions) == (expected.transitions, expected.regions), name
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_a_callable_holding_no_module_runs_as_it_is_or_fails_clearly():
    model = network()
    along = ellipse_through(*torch.randn(3, 5), num_points=600)
    with pytest.raises(TypeError, match="failed on float64 inputs") as error:
        count_transitions(PlainWeights(model), along, method="exact")
    assert isinstance(error.value.__cause__, RuntimeError)  # the model's own error is kept
    # Float64 weights need no cast: the same count as the module's.
    double = PlainWeights(network().double())
    assert int(count_transitions(double, along, method="exact")) == int(count_transitions(model, along, method="exact"))


def closed_form_count(layer, curve):
    """One hidden layer: unit i's input along the ellipse is alpha + beta cos t + gamma sin t, which has two zeros
    on [0, 2 pi) when |alpha| < hypot(beta, gamma) and none otherwise (a tangency has measure zero)."""
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    alpha = weight @ curve.constant.flatten() + bias
    beta, gamma = weight @ curve.cosines[0].flatten(), weight @ curve.sines[0].flatten()
    return 2 * int((alpha.abs() < torch.hypot(beta, gamma)).sum())


def test_exact_equals_the_closed_form_of_one_hidden_layer_on_many_ellipses():
    # Small ellipses through 64-d points, 256 units: ~37 crossings each, and often a unit whose two crossings
    # follow each other with no other unit crossing in between. Reading regions at float32 times missed such
    # pairs on 7 of these 200 ellipses.
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 256)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(256, 64, generator=generator) / 8.0)
        layer.bias.copy_(torch.randn(256, generator=generator))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(256, 10))
    mismatches = []
    for index in range(200):
        curve = ellipse_through(*(0.1 * torch.randn(3, 64, generator=generator)), num_points=6)
        exact, expected = (
            int(count_transitions(model, curve, method="exact")),
            closed_form_count(layer, curve),
        )
        if exact != expected:
            mismatches.append((index, exact, expected))
    assert not mismatches


def test_a_unit_crossing_back_before_any_other_unit_crosses_counts_two():
    # The F2 case (a trained digits MLP, 124 exact against 126) in two dimensions: unit 0 is positive on
    # (t1, t1 + 0.3) only, and no other unit crosses in between. The region after t1 is read at t1 + 1e-8; in
    # float32 that time rounds to 4.0, short of t1, so the region read was the one before t1, the search for the
    # next crossing went on after t1 + 1e-8, and the next region read was past t1 + 0.3: both crossings lost.
    t1, half_width = 4.0 + 1e-7, 0.15
    assert torch.tensor([t1 + 1e-8], dtype=torch.float32).item() < t1  # the trap this case is built on
    normal, other = t1 + half_width, 1.0  # unit 1: a line through the centre, crossed at 1 +- pi / 2
    layer = nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(
            torch.tensor([[math.cos(normal), math.sin(normal)], [math.cos(other), math.sin(other)]])
        )
        layer.bias.copy_(torch.tensor([-math.cos(half_width), 0.0]))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(2, 3).double())
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    circle = ellipse_through(*torch.stack([angles.cos(), angles.sin()], dim=1), num_points=600)
    exact = count_transitions(model, circle, method="exact")
    assert int(exact) == closed_form_count(layer, circle) == int(count_transitions(model, circle)) == 4
    assert exact.regions == 5
