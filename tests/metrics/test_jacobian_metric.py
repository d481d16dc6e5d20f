"""``JacobianNorm``: mean via sum and count, kept values, NaN exclusion (rank combination: ``test_distributed.py``)."""

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


def test_bad_update_and_no_values():
    with pytest.raises(ValueError, match=r"per-point norms of shape \[B\]"):
        JacobianNorm().update(torch.rand(2, 3))
    metric = JacobianNorm(keep_values=False)
    metric.update(torch.rand(3))
    with pytest.raises(RuntimeError, match="keep_values=True"):
        metric.per_point()
