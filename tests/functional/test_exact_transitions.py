"""The exact count runs in float64 whatever form the model takes: an ``nn.Module``, a module wrapping another one, a
``functools.partial`` or a closure over a module; a callable that holds no module and fails on float64 inputs gets a
clear error. The reference is the exact count of the float32 network itself (cast internally), and a dense sampled
count."""

import functools

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
