"""F2's measurement along the ellipses: where each point lies relative to the anchors, and the random ellipses'
construction (nowhere near the data, at its scale)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from examples.paper.manifold import (
    distance_to_anchor,
    distance_to_circle,
    manifold_anchors,
    nearest_neighbour_spacing,
    random_ellipse,
)
from lightning_sensitivity.functional import ellipse_through


def test_distance_to_the_nearest_anchor() -> None:
    t = np.array([0, np.pi / 6, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi, 5 * np.pi / 3, 2 * np.pi - 0.01])
    np.testing.assert_allclose(distance_to_anchor(t), [0, 0.5, 1, 0.5, 0, 1, 1, 0.01 / (np.pi / 3)], atol=1e-12)


def _clustered_data(seed: int) -> torch.Tensor:
    """Points near a few centres in 30 dimensions, shaped as images [N, 1, 5, 6], like data that does not fill
    its space."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(5, 30, generator=generator)
    x = centres[torch.randint(0, 5, (300,), generator=generator)] + 0.05 * torch.randn(300, 30, generator=generator)
    return x.reshape(300, 1, 5, 6)


def test_nearest_neighbour_spacing_by_brute_force() -> None:
    x = _clustered_data(0)
    flat = x.flatten(1).double()
    distances = torch.cdist(flat, flat) + torch.diag(torch.full((len(flat),), math.inf, dtype=torch.float64))
    assert nearest_neighbour_spacing(x) == pytest.approx(float(np.median(distances.min(1).values.numpy())))
    # On a subset the nearest neighbours are farther: the estimate never comes out smaller.
    assert nearest_neighbour_spacing(x, max_points=50) >= nearest_neighbour_spacing(x)


@pytest.mark.parametrize("seed", range(3))
def test_random_ellipse_keeps_its_clearance_from_every_training_point(seed: int) -> None:
    x = _clustered_data(seed)
    flat = x.flatten(1).double()
    clearance = nearest_neighbour_spacing(x)
    anchors, least = random_ellipse(x, clearance, torch.Generator().manual_seed(seed))
    assert anchors.shape == (3, 1, 5, 6)
    # The ellipse through the three anchors, densely discretized, measured against every training point directly.
    curve = ellipse_through(*anchors.double(), num_points=6000).points.flatten(1)
    brute = torch.cdist(curve, flat).min()
    assert least >= clearance
    assert float(brute) >= clearance
    assert float(brute) == pytest.approx(least, rel=1e-4)  # the closed form is the curve's least distance
    # At the data's scale: a circle about the mean, of radius the points' root-mean-square distance from it.
    centre = flat.mean(0)
    radius = float((flat - centre).pow(2).sum(1).mean().sqrt())
    np.testing.assert_allclose((curve - centre).norm(dim=1).numpy(), radius, rtol=1e-5)


def test_distance_to_circle_against_a_dense_discretization() -> None:
    generator = torch.Generator().manual_seed(4)
    directions = torch.linalg.qr(torch.randn(7, 2, generator=generator, dtype=torch.float64)).Q.T
    centre, radius = torch.randn(7, generator=generator, dtype=torch.float64), 1.7
    points = torch.randn(20, 7, generator=generator, dtype=torch.float64) * 2
    t = torch.linspace(0, 2 * math.pi, 200_001, dtype=torch.float64)
    circle = centre + radius * (t.cos()[:, None] * directions[0] + t.sin()[:, None] * directions[1])
    torch.testing.assert_close(distance_to_circle(points, centre, directions, radius),
                               torch.cdist(points, circle).min(1).values, rtol=1e-6, atol=1e-9)


def test_a_random_ellipse_too_close_to_the_data_is_refused() -> None:
    with pytest.raises(RuntimeError, match="random ellipses passed at least"):
        random_ellipse(_clustered_data(0), 1e6, torch.Generator().manual_seed(0), max_draws=3)


def test_anchor_kinds() -> None:
    x = _clustered_data(1)
    y = torch.arange(300) % 10
    anchors, distances = manifold_anchors(x, y, 4, seed=0, clearance=nearest_neighbour_spacing(x))
    by_kind = {k: [tuple(int(y[(x == a).flatten(1).all(1)].item()) for a in anchors[k][3 * i : 3 * i + 3])
                   for i in range(4)] for k in ("same class", "different classes")}
    assert all(len(set(c)) == 1 for c in by_kind["same class"])
    assert all(len(set(c)) == 3 for c in by_kind["different classes"])
    assert anchors["random ellipse"].shape == (12, 1, 5, 6) and len(distances) == 4
    with pytest.raises(ValueError, match="need 3 classes"):
        manifold_anchors(x, y % 2, 1, seed=0, clearance=0.0)
