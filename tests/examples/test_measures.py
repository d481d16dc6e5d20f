"""How every model is measured: losses and accuracies, per-point records and the baselines, against direct
computations; and every measure copes with a model whose weights or outputs are not finite."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.paper.measures import (
    CHUNK,
    POINT_STATISTICS,
    loss_and_accuracy,
    measure,
    num_units,
    parameter_measures,
    point_records,
    sharpness,
)


def test_loss_and_accuracy_in_eval_mode_over_chunks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).train()
    x, y = torch.randn(CHUNK + 100, 5), torch.randint(0, 4, (CHUNK + 100,))
    loss, accuracy = loss_and_accuracy(net, x, y)
    assert net.training  # its mode restored
    reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        logits = reference(x).double()
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert accuracy == pytest.approx((logits.argmax(1) == y).double().mean().item(), rel=1e-6)
    assert 0 < accuracy < 1


def test_point_records_by_hand() -> None:
    torch.manual_seed(1)
    logits, labels, norms = torch.randn(20, 3) * 4, torch.randint(0, 3, (20,)), torch.rand(20)
    rows = point_records(norms, logits, labels)
    assert list(rows.columns) == ["index", "label", "prediction", "loss", "jacobian_norm", "max_softmax", "entropy"]
    assert rows["index"].tolist() == list(range(20)) and rows.label.tolist() == labels.tolist()
    assert rows.prediction.tolist() == logits.argmax(1).tolist()
    p = torch.softmax(logits.double(), 1)
    # the loss is float32's cross-entropy: within a float32 rounding of the log-sum-exp
    np.testing.assert_allclose(rows.loss, -p[torch.arange(20), labels].log().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rows.jacobian_norm, norms.double().numpy())
    np.testing.assert_allclose(rows.max_softmax, p.max(1).values.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rows.entropy, -(p * p.log()).sum(1).numpy(), rtol=1e-12)


def test_parameter_measures_by_hand() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -2.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    initial = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    out = parameter_measures(net, initial)
    assert out["param_norm"] == pytest.approx(math.sqrt(9 + 4 + 1 + 1))
    assert out["distance_from_init"] == pytest.approx(out["param_norm"])
    assert out["log_spectral_product"] == pytest.approx(math.log10(3 * math.sqrt(2)))
    same = {name: p.detach().clone() for name, p in net.named_parameters()}
    assert parameter_measures(net, same)["distance_from_init"] == 0


def test_sharpness_is_seeded_reproducible_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    before = copy.deepcopy(net.state_dict())
    rng_state = torch.get_rng_state()
    value = sharpness(net, x, y, scale=0.2, draws=4, seed=7)
    assert value == sharpness(net, x, y, scale=0.2, draws=4, seed=7)
    assert value != sharpness(net, x, y, scale=0.2, draws=4, seed=8)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own generator, not the global stream
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[key])
    # A naive reference: perturb a copy in place, tensor by tensor, with the same draws.
    generator = torch.Generator().manual_seed(7)
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        base = loss(net(x), y).item()
        increases = []
        for _ in range(4):
            other = copy.deepcopy(net)
            for p in other.parameters():
                u = torch.randn(p.shape, generator=generator)
                p += 0.2 * p.norm() * u / u.norm()
            increases.append(loss(other(x), y).item() - base)
    assert value == pytest.approx(np.mean(increases), rel=1e-6)
    assert sharpness(net, x, y, scale=0.0, draws=2) == pytest.approx(0.0, abs=1e-7)


def test_the_spectral_norm_of_a_non_finite_weight_is_nan_not_an_error() -> None:
    # The SVD raised on such a weight and ended a whole sweep once.
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        net[0].weight[0, 0] = float("inf")
    out = parameter_measures(net, initial)
    assert math.isnan(out["log_spectral_product"]) and math.isinf(out["param_norm"])


def test_a_model_that_overflows_is_measured_as_nan_without_raising() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        net[1].weight.mul_(1e30)
        net[3].weight.mul_(1e30)  # finite weights, infinite logits
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    summary, points = measure(net, initial, x, y, x[:20], y[:20], seed=0)
    for key in ("transitions", "transition_density", "jacobian_norm", *POINT_STATISTICS):
        assert math.isnan(summary[key]), key
    assert math.isfinite(summary["log_spectral_product"]) and len(points) == 20


def test_num_units_counts_every_piecewise_linear_element() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.Hardtanh(), nn.Linear(5, 2))
    assert num_units(net, torch.randn(1, 3, 2, 2)) == 7 + 5
