"""``JacobianNorm``: mean via sum and count, kept values, NaN exclusion, and rank combination."""

import pytest
import torch

from lightning_sensitivity.metrics import JacobianNorm


def test_mean_and_per_point_values():
    values = torch.rand(50)
    metric = JacobianNorm()
    for chunk in values.split(7):
        metric.update(chunk)
    torch.testing.assert_close(metric.compute(), values.mean())
    torch.testing.assert_close(metric.per_point(), values)


def test_non_finite_values_are_excluded_and_counted():
    metric = JacobianNorm()
    metric.update(torch.tensor([1.0, float("inf"), 3.0, float("nan")]))
    assert metric.compute().item() == 2.0
    assert int(metric.num_excluded) == 2
    assert metric.per_point().tolist() == [1.0, 3.0]


def test_empty_metric_is_nan_and_reset():
    metric = JacobianNorm()
    assert torch.isnan(metric.compute())
    metric.update(torch.tensor([2.0]))
    metric.reset()
    metric.update(torch.tensor([4.0]))
    assert metric.compute().item() == 4.0


def test_states_combine_like_one_process():
    """Two "ranks" merged with the states' own reductions equal one metric over all the data."""
    values = torch.rand(30)
    whole, rank0, rank1 = JacobianNorm(), JacobianNorm(), JacobianNorm()
    whole.update(values)
    rank0.update(values[::2])
    rank1.update(values[1::2])
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), whole.compute())
    assert JacobianNorm.full_state_update is False
    assert {rank0._reductions[k].__name__ for k in ("total", "count", "num_excluded")} == {"dim_zero_sum"}


def test_bad_update_and_no_values():
    with pytest.raises(ValueError, match=r"per-point norms of shape \[B\]"):
        JacobianNorm().update(torch.rand(2, 3))
    metric = JacobianNorm(keep_values=False)
    metric.update(torch.rand(3))
    with pytest.raises(RuntimeError, match="keep_values=True"):
        metric.per_point()
