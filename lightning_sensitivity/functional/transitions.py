r"""Linear-region transitions along a closed trajectory (Novak et al., ICLR 2018): :func:`count_transitions`.

With :math:`k` points :math:`z_i = z(2\pi i / k)` of a closed curve and the activation codes :math:`c` of
:mod:`~lightning_sensitivity.functional.activations`, the number of transitions is

.. math::

    T_k = \sum_{i=0}^{k-1} d\big(c(z_i),\, c(z_{(i+1) \bmod k})\big),

the unit boundaries crossed between consecutive points, and the *transition density* is :math:`T_k` divided by
the arc length of the same polygon. A unit that flips twice between two points is missed, so
:math:`T_k` grows towards the true count as :math:`k` grows; the sampled count therefore also reports
:math:`T_{k/2}`, the count on every other point, computed in the same pass, and its resolution
:math:`(T_k - T_{k/2}) / \max(T_k, 1)` (:attr:`TransitionCount.resolution`): the evidence of how fine the
discretization is.

The sampled count is computed in :mod:`~lightning_sensitivity.functional.sampled_transitions`. For a
piecewise-linear network the count can be made exact along an ellipse, by stepping from linear region to linear
region: :mod:`~lightning_sensitivity.functional.exact_transitions`.

A network with other non-linearities upstream of its units (Hardswish, GELU, softmax attention, LayerNorm, a
product of activations) is not piecewise linear: the sampled count is then a count of the boundaries of its
piecewise-linear units, not of linear regions, and it says so with a warning that names those operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, overload

from torch import Tensor

from lightning_sensitivity.functional.evaluation import measuring
from lightning_sensitivity.functional.exact_transitions import _count_exact
from lightning_sensitivity.functional.sampled_transitions import (
    _count_sampled,
    _count_sampled_together,
    _polygon_length,
    _SampledCount,
)
from lightning_sensitivity.functional.trajectories import Trajectory

__all__ = ["TransitionCount", "count_transitions"]


@dataclass(frozen=True, eq=False)
class TransitionCount:
    """The transitions along one trajectory. ``int(result)`` is the number of transitions.

    Attributes:
        transitions: :math:`T`, the unit boundaries crossed along the closed curve.
        arc_length: the curve's Euclidean arc length, on the discretization used for the density.
        method: ``"sampled"`` or ``"exact"``.
        num_points: :math:`k`, the points of the discretization.
        transitions_half: sampled: :math:`T_{k/2}`, the count on every other point (the convergence evidence, see
            :attr:`resolution`); exact: equal to ``transitions``.
        regions: exact: the forward passes made, one per linear region visited; sampled: ``None``.
        segments: the boundaries crossed on each segment ``i -> i + 1`` (``[k]``, int32), if asked for.
        smooth_operations: sampled: the operations upstream of the model's piecewise-linear units that are not
            piecewise linear (see :attr:`ActivationCodes.smooth_operations`); when there are any, ``transitions``
            counts the boundaries of the units, not of linear regions. Exact: always empty (the exact count
            refuses such a model).
    """

    transitions: int
    arc_length: float
    method: str
    num_points: int
    transitions_half: int
    regions: int | None = None
    segments: Tensor | None = None
    smooth_operations: tuple[str, ...] = ()

    def __int__(self) -> int:
        return self.transitions

    @property
    def density(self) -> float:
        """Transitions per unit of arc length."""
        return self.transitions / self.arc_length if self.arc_length > 0 else 0.0

    @property
    def converged(self) -> bool:
        """Exact, or the sampled count on ``k`` points equals the count on ``k / 2`` (see :attr:`resolution` for
        how far apart they are)."""
        return self.transitions == self.transitions_half

    @property
    def resolution(self) -> float:
        r"""The resolution evidence of the count: :math:`(T_k - T_{k/2}) / \max(T_k, 1)`, 0 for an exact count.

        The share of the count on all :math:`k` points that the count on every other point misses, so a lower bound
        of how far :math:`T_{k/2}` is below the true count. :math:`T_k` misses less: each doubling of :math:`k`
        divides the missed crossings by 2 (where a unit's input has kinks from upstream units between two points, as
        in deep and convolutional networks) to 4 (where it is smooth), so :math:`T_k` misses about ``resolution``
        (as measured on a small CNN and ``resnet18``) down to ``resolution / 3`` of the true count. It is evidence,
        not proof: a unit that flips and flips back between two neighbouring points of the :math:`k` is missed by
        both counts and shows in neither.

        A count is taken as resolved when ``resolution`` is at most 0.02 (it then misses at most about 2%), the
        threshold above which ``TransitionMonitor`` warns (``convergence_tolerance``). Values measured against the
        points per curve, for an MLP, a small CNN and ``resnet18``, are in the transitions guide.
        """
        return (self.transitions - self.transitions_half) / max(self.transitions, 1)


@overload
def count_transitions(
    model: Callable[[Tensor], Tensor],
    trajectory: Trajectory | Tensor,
    *,
    method: Literal["sampled", "exact"] = ...,
    num_points: int | None = ...,
    chunk_size: int = ...,
    return_segments: bool = ...,
    max_regions: int = ...,
    warn_smooth: bool = ...,
) -> TransitionCount: ...


@overload
def count_transitions(
    model: Callable[[Tensor], Tensor],
    trajectory: Sequence[Trajectory],
    *,
    method: Literal["sampled", "exact"] = ...,
    num_points: int | None = ...,
    chunk_size: int = ...,
    return_segments: bool = ...,
    max_regions: int = ...,
    warn_smooth: bool = ...,
) -> list[TransitionCount]: ...


def count_transitions(
    model: Callable[[Tensor], Tensor],
    trajectory: Trajectory | Tensor | Sequence[Trajectory],
    *,
    method: Literal["sampled", "exact"] = "sampled",
    num_points: int | None = None,
    chunk_size: int = 1024,
    return_segments: bool = False,
    max_regions: int = 1_000_000,
    warn_smooth: bool = True,
) -> TransitionCount | list[TransitionCount]:
    r"""Count the linear-region boundaries that a closed trajectory crosses (see the module docstring).

    Given a sequence of :class:`Trajectory` objects, returns one :class:`TransitionCount` per curve, the same as
    counting each one alone. The sampled count of curves with a common ``num_points`` :math:`k \le`
    ``chunk_size`` puts the points of ``chunk_size // k`` curves into each forward pass after a first pass of one
    curve: many short curves cost a few large passes instead of many small ones.

    ``method="sampled"`` evaluates the activation codes at the :math:`k` points in chunks of ``chunk_size``
    points, so memory is bounded by one chunk for any :math:`k`. It costs a forward pass over the points, plus one
    byte per unit boundary per point and two comparisons of neighbouring codes per 1 MiB of codes (its time against
    the plain forward pass, ``python -m benchmarks.transitions``, is in ``docs/benchmarks.md``). It also reports
    :math:`T_{k/2}` and the relative difference of the two counts, :attr:`TransitionCount.resolution`, as its
    convergence evidence. The arc length of a :class:`Trajectory` comes from its
    coefficients; that of a tensor of points, from the points.

    ``method="exact"`` needs an ellipse (a :class:`Trajectory` through 3 anchors) and a piecewise-linear network
    (:mod:`~lightning_sensitivity.functional.exact_transitions`): one forward pass of 5 points per linear region
    visited, in ``float64``. The tensors of an ``nn.Module`` (or of the modules that a ``functools.partial``, a
    bound method or a closure holds) are cast for the call, the modules are untouched; another callable must accept
    float64 inputs. Crossings closer than :math:`10^{-8}` in :math:`t` are merged (a near-tangency).

    **Networks that are not piecewise linear.** The first forward pass is followed from the input on, naming the
    operations upstream of a unit that are not piecewise linear (smooth functions such as Hardswish or GELU,
    normalizations such as LayerNorm or softmax attention, products of two input-dependent tensors); affine ones
    and anything after the last unit are not named. The sampled count still counts the units' boundaries, which
    no longer delimit linear regions: ``smooth_operations`` names the operations, and so does a ``UserWarning``
    unless ``warn_smooth=False``. The exact count refuses such a network before it steps.

    The modules it computes with (an ``nn.Module``, or those that a ``functools.partial``, a bound method or a
    closure holds) are evaluated in eval mode (each submodule's mode restored), without gradients, in the model's
    own precision even inside ``autocast``; a module compiled with ``torch.compile`` (itself, a submodule, or in place
    with ``module.compile()``) runs as its eager original, with the same parameters.

    Args:
        model: an ``nn.Module`` or a callable of a batch ``[B, *shape]``; any output (no classifier needed).
        trajectory: a :class:`Trajectory`, or (sampled only) the closed polygon's points ``[k, *shape]``.
        method: ``"sampled"`` or ``"exact"``.
        num_points: sampled, with a :class:`Trajectory`: :math:`k` (default: the trajectory's ``num_points``);
            exact: the discretization for the arc length. Must be even and at least 6 for the sampled count,
            so that :math:`k/2` points still make a closed polygon.
        chunk_size: the most points per forward pass of the sampled count. On the CPU the passes after the first
            hold fewer where the input of the model's largest unit layer would take more than 16 MiB for them
            (larger blocks are page-faulted in again at every allocation); the count is the same.
        return_segments: also return the boundaries crossed on each segment (sampled only).
        max_regions: exact: stop with an error after this many regions.
        warn_smooth: sampled: warn when the network is not piecewise linear (see above). A caller that reads
            ``smooth_operations`` and reports it its own way passes ``False``.

    Returns:
        A :class:`TransitionCount`, or a list of them for a sequence of trajectories.

    Raises:
        ValueError: for a model with no piecewise-linear unit (naming its non-linearities), too few points, an
            exact count along a tensor of points or a curve of higher order than an ellipse, or a model that is
            not piecewise linear (exact).
        TypeError: exact: for a callable that holds no module and fails on float64 inputs.
        NonFiniteOutputError: (a ``ValueError``) if the model's output is NaN or infinite along the curve.

    Warns:
        UserWarning: sampled: the network is not piecewise linear (``warn_smooth``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_sensitivity.functional import count_transitions, ellipse_through
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> curve = ellipse_through(torch.randn(2), torch.randn(2), torch.randn(2), num_points=4096)
        >>> exact = count_transitions(model, curve, method="exact")
        >>> sampled = count_transitions(model, curve)
        >>> int(exact) == int(sampled), sampled.converged, sampled.resolution
        (True, True, 0.0)
    """
    if method not in ("sampled", "exact"):
        raise ValueError(f"`method` must be 'sampled' or 'exact', got {method!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    if not isinstance(trajectory, (Trajectory, Tensor)):
        curves = list(trajectory)
        if not all(isinstance(curve, Trajectory) for curve in curves):
            raise TypeError("A sequence to count must hold Trajectory objects (stack tensors of points yourself).")
        k = curves[0].num_points if curves else 0
        if method == "sampled" and num_points is None and 6 <= k <= chunk_size and k % 2 == 0:
            if all(curve.num_points == k for curve in curves):
                with measuring(model, curves[0].constant.device) as eager:
                    counts = _count_sampled_together(eager, curves, chunk_size)
                results = [
                    _sampled_result(count, curve.arc_length(k), k, return_segments)
                    for count, curve in zip(counts, curves, strict=True)
                ]
                if warn_smooth:
                    _warn_if_smooth(results[0].smooth_operations)
                return results
        options = dict(method=method, num_points=num_points, chunk_size=chunk_size, max_regions=max_regions)
        results = [
            count_transitions(model, curve, return_segments=return_segments, warn_smooth=False, **options)
            for curve in curves
        ]
        if warn_smooth and results:
            _warn_if_smooth(results[0].smooth_operations)
        return results
    if isinstance(trajectory, Trajectory):
        k = num_points or trajectory.num_points
    else:
        if num_points is not None:
            raise ValueError("`num_points` resamples a Trajectory; a tensor of points is counted as it is.")
        k = trajectory.shape[0]
    device = (trajectory.constant if isinstance(trajectory, Trajectory) else trajectory).device
    if method == "exact":
        if not isinstance(trajectory, Trajectory):
            raise ValueError(
                "The exact count follows the curve itself: pass a Trajectory, not a tensor of points."
            )
        if trajectory.order != 1:
            raise ValueError(
                f"The exact count is implemented along ellipses (3 anchors); this trajectory has "
                f"{trajectory.num_anchors} anchors (order {trajectory.order}). Use method='sampled'."
            )
        if return_segments:
            raise ValueError("`return_segments` is available for the sampled count only.")
        with measuring(model, device) as eager:
            transitions, regions = _count_exact(eager, trajectory, max_regions)
        return TransitionCount(transitions, trajectory.arc_length(k), method, k, transitions, regions)
    if k < 6 or k % 2:
        raise ValueError(
            f"The sampled count needs an even number of at least 6 points (it also counts on every other point "
            f"as its convergence evidence), got {k}."
        )
    chunk_size += chunk_size % 2
    if isinstance(trajectory, Trajectory):
        times = (trajectory if k == trajectory.num_points else replace(trajectory, num_points=k)).times
        points = lambda start, stop: trajectory.at(times[start:stop])  # noqa: E731
    else:
        points = lambda start, stop: trajectory[start:stop]  # noqa: E731
    with measuring(model, device) as eager:
        count = _count_sampled(eager, points, k, chunk_size, return_segments)
        if isinstance(trajectory, Trajectory):
            arc_length = trajectory.arc_length(k)
        else:
            arc_length = _polygon_length(points, k, chunk_size)
    if warn_smooth:
        _warn_if_smooth(count.smooth_operations)
    return _sampled_result(count, arc_length, k, return_segments)


def _sampled_result(count: _SampledCount, arc_length: float, k: int, return_segments: bool) -> TransitionCount:
    segments = count.segments if return_segments else None
    return TransitionCount(
        count.transitions, arc_length, "sampled", k, count.transitions_half, None, segments, count.smooth_operations
    )


def _warn_if_smooth(smooth_operations: tuple[str, ...]) -> None:
    if smooth_operations:
        warnings.warn(
            f"The model is not piecewise linear: upstream of its piecewise-linear units it also applies "
            f"{', '.join(smooth_operations)}. The count is of the boundaries of those units, not of linear regions "
            "(pass warn_smooth=False to silence this).",
            UserWarning,
            stacklevel=3,
        )
