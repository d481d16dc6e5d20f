"""Operations that are not piecewise linear, upstream of counted units: named, warned about, refused by the exact
count; piecewise-linear networks (batch norm in eval mode, pooling, residual sums, a softmax head) are not.

The reference for each network is what its architecture applies, by hand: torchvision's ``mobilenet_v3_small``
applies Hardswish and multiplies its activations by their squeeze-excitation gates, a transformer block applies
attention and layer norms before the ReLU of its feed-forward layer.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_sensitivity.functional import activation_codes, count_transitions, ellipse_through


class Block(nn.Module):
    """A transformer encoder block (softmax attention, layer norms) whose only counted unit is its ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="relu", batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class Gated(nn.Module):
    """``x * sigmoid(x)`` written by hand (a product of two input-dependent tensors), then a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(F.relu(h * torch.sigmoid(h)))


class Scaled(nn.Module):
    """Smooth functions of parameters only, and products with them: still piecewise linear in the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        self.log_scale = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * self.log_scale.exp() / self.log_scale.sigmoid() + 0.5 * self.fc(x)
        return torch.log_softmax(self.out(F.relu(h)), dim=1).exp()  # smooth, but after the last unit


class ReLUResNet(nn.Module):
    """Convolutions, batch norm (eval mode), max-pooling, a residual sum and adaptive average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(F.relu(h + self.branch(h)))


def gelu_layer_norm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


NOT_PIECEWISE_LINEAR = {  # model, point shape, operations that the network applies upstream of a unit
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        (3, 32, 32),
        {"hardswish", "mul"},
    ),
    "transformer block": (Block, (4, 8), {"multi_head_attention_forward", "layer_norm"}),
    "GELU and LayerNorm, ReLU head": (gelu_layer_norm, (6,), {"gelu", "layer_norm"}),
    "hand-written gate": (Gated, (4,), {"sigmoid", "mul"}),
}


def curve(shape, num_points=64):
    return ellipse_through(*torch.randn(3, *shape, generator=torch.Generator().manual_seed(0)), num_points)


@pytest.mark.parametrize("name", list(NOT_PIECEWISE_LINEAR))
def test_smooth_operations_upstream_of_units_are_named_warned_about_and_refused_by_the_exact_count(name):
    make, shape, expected = NOT_PIECEWISE_LINEAR[name]
    torch.manual_seed(0)
    model = make().eval()
    codes = activation_codes(model, torch.randn(2, *shape))
    assert set(codes.smooth_operations) == expected
    with pytest.warns(UserWarning, match="The model is not piecewise linear") as record:
        result = count_transitions(model, curve(shape))
    assert set(result.smooth_operations) == expected
    assert all(operation in str(record[0].message) for operation in expected)
    # Before stepping: with room for one region only, stepping on would raise a RuntimeError instead.
    with pytest.raises(ValueError, match="needs a piecewise-linear model") as error:
        count_transitions(model, curve(shape), method="exact", max_regions=1)
    assert all(operation in str(error.value) for operation in expected)


PIECEWISE_LINEAR = {
    "ReLU CNN (batch norm, max-pooling, residual sum, adaptive average pooling)": (ReLUResNet, (3, 16, 16)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "functions of parameters, a softmax after the last unit": (Scaled, (4,)),
}


@pytest.mark.parametrize("name", list(PIECEWISE_LINEAR))
def test_piecewise_linear_networks_are_not_warned_about(name):
    make, shape = PIECEWISE_LINEAR[name]
    torch.manual_seed(0)
    model = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert activation_codes(model, torch.randn(2, *shape)).smooth_operations == ()
        result = count_transitions(model, curve(shape))
        assert result.smooth_operations == ()
        assert result.transitions > 0


def test_the_exact_count_of_a_piecewise_linear_net_with_smooth_functions_of_its_parameters():
    torch.manual_seed(0)
    model = Scaled()
    along = curve((4,), num_points=600)
    exact = count_transitions(model, along, method="exact")
    dense = count_transitions(model, along, num_points=20_000)
    assert dense.converged and int(exact) == int(dense) > 0


def test_the_warning_comes_once_per_call_site_and_can_be_turned_off():
    model, along = gelu_layer_norm().eval(), curve((6,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per location
        for _ in range(3):
            count_transitions(model, along)
        count_transitions(model, [along, along, curve((6,), num_points=32)])  # one warning for the sequence
    messages = [str(w.message) for w in record if "not piecewise linear" in str(w.message)]
    assert len(messages) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = count_transitions(model, [along, along], warn_smooth=False)
    assert all(result.smooth_operations == ("gelu", "layer_norm") for result in quiet)


def test_a_network_without_counted_units_keeps_its_error():
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    for method in ("sampled", "exact"):
        with pytest.raises(ValueError, match="no piecewise-linear unit") as error:
            count_transitions(model, curve((6,)), method=method)
        assert "gelu" in str(error.value) and "layer_norm" in str(error.value)
