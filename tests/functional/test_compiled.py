"""Modules compiled with ``torch.compile``, in each of its three forms, are measured through their eager originals.

A backend that counts the calls of the compiled graph tells that the module really was compiled (the graph ran
once before the measurement) and that no measurement ran it; the values are those of an eager copy with the same
weights.
"""

import copy

import pytest
import torch
from torch import nn

from lightning_sensitivity.functional import (
    activation_codes,
    count_transitions,
    ellipse_through,
    jacobian_norm,
)
from tests._compiled import GraphCalls


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def compiled(form: str, backend):
    """An eager net, and the same net (same parameter tensors) compiled in one of the three forms."""
    torch.manual_seed(0)
    net = Net()
    net.features[1].running_mean.uniform_(-0.5, 0.5)
    eager = copy.deepcopy(net).eval()
    if form == "torch.compile(net)":
        model = torch.compile(net, backend=backend)
    elif form == "compiled submodule":
        net.features = torch.compile(net.features, backend=backend)
        model = net
    else:
        net.compile(backend=backend)
        model = net
    return eager, model


FORMS = ["torch.compile(net)", "compiled submodule", "module.compile()"]


@pytest.mark.parametrize("form", FORMS)
def test_measurements_of_a_compiled_module_equal_the_eager_ones_and_never_run_the_graph(form):
    torch._dynamo.reset()
    backend = GraphCalls()
    eager, model = compiled(form, backend)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        model.eval()(x)  # compiles, and runs the graph once (in eval mode: batch norm keeps its statistics)
    assert backend.compiled >= 1 and backend.calls >= 1
    calls = backend.calls
    model.train()  # measured in eval mode all the same

    curve = ellipse_through(*torch.randn(3, 1, 8, 8), num_points=64)
    torch.testing.assert_close(jacobian_norm(model, x), jacobian_norm(eager, x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        jacobian_norm(model, x, output="logits"), jacobian_norm(eager, x, output="logits"), rtol=1e-5, atol=1e-7
    )
    codes, expected = activation_codes(model, x), activation_codes(eager, x)
    assert torch.equal(codes.sides, expected.sides) and torch.equal(codes.winners, expected.winners)
    for method in ("sampled", "exact"):
        count = count_transitions(model, curve, method=method)
        assert int(count) == int(count_transitions(eager, curve, method=method)) > 0
    assert backend.calls == calls  # no measurement ran the compiled graph

    # Afterwards the module is compiled as before, and in its own mode.
    assert model.training
    with torch.no_grad():
        model.eval()(x)
    assert backend.calls > calls


@pytest.mark.slow
def test_the_default_backend_whose_graph_cannot_take_the_jacobians_backward_passes():
    # Inductor: a batched double backward through its graph raises (donated buffers) or, forced, gives wrong norms.
    torch._dynamo.reset()
    eager, model = compiled("torch.compile(net)", "inductor")
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)  # compiled and run
    torch.testing.assert_close(jacobian_norm(model, x), jacobian_norm(eager, x), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_the_default_backend_counts_the_transitions_of_the_eager_original():
    torch._dynamo.reset()
    eager, model = compiled("torch.compile(net)", "inductor")
    curve = ellipse_through(*torch.randn(3, 1, 8, 8), num_points=64)
    assert int(count_transitions(model.eval(), curve)) == int(count_transitions(eager, curve)) > 0


def test_the_compiled_forms_are_restored_when_the_model_raises():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.compile(nn.Linear(4, 4), backend=GraphCalls())
            self.head = nn.Linear(4, 2)
            self.head.compile(backend=GraphCalls())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not isinstance(self.features, torch._dynamo.eval_frame.OptimizedModule)  # the eager original
            raise RuntimeError("the model's own error")

    model = Failing()
    compiled_features, compiled_call = model.features, model.head._compiled_call_impl
    with pytest.raises(RuntimeError, match="the model's own error"):
        activation_codes(model, torch.randn(3, 4))
    assert model.features is compiled_features and model.head._compiled_call_impl is compiled_call
