"""The trajectories of the transition monitor: the training points it samples while the first epoch passes, the
anchors it makes of them, and the closed curves through those anchors."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sensitivity.functional import (
    Trajectory,
    gaussian_anchors,
    shuffled_anchors,
    trajectory_through,
)


class _Reservoir:
    """A uniform random sample of the training points that pass (reservoir sampling, Algorithm R), and the
    per-feature sums of every point seen, for the mean and standard deviation of the data."""

    def __init__(self) -> None:
        self.points: list[Tensor] = []  # on the CPU
        self.seen = 0
        self._sums: tuple[Tensor, Tensor] | None = None  # per-feature sum and sum of squares, float64

    def add(self, x: Tensor, size: int, generator: torch.Generator) -> None:
        """Offer the points ``x`` (a batch, on any device) to a reservoir of ``size`` points.

        Point ``n`` (counted from 0 over all batches) replaces a random slot with probability ``size / (n + 1)``.
        The random draws are on the CPU, with ``generator``; the points that enter are copied to the CPU in one
        transfer, and the sums stay on the batch's device (no synchronization per batch).
        """
        # Summed in float64 from float32 (or the batch's float64): no float64 copy of a float32 batch, a third of the
        # time; the squares of half-precision values are taken in float32.
        flat = x.flatten(1)
        flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        sums = (flat.sum(0, dtype=torch.float64), (flat * flat).sum(0, dtype=torch.float64))
        self._sums = sums if self._sums is None else (self._sums[0] + sums[0], self._sums[1] + sums[1])
        positions = self.seen + torch.arange(len(x))
        slots = (torch.rand(len(x), generator=generator, dtype=torch.float64) * (positions + 1)).long()
        entering = [
            (i, n if n < size else slot)
            for i, (n, slot) in enumerate(zip(positions.tolist(), slots.tolist(), strict=True))
            if n < size or slot < size
        ]
        if entering:
            rows = torch.stack([x[i] for i, _ in entering]).cpu()
            for row, (_, slot) in zip(rows, entering, strict=True):
                if slot == len(self.points):
                    self.points.append(row)
                else:
                    self.points[slot] = row
        self.seen += len(x)

    def anchors(self, num_trajectories: int, off_manifold: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The on- and off-manifold anchors, ``[3 * num_trajectories, *input_shape]`` each, on the CPU.

        The sample is shuffled with ``generator``; its first points are the on-manifold anchors. Off the manifold,
        ``"shuffled"`` shuffles the features of the rest of the sample, ``"gaussian"`` draws points with the
        per-feature mean and standard deviation of every point seen.
        """
        n = 3 * num_trajectories
        points = torch.stack(self.points)
        points = points[torch.randperm(len(points), generator=generator)]
        on = points[:n]
        if off_manifold == "shuffled":
            return on, shuffled_anchors(points[n:], generator=generator)
        assert self._sums is not None
        mean = self._sums[0].cpu() / self.seen
        std = (self._sums[1].cpu() / self.seen - mean.pow(2)).clamp_min(0).sqrt()
        shape = on.shape[1:]
        return on, gaussian_anchors(mean.view(shape), std.view(shape), n, generator=generator).to(on.dtype)


class _Segments:
    """The transition monitor's watch set along one closed curve of ``k`` points: ``count`` of its ``k`` segments
    (from point ``i`` to point ``i + 1``), spread evenly along it, segment ``s_j = floor(j k / count)`` for
    ``j < count``; all of them when ``count >= k``.

    The count on these segments is the same per-segment count as the full measurement's, at the same resolution,
    only on fewer segments: at a full measurement it is read off the full count's segments (:meth:`transitions`),
    and at a watch pass it costs the codes of their ``2 * count`` end points (:attr:`points`). Its density is the
    boundaries crossed on the segments over their summed length; :attr:`curve_length` (the whole polygon's) scales
    it to an estimate of the whole curve's count.
    """

    def __init__(self, curve: Trajectory, count: int) -> None:
        k = curve.num_points
        self.starts = torch.arange(min(count, k)) * k // min(count, k)
        times = curve.times
        ends = torch.stack([times[self.starts], times[(self.starts + 1) % k]], dim=1).flatten()
        self.points = curve.at(ends)  # [2 * count, *shape]: each segment's start and end
        exact = curve.at(ends, dtype=torch.float64).flatten(1)
        self.length = float(torch.linalg.vector_norm(exact[1::2] - exact[0::2], dim=1).sum())
        self.curve_length = curve.arc_length()

    def transitions(self, segments: Tensor) -> int:
        """The boundaries crossed on the watch segments, from the per-segment counts of the whole curve ``[k]``."""
        return int(segments[self.starts.to(segments.device)].sum())


class _Curves:
    """The closed curves of ``num_points`` points through each kind's anchors, built on a module's device and in
    its floating dtype (float32 at least: half-precision weights are measured in float32), and built again only
    when these or the anchors change; and the watch segments along the first curve of each kind."""

    def __init__(self, num_points: int) -> None:
        self.num_points = num_points
        self._built: tuple[tuple[torch.device, torch.dtype], dict[str, list[Trajectory]]] | None = None
        self._segments: dict[tuple[str, int], _Segments] = {}

    def clear(self) -> None:
        """Forget the curves (the anchors changed)."""
        self._built = None
        self._segments = {}

    def segments(self, anchors: dict[str, Tensor], pl_module: pl.LightningModule, count: int) -> dict[str, _Segments]:
        """The watch segments (:class:`_Segments`, ``count`` of them) along the first curve of each kind."""
        curves = self.of(anchors, pl_module)
        for kind in curves:
            if (kind, count) not in self._segments:
                self._segments[(kind, count)] = _Segments(curves[kind][0], count)
        return {kind: self._segments[(kind, count)] for kind in curves}

    def of(self, anchors: dict[str, Tensor], pl_module: pl.LightningModule) -> dict[str, list[Trajectory]]:
        """The curves through ``anchors`` (``[N, 3, ...]`` per kind) for ``pl_module``."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        key = (pl_module.device, torch.promote_types(dtype, torch.float32))
        if self._built is None or self._built[0] != key:
            self._segments = {}
            curves = {
                kind: [trajectory_through(a.to(*key), self.num_points) for a in kind_anchors]
                for kind, kind_anchors in anchors.items()
            }
            self._built = (key, curves)
        return self._built[1]
