"""``TransitionDensity``: the mean of per-trajectory densities, with sum-reduced states."""

import pytest
import torch

from lightning_sensitivity.functional import count_transitions, ellipse_through
from lightning_sensitivity.metrics import TransitionDensity


def test_mean_of_per_trajectory_densities_from_count_transitions():
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    counts = [count_transitions(model, ellipse_through(*torch.randn(3, 4), num_points=300)) for _ in range(5)]
    metric = TransitionDensity()
    metric.update(
        torch.tensor([c.transitions for c in counts[:2]]), torch.tensor([c.arc_length for c in counts[:2]])
    )
    metric.update(
        torch.tensor([c.transitions for c in counts[2:]]), torch.tensor([c.arc_length for c in counts[2:]])
    )
    assert metric.compute().item() == pytest.approx(sum(c.density for c in counts) / 5)
    assert metric.transitions.item() == sum(c.transitions for c in counts)
    assert metric.num_trajectories.item() == 5


def test_the_mean_of_densities_and_of_counts():
    transitions, lengths = torch.tensor([3, 8, 0, 5]), torch.tensor([1.0, 2.0, 0.5, 4.0])
    whole = TransitionDensity()
    whole.update(transitions, lengths)
    assert whole.compute().item() == pytest.approx((3 / 1 + 8 / 2 + 0 + 5 / 4) / 4)
    assert whole.mean_transitions().item() == pytest.approx(16 / 4)


def test_empty_reset_and_bad_updates():
    metric = TransitionDensity()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())
    metric.update(torch.tensor([2]), torch.tensor([1.0]))
    metric.reset()
    assert metric.num_trajectories.item() == 0
    with pytest.raises(ValueError, match="same length"):
        metric.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="positive arc length"):
        metric.update(torch.tensor([1]), torch.tensor([0.0]))
