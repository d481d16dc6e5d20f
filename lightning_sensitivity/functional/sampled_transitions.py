r"""The sampled count of transitions: activation codes at :math:`k` points of a closed curve, compared
neighbour to neighbour (see :mod:`~lightning_sensitivity.functional.transitions` for the definitions).

The codes of consecutive points are written into one buffer and compared in batches, so memory stays bounded by a
chunk of points for any :math:`k`, and the count on every other point, :math:`T_{k/2}`, comes out of the same
comparisons as the convergence evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_sensitivity.functional.activations import (
    ActivationCodes,
    _check_finite,
    _codes_and_output_sum,
    _copy_codes,
    _empty_codes,
)
from lightning_sensitivity.functional.evaluation import _per_pass_on_device
from lightning_sensitivity.functional.trajectories import Trajectory, _points_along


class _SampledCount(NamedTuple):
    transitions: int
    transitions_half: int
    segments: Tensor | None  # the boundaries crossed on each segment
    smooth_operations: tuple[str, ...]


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
) -> _SampledCount:
    """The count along the closed polygon through the ``k`` points ``points(0, k)``, streamed in chunks
    (``chunk_size`` even); the caller sets eval mode and disables autograd.

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
    start, step = 0, chunk_size  # the later chunks as many points as the first chunk's codes say fit a pass
    while start < k:
        z = points(start, min(start + step, k))
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
            step = _points_per_pass(codes, chunk_size, z)
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
        start += n
    assert buffer is not None and first is not None
    _check_finite(output_sum, "along the trajectory")
    steps, even = _steps(buffer[:filled], skip)
    closing = buffer[filled - 1 : filled].distance(first)
    total = int(total + steps.sum() + closing.sum())
    half = int(half + even + buffer[filled - 2 : filled - 1].distance(first).sum())
    segment_counts = torch.cat([*segments, steps, closing]) if return_segments else None
    return _SampledCount(total, half, segment_counts, first.smooth_operations)


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
    model: Callable[[Tensor], Tensor], trajectories: Sequence[Trajectory], chunk_size: int
) -> list[_SampledCount]:
    r"""The counts along several trajectories with one even ``num_points`` :math:`6 \le k \le` ``chunk_size``, the
    same as counting each one alone, with the points of ``chunk_size // k`` curves in each forward pass; the caller
    sets eval mode and disables autograd."""
    k = trajectories[0].num_points
    times = trajectories[0].times
    counts: list[_SampledCount] = []
    smooth_operations: tuple[str, ...] = ()
    start, per_pass = 0, 1  # the first pass, one curve, tells how many fit the later ones
    while start < len(trajectories):
        group = trajectories[start : start + per_pass]
        points = _points_along(group, times)
        codes, output_sum = _codes_and_output_sum(model, points, follow_input=not start)
        _check_finite(output_sum, "along the trajectory")
        if not start:  # only the first pass follows the data flow
            smooth_operations = codes.smooth_operations
            per_pass = max(1, _points_per_pass(codes, chunk_size, points) // k)  # a curve at least
        start += len(group)
        steps, half = _closed_steps(codes, k)
        for segments, total, half_total in zip(steps, steps.sum(1).tolist(), half.tolist(), strict=True):
            counts.append(_SampledCount(total, half_total, segments, smooth_operations))
    return counts


def _points_per_pass(codes: ActivationCodes, chunk_size: int, x: Tensor) -> int:
    """Points per forward pass after the first, which gave ``codes`` for the points ``x``: ``chunk_size``, or on the
    CPU fewer, an even number, where the largest unit's input for them would take more than 16 MiB."""
    largest = max((elements for _, elements in codes.layout), default=1)
    return max(2, _per_pass_on_device(chunk_size, largest * x.element_size(), x.device) // 2 * 2)


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
