r"""``TransitionDensity``: the mean linear-region transition density over trajectories, as a torchmetrics ``Metric``.

The per-trajectory counts :math:`T_n` and arc lengths :math:`L_n` come from
:func:`lightning_sensitivity.functional.count_transitions` (a forward pass does not belong in ``Metric.update``).
The metric accumulates

.. math::

    \bar\rho = \frac{1}{N} \sum_{n=1}^{N} \frac{T_n}{L_n}

with ``sum``-reduced states, so that DDP ranks combine into exactly the one-process result.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TransitionDensity"]


def _transition_density_update(transitions: Tensor, arc_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-trajectory densities summed, transitions summed, and the number of trajectories."""
    if transitions.shape != arc_lengths.shape or transitions.ndim != 1:
        raise ValueError(
            "Expected one transition count and one arc length per trajectory (two 1-D tensors of the same length), "
            f"got shapes {tuple(transitions.shape)} and {tuple(arc_lengths.shape)}."
        )
    if bool((arc_lengths <= 0).any()):
        raise ValueError("Every trajectory needs a positive arc length (its anchors must not all coincide).")
    transitions = transitions.to(torch.float64)
    density = transitions / arc_lengths.to(torch.float64)
    count = torch.tensor(float(len(transitions)), dtype=torch.float64, device=transitions.device)
    return density.sum(), transitions.sum(), count


def _transition_density_compute(density_sum: Tensor, num_trajectories: Tensor) -> Tensor:
    r"""The mean transition density over trajectories, :math:`\frac{1}{N}\sum_n T_n / L_n` (NaN for none)."""
    if num_trajectories == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=density_sum.device)
    return density_sum / num_trajectories


class TransitionDensity(Metric):
    r"""Mean transitions per unit of arc length, over trajectories.

    ``update(transitions, arc_lengths)`` takes one count and one arc length per trajectory (two 1-D tensors).
    ``compute()`` returns :math:`\frac{1}{N}\sum_n T_n / L_n` (NaN before any update); the states
    ``transitions`` (:math:`\sum_n T_n`) and ``num_trajectories`` give the raw mean count.

    The inputs are detached in ``update``: the results carry no graph (``is_differentiable = False``). The class is
    scriptable with ``torch.jit.script`` (as torchmetrics checks its own); ``update`` runs in Python.

    Args:
        kwargs: passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``update`` gets tensors of different shapes, not 1-D, or a non-positive arc length.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.metrics import TransitionDensity
        >>> metric = TransitionDensity()
        >>> metric.update(torch.tensor([4, 10]), torch.tensor([2.0, 5.0]))
        >>> metric.update(torch.tensor([3]), torch.tensor([1.0]))
        >>> metric.compute()
        tensor(2.3333, dtype=torch.float64)
        >>> float(metric.mean_transitions())  # the mean raw count
        5.666666666666667
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0

    density_sum: Tensor
    transitions: Tensor
    num_trajectories: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("density_sum", "transitions", "num_trajectories"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, transitions: Tensor, arc_lengths: Tensor) -> None:
        """Add the counts ``[N]`` and arc lengths ``[N]`` of ``N`` trajectories."""
        density_sum, total, count = _transition_density_update(transitions.detach(), arc_lengths.detach())
        self.density_sum += density_sum
        self.transitions += total
        self.num_trajectories += count

    def compute(self) -> Tensor:
        """The mean transition density."""
        return _transition_density_compute(self.density_sum, self.num_trajectories)

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot the mean density (``val``: a result of ``compute`` or ``forward``, default ``compute()``), or its
        course over a sequence of results, with matplotlib (torchmetrics' own plot; ``ax``: the matplotlib axes to
        draw in, default a new figure).

        Returns:
            The matplotlib figure and axes.

        Raises:
            ModuleNotFoundError: if matplotlib is not installed.

        Example:
            >>> import torch
            >>> from lightning_sensitivity.metrics import TransitionDensity
            >>> metric = TransitionDensity()
            >>> fig, ax = metric.plot([metric(torch.tensor([n, 2 * n]), torch.tensor([2.0, 3.0])) for n in range(4)])
        """
        return self._plot(val, ax)

    def mean_transitions(self) -> Tensor:
        """The mean raw count per trajectory, :math:`\\frac{1}{N}\\sum_n T_n`, over every process (a collective
        under DDP: every process must call it)."""
        with self.sync_context(should_sync=True, should_unsync=True):
            return _transition_density_compute(self.transitions, self.num_trajectories)
