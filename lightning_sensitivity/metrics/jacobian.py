r"""``JacobianNorm``: the mean of per-point Jacobian norms, as a torchmetrics ``Metric``.

The norms themselves come from :func:`lightning_sensitivity.functional.jacobian_norm` (``Metric.update``
runs with gradients disabled, so the Jacobians are computed before it). The metric accumulates

.. math::

    \bar s = \frac{1}{N} \sum_{n=1}^{N} s(x_n)

with ``sum``-reduced states, so that DDP ranks combine into exactly the one-process result, and keeps the
per-point values (``cat``-reduced) for histograms and per-point analyses.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["JacobianNorm"]


def _jacobian_norm_update(norms: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The finite norms of a batch: their sum (float64), their number, the number left out, and the values."""
    if not isinstance(norms, Tensor) or norms.ndim != 1:
        shape = tuple(norms.shape) if isinstance(norms, Tensor) else type(norms).__name__
        raise ValueError(f"`JacobianNorm.update` expects per-point norms of shape [B], got {shape}.")
    values = norms[torch.isfinite(norms)]
    return values.double().sum(), torch.tensor(values.numel()), torch.tensor(norms.numel() - values.numel()), values


def _jacobian_norm_compute(total: Tensor, count: Tensor) -> Tensor:
    r"""The mean :math:`\bar s = \frac{1}{N}\sum_n s(x_n)` of the finite norms (NaN when there are none)."""
    if count == 0:
        return torch.tensor(float("nan"), device=total.device)
    return (total / count).float()


class JacobianNorm(Metric):
    r"""Mean Jacobian norm over points, with the per-point values kept.

    ``update(norms)`` takes per-point norms ``[B]`` (for example from
    :func:`~lightning_sensitivity.functional.jacobian_norm`). Values that are NaN or infinite are left out of
    the mean and counted in ``num_excluded``. ``compute()`` returns the mean of the finite values (NaN when
    there are none); :meth:`per_point` returns all finite values, gathered from every process.

    The norms are detached in ``update``: the results carry no graph (``is_differentiable = False``). The class is
    scriptable with ``torch.jit.script`` (as torchmetrics checks its own); ``update`` runs in Python.

    Args:
        keep_values: keep the per-point values (needed for :meth:`per_point`); ``False`` keeps memory
            constant when only the mean is wanted.
        kwargs: passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``update`` receives anything but a 1-D tensor.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.metrics import JacobianNorm
        >>> metric = JacobianNorm()
        >>> metric.update(torch.tensor([1.0, 2.0]))
        >>> metric.update(torch.tensor([3.0, float("nan")]))
        >>> metric.compute()
        tensor(2.)
        >>> int(metric.num_excluded)
        1
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    total: Tensor
    count: Tensor
    num_excluded: Tensor

    def __init__(self, keep_values: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_values = keep_values
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_excluded", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if keep_values:
            self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, norms: Tensor) -> None:
        """Add per-point norms ``[B]``."""
        total, count, excluded, values = _jacobian_norm_update(norms.detach() if isinstance(norms, Tensor) else norms)
        self.total += total.to(self.total.device)
        self.count += count.to(self.count.device)
        self.num_excluded += excluded.to(self.num_excluded.device)
        if self.keep_values:
            self.values.append(values.float())

    def compute(self) -> Tensor:
        """The mean of the finite per-point norms."""
        return _jacobian_norm_compute(self.total, self.count)

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot the mean (``val``: a result of ``compute`` or ``forward``, default ``compute()``), or its course over a
        sequence of results, with matplotlib (torchmetrics' own plot; ``ax``: the matplotlib axes to draw in,
        default a new figure).

        Returns:
            The matplotlib figure and axes.

        Raises:
            ModuleNotFoundError: if matplotlib is not installed.

        Example:
            >>> import torch
            >>> from lightning_sensitivity.metrics import JacobianNorm
            >>> metric = JacobianNorm()
            >>> values = [metric(torch.rand(8) / (epoch + 1)) for epoch in range(5)]
            >>> fig, ax = metric.plot(values)
        """
        return self._plot(val, ax)

    def per_point(self) -> Tensor:
        """All finite per-point values seen since the last reset, gathered from every process.

        Under DDP this is a collective call: every process must call it.
        """
        if not self.keep_values:
            raise RuntimeError("`per_point` needs `JacobianNorm(keep_values=True)`.")
        with self.sync_context(should_sync=True, should_unsync=True):
            # Synchronized across processes, the list state is one concatenated tensor (possibly empty).
            if isinstance(self.values, Tensor) or self.values:
                return dim_zero_cat(self.values)
            return torch.zeros(0, device=self.total.device)
