r"""Linear-region transitions along a closed trajectory (Novak et al., ICLR 2018), and their sampled count.

With :math:`k` points :math:`z_i = z(2\pi i / k)` of a closed curve and the activation codes :math:`c` of
:mod:`~lightning_sensitivity.functional.activations`, the number of transitions is

.. math::

    T_k = \sum_{i=0}^{k-1} d\big(c(z_i),\, c(z_{(i+1) \bmod k})\big),

the unit boundaries crossed between consecutive points, and the *transition density* is :math:`T_k` divided by
the arc length of the same polygon. A unit that flips twice between two points is missed, so
:math:`T_k` grows towards the true count as :math:`k` grows; the sampled count therefore also reports
:math:`T_{k/2}`, the count on every other point, computed in the same pass: :math:`T_k = T_{k/2}` is the evidence
that the discretization is fine enough.

For a piecewise-linear network the count can be made exact along an ellipse, by stepping from linear region to
linear region: :mod:`~lightning_sensitivity.functional.exact_transitions`.

A network with other non-linearities upstream of its units (Hardswish, GELU, softmax attention, LayerNorm, a
product of activations) is not piecewise linear: the sampled count is then a count of the boundaries of its
piecewise-linear units, not of linear regions, and it says so with a warning that names those operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, overload

import torch
from torch import Tensor

from lightning_sensitivity.functional._utils import _measuring
from lightning_sensitivity.functional.activations import (
    ActivationCodes,
    _check_finite,
    _codes_and_output_sum,
    _copy_codes,
    _empty_codes,
)
from lightning_sensitivity.functional.exact_transitions import _count_exact
from lightning_sensitivity.functional.trajectories import Trajectory, _points_along

__all__ = ["TransitionCount", "count_transitions"]


@dataclass(frozen=True, eq=False)
class TransitionCount:
    """The transitions along one trajectory. ``int(result)`` is the number of transitions.

    Attributes:
        transitions: :math:`T`, the unit boundaries crossed along the closed curve.
        arc_length: the curve's Euclidean arc length, on the discretization used for the density.
        method: ``"sampled"`` or ``"exact"``.
        num_points: :math:`k`, the points of the discretization.
        transitions_half: sampled: :math:`T_{k/2}`, the count on every other point (the convergence evidence);
            exact: equal to ``transitions``.
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
        """Exact, or the sampled count on ``k`` points equals the count on ``k / 2``."""
        return self.transitions == self.transitions_half


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
    ``chunk_size`` puts the points of ``chunk_size // k`` curves into each forward pass: many short curves cost
    a few large passes instead of many small ones.

    ``method="sampled"`` evaluates the activation codes at the :math:`k` points in chunks of ``chunk_size``
    points, so memory is bounded by one chunk for any :math:`k` (points of a :class:`Trajectory` are generated
    chunk by chunk too). It costs a forward pass over the :math:`k` points, batched, plus one byte per unit
    boundary per point, written by each unit straight into a buffer of consecutive points, and two comparisons of
    neighbouring codes per buffer (1 MiB of codes, or one chunk). On a CPU core that is about 1.2 times the plain
    forward pass for an MLP 784-500-500-500-10 or a CIFAR-sized CNN, 1.4 times for a small digits CNN and 1.6 to
    1.9 times for the digits MLP 64-128-128-10, whose forward pass is too cheap to hide the codes
    (``python -m benchmarks.transitions``). It also reports :math:`T_{k/2}` as its convergence evidence. For a
    :class:`Trajectory` the arc length comes from its coefficients (:meth:`Trajectory.arc_length`); for a tensor
    of points, from the points, read again after the count in blocks of 256 KiB (at least one chunk).

    ``method="exact"`` needs an ellipse (a :class:`Trajectory` through 3 anchors) and a piecewise-linear
    network (:mod:`~lightning_sensitivity.functional.exact_transitions`). It costs one forward pass of 5 points
    per linear region the curve visits, run in ``float64``: the parameters and buffers of an ``nn.Module`` (or of
    the modules that a ``functools.partial``, a bound method or a closure holds) are cast for the call, the
    modules themselves are untouched; another callable must accept float64 inputs as it is. Crossings closer than
    :math:`10^{-8}` in :math:`t` are merged, which changes nothing unless one unit crosses twice that close (a
    near-tangency).

    **Networks that are not piecewise linear.** The first forward pass is followed from the input on, naming the
    operations upstream of a unit that are not piecewise linear (smooth functions such as Hardswish or GELU,
    normalizations such as LayerNorm or softmax attention, products of two input-dependent tensors); affine ones
    and anything after the last unit are not named. The sampled count still counts the units' boundaries, which
    no longer delimit linear regions: ``smooth_operations`` names the operations, and so does a ``UserWarning``
    unless ``warn_smooth=False``. The exact count refuses such a network before it steps, and checks inside every
    region that the units' inputs are affine (the backstop for operations that are not named).

    An ``nn.Module`` (and any module that a ``functools.partial``, a bound method or a closure holds) is evaluated
    in eval mode and its submodules' modes are restored; no gradient is taken. A module compiled with
    ``torch.compile`` (the module, a submodule, or in place with ``module.compile()``) is run through its eager
    original, with the same parameters. The count runs in the model's own precision even inside an ``autocast``
    region.

    Args:
        model: an ``nn.Module`` or a callable of a batch ``[B, *shape]``; any output (no classifier needed).
        trajectory: a :class:`Trajectory`, or (sampled only) the closed polygon's points ``[k, *shape]``.
        method: ``"sampled"`` or ``"exact"``.
        num_points: sampled, with a :class:`Trajectory`: :math:`k` (default: the trajectory's ``num_points``);
            exact: the discretization for the arc length. Must be even and at least 6 for the sampled count,
            so that :math:`k/2` points still make a closed polygon.
        chunk_size: points per forward pass of the sampled count.
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
        >>> int(exact) == int(sampled), sampled.converged
        (True, True)
    """
    if method not in ("sampled", "exact"):
        raise ValueError(f"`method` must be 'sampled' or 'exact', got {method!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    if not isinstance(trajectory, (Trajectory, Tensor)):
        curves = list(trajectory)
        if not all(isinstance(curve, Trajectory) for curve in curves):
            raise TypeError("A sequence to count must hold Trajectory objects (stack tensors of points yourself).")
        lengths = {num_points or curve.num_points for curve in curves}
        if method == "sampled" and num_points is None and len(lengths) == 1 and curves:
            results = _count_sampled_together(model, curves, chunk_size, return_segments)
        else:
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
        with _measuring(model, device) as eager:
            transitions, regions = _count_exact(eager, trajectory, max_regions)
        return TransitionCount(transitions, trajectory.arc_length(k), method, k, transitions, regions)
    if k < 6 or k % 2:
        raise ValueError(
            f"The sampled count needs an even number of at least 6 points (it also counts on every other point "
            f"as its convergence evidence), got {k}."
        )
    arc_length: float | None = None
    if isinstance(trajectory, Trajectory):
        times = (trajectory if k == trajectory.num_points else replace(trajectory, num_points=k)).times
        points = lambda start, stop: trajectory.at(times[start:stop])  # noqa: E731
        arc_length = trajectory.arc_length(k)
    else:
        points = lambda start, stop: trajectory[start:stop]  # noqa: E731
    with _measuring(model, device) as eager:
        result = _count_sampled(eager, points, k, chunk_size + chunk_size % 2, return_segments, arc_length)
    if warn_smooth:
        _warn_if_smooth(result.smooth_operations)
    return result


def _warn_if_smooth(smooth_operations: tuple[str, ...]) -> None:
    if smooth_operations:
        warnings.warn(
            f"The model is not piecewise linear: upstream of its piecewise-linear units it also applies "
            f"{', '.join(smooth_operations)}. The count is of the boundaries of those units, not of linear regions "
            "(pass warn_smooth=False to silence this).",
            UserWarning,
            stacklevel=3,
        )


#: The codes of consecutive chunks are compared in batches of up to this many bytes (at least one chunk): on a small
#: model the fixed costs of the comparisons, not their work, dominate, and a batch that stays in cache pays them once
#: for several chunks.
_COMPARE_BYTES = 1 << 20


def _count_sampled(
    model: Callable[[Tensor], Tensor],
    points: Callable[[int, int], Tensor],
    k: int,
    chunk_size: int,
    return_segments: bool,
    arc_length: float | None,
) -> TransitionCount:
    """Stream the closed polygon in chunks (``chunk_size`` even); ``arc_length`` is measured on the points if
    ``None``.

    Every chunk's codes are written into one buffer of consecutive points. When it is full, and at the end, the
    boundaries between neighbouring rows are counted, for all points and for the even ones, and the buffer's last
    two rows move to its front (indices ``start - 2, start - 1``), so that the steps across the seam come out of
    the same comparisons. The totals stay on the device until the end: one synchronization per count.
    """
    total: Tensor | int = 0
    half: Tensor | int = 0
    output_sum: Tensor | float = 0.0
    buffer: ActivationCodes | None = None
    first: ActivationCodes | None = None
    filled, skip = 0, 0  # rows of the buffer in use; 1 when the step between its first two rows is counted
    segments: list[Tensor] = []
    for start in range(0, k, chunk_size):
        z = points(start, min(start + chunk_size, k))
        n = z.shape[0]
        if buffer is not None and filled + n > len(buffer):
            steps, even = _steps(buffer[:filled], skip)
            total, half = total + steps.sum(), half + even
            if return_segments:
                segments.append(steps)
            _copy_codes(buffer[:2], buffer[filled - 2 : filled])  # filled is even, so >= 4 here
            filled, skip = 2, 1
        rows = buffer[filled : filled + n] if buffer is not None else None
        # The first chunk follows the data flow (which operations feed the units); the others only record codes.
        codes, chunk_sum = _codes_and_output_sum(model, z, rows, follow_input=buffer is None)
        output_sum = output_sum + chunk_sum
        if buffer is None:
            row_bytes = codes.sides.shape[1] + codes.winners.shape[1] * codes.winners.element_size()
            buffer = _empty_codes(codes, min(k, max(chunk_size, _COMPARE_BYTES // max(row_bytes, 1))) + 2)
            first = _copy_codes(_empty_codes(codes, 1), codes[:1])
            rows = buffer[:n]
        if codes is not rows:
            if (codes.units, codes.layout, codes.winners.shape[1]) != (
                buffer.units,
                buffer.layout,
                buffer.winners.shape[1],
            ):
                raise ValueError(
                    "The model's piecewise-linear units differ from one batch of points to the next (a forward "
                    "pass that depends on its input's values or batch size?), so their codes cannot be compared."
                )
            _copy_codes(rows, codes)
        filled += n
    assert buffer is not None and first is not None
    _check_finite(output_sum, "along the trajectory")
    steps, even = _steps(buffer[:filled], skip)
    closing = buffer[filled - 1 : filled].distance(first)
    total = int(total + steps.sum() + closing.sum())
    half = int(half + even + buffer[filled - 2 : filled - 1].distance(first).sum())
    if arc_length is None:
        arc_length = _polygon_length(points, k, chunk_size)
    segment_counts = torch.cat([*segments, steps, closing]) if return_segments else None
    return TransitionCount(
        total, arc_length, "sampled", k, half, segments=segment_counts, smooth_operations=first.smooth_operations
    )


#: The arc length of a tensor of points is measured in blocks of up to this many bytes of points (at least one chunk):
#: fewer operations than a few per chunk, with the differences still small enough to stay in cache (on a CPU core,
#: blocks of 256 KiB measured 40% faster than 4 MiB ones).
_LENGTH_BYTES = 1 << 18


def _polygon_length(points: Callable[[int, int], Tensor], k: int, chunk_size: int) -> float:
    """The length of the closed polygon through the ``k`` points ``points(0, k)``, read in blocks."""
    first = points(0, 1).flatten(1)
    rows = max(chunk_size, _LENGTH_BYTES // max(first.shape[1] * first.element_size(), 1))
    length = torch.zeros((), dtype=torch.float64, device=first.device)
    for start in range(0, k, rows):
        # Each block overlaps the next by one point; the last one closes the polygon.
        block = points(start, min(start + rows + 1, k)).detach().flatten(1)
        if start + rows >= k:
            block = torch.cat([block, first])
        # Neighbouring points are close, so their difference is exact in their own dtype (Sterbenz); only the
        # sum runs in float64.
        length += torch.linalg.vector_norm(block[1:] - block[:-1], dim=1).sum(dtype=torch.float64)
    return float(length)


def _steps(codes: ActivationCodes, skip: int) -> tuple[Tensor, Tensor]:
    """The boundaries crossed between consecutive rows from row ``skip`` on, ``[len - 1 - skip]``, and their total
    between consecutive even rows (row 0 is an even point of the polygon)."""
    even = codes[::2]
    return codes[skip + 1 :].distance(codes[skip:-1]), even[1:].distance(even[:-1]).sum()


def _count_sampled_together(
    model: Callable[[Tensor], Tensor],
    trajectories: Sequence[Trajectory],
    chunk_size: int,
    return_segments: bool,
) -> list[TransitionCount]:
    """The sampled counts of several trajectories with one ``num_points`` :math:`k`:
    ``count_transitions(model, curve, return_segments=...)`` for each, but with the points of ``chunk_size // k``
    curves in each forward pass. Curves longer than ``chunk_size`` are counted one by one."""
    k = trajectories[0].num_points
    if k > chunk_size or k < 6 or k % 2:  # one by one (which also raises for too few points)
        return [
            count_transitions(model, curve, chunk_size=chunk_size, return_segments=return_segments, warn_smooth=False)
            for curve in trajectories
        ]
    times = trajectories[0].times
    per_pass = chunk_size // k
    results: list[TransitionCount] = []
    smooth_operations: tuple[str, ...] = ()
    with _measuring(model, trajectories[0].constant.device) as eager:
        for start in range(0, len(trajectories), per_pass):
            group = trajectories[start : start + per_pass]
            codes, output_sum = _codes_and_output_sum(eager, _points_along(group, times), follow_input=not start)
            _check_finite(output_sum, "along the trajectory")
            smooth_operations = smooth_operations or codes.smooth_operations
            steps, half = _closed_steps(codes, k)
            for curve, segments, total, half_total in zip(
                group, steps, steps.sum(1).tolist(), half.tolist(), strict=True
            ):
                results.append(
                    TransitionCount(
                        total,
                        curve.arc_length(k),
                        "sampled",
                        k,
                        half_total,
                        segments=segments if return_segments else None,
                        smooth_operations=smooth_operations,
                    )
                )
    return results


def _closed_steps(codes: ActivationCodes, k: int) -> tuple[Tensor, Tensor]:
    """For codes whose rows are closed curves of ``k`` (even) consecutive points each: the boundaries crossed on
    every segment, ``[curves, k]`` (row ``i`` of a curve to row ``i + 1``, its last row back to its first), and
    every curve's count on its even points, ``[curves]``.

    Neighbouring rows are compared all at once; the steps from one curve's last row into the next curve are then
    replaced by the closing steps, a comparison of two rows per curve."""
    steps = _steps_closing_every(codes, k)
    half = _steps_closing_every(codes[::2], k // 2)
    return steps.view(-1, k), half.view(-1, k // 2).sum(1)


def _steps_closing_every(codes: ActivationCodes, k: int) -> Tensor:
    """The boundaries crossed from every row to the next one of its curve of ``k`` rows, ``[len(codes)]``."""
    n = len(codes)
    steps = torch.empty(n, dtype=torch.int32, device=codes.sides.device)
    steps[:-1] = codes[1:].distance(codes[:-1])
    last = torch.arange(k - 1, n, k, device=steps.device)
    steps[last] = codes[last].distance(codes[last - (k - 1)])
    return steps


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
    r"""The mean transition density over trajectories, :math:`\frac{1}{N}\sum_n T_n / L_n`."""
    return density_sum / num_trajectories
