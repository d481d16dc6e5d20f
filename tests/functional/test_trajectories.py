"""Trajectories: trigonometric interpolation through anchors, arc length, off-manifold anchors."""

import math

import pytest
import torch
from torch import nn

from lightning_sensitivity.functional import (
    count_transitions,
    ellipse_through,
    gaussian_anchors,
    shuffled_anchors,
    trajectory_through,
)


def test_ellipse_passes_through_its_anchors_and_is_closed():
    a, b, c = torch.randn(3, 2, 5)
    curve = ellipse_through(a, b, c, num_points=30)
    points = curve.points
    assert points.shape == (30, 2, 5) and points.dtype == torch.float32
    assert curve.order == 1
    torch.testing.assert_close(points[0], a)
    torch.testing.assert_close(points[10], b)
    torch.testing.assert_close(points[20], c)
    # closed: the point after the last one is the first
    torch.testing.assert_close(curve.at(torch.tensor([2 * math.pi])), a[None])
    # the coefficients in closed form
    torch.testing.assert_close(curve.constant.float(), (a + b + c) / 3)
    torch.testing.assert_close(curve.sines[0].float(), (b - c) / math.sqrt(3))


@pytest.mark.parametrize("n", [4, 5, 8])
def test_higher_order_interpolation_through_any_number_of_anchors(n):
    anchors = torch.randn(n, 7, dtype=torch.float64)
    curve = trajectory_through(anchors, num_points=4 * n)
    assert curve.order == n // 2
    torch.testing.assert_close(curve.points[::4], anchors)
    torch.testing.assert_close(curve.at(curve.anchor_times), anchors)


def test_arc_length_of_a_circle():
    radius = 2.5
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    anchors = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    circle = ellipse_through(*anchors, num_points=12)
    # on its own discretization: the regular 12-gon, 12 * 2r sin(pi / 12)
    assert circle.arc_length() == pytest.approx(12 * 2 * radius * math.sin(math.pi / 12), rel=1e-6)
    assert circle.arc_length(num_points=20_000, chunk_size=999) == pytest.approx(
        2 * math.pi * radius, rel=1e-6
    )


def test_bad_anchors():
    with pytest.raises(ValueError, match="at least 3 anchors"):
        trajectory_through(torch.randn(2, 4), 10)
    with pytest.raises(ValueError, match="same shape"):
        ellipse_through(torch.randn(4), torch.randn(4), torch.randn(5), 10)
    with pytest.raises(TypeError, match="floating point"):
        trajectory_through(torch.arange(12).reshape(3, 4), 10)
    with pytest.raises(ValueError, match="num_points"):
        ellipse_through(torch.randn(4), torch.randn(4), torch.randn(4), 2)


def test_gaussian_anchors_match_mean_and_std_and_use_only_their_generator():
    mean, std = torch.tensor([0.0, 5.0, -1.0]), torch.tensor([1.0, 0.1, 3.0])
    state = torch.get_rng_state()
    points = gaussian_anchors(mean, std, 20_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(points.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(points.std(0), std, atol=0.05, rtol=0.02)
    again = gaussian_anchors(mean, std, 20_000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(points, again)


def test_shuffled_anchors_permute_each_point_independently():
    x = torch.randn(5, 2, 3, 3)
    state = torch.get_rng_state()
    shuffled = shuffled_anchors(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert shuffled.shape == x.shape
    assert torch.equal(shuffled.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(shuffled, x)


def test_points_at_any_times_are_the_trigonometric_sum_of_the_coefficients():
    curve = trajectory_through(torch.randn(5, 2, 3), num_points=40)
    t = torch.rand(17, dtype=torch.float64) * 6.0
    points = curve.at(t)
    assert points.shape == (17, 2, 3) and points.dtype == torch.float32
    j = torch.arange(1, curve.order + 1, dtype=torch.float64)
    cos, sin = (t[:, None] * j).cos(), (t[:, None] * j).sin()
    expected = curve.constant + torch.einsum("tm,m...->t...", cos, curve.cosines)
    expected = expected + torch.einsum("tm,m...->t...", sin, curve.sines)
    assert torch.allclose(points, expected.float(), rtol=0, atol=1e-6)
    assert curve.at(t, dtype=torch.float64).dtype == torch.float64


class _Recording(nn.Module):
    """A small ReLU network that keeps every batch it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_points_of_several_curves_at_once_equal_each_curves_points():
    # Counting several curves of one length evaluates their points together, curve after curve: the first curve
    # alone (its pass follows the data flow), the others in one batch.
    curves = [trajectory_through(torch.randn(5, 2, 3), num_points=40) for _ in range(3)]
    model = _Recording()
    count_transitions(model, curves)
    assert [len(x) for x in model.inputs] == [40, 2 * 40]
    together = torch.cat(model.inputs)
    assert together.shape == (3 * 40, 2, 3) and together.dtype == torch.float32
    assert torch.allclose(together, torch.cat([curve.points for curve in curves]), rtol=0, atol=1e-6)
