r"""The exact count of linear-region transitions along an ellipse, for piecewise-linear networks.

For a piecewise-linear network the true count can be computed exactly along an ellipse
:math:`z(t) = a + b \cos t + c \sin t`. Inside one linear region the network is affine, so the input of every
unit is :math:`g(z(t)) = \alpha + \beta \cos t + \gamma \sin t` with :math:`\alpha = g(a)`,
:math:`\beta = g(a + b) - g(a)`, :math:`\gamma = g(a + c) - g(a)`, all read off one forward pass through the
region's affine map. Writing :math:`\beta \cos t + \gamma \sin t = R \cos(t - \varphi)`, the unit's boundary is
crossed at :math:`t = \varphi \pm \arccos(-\alpha / R)` when :math:`\lvert\alpha\rvert < R`. The earliest such
crossing after the current :math:`t`, over all units, ends the region; the count steps just past it, reads the
new code there, adds the boundaries between the two codes, and repeats until :math:`t = 2\pi`.

A network with other non-linearities upstream of its units (a smooth function, a normalization, attention, a
product of activations) has no linear regions: the count refuses it, naming those operations, before stepping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sensitivity.functional.activations import (
    ActivationCodes,
    _check_finite,
    _CodeRecorder,
    _output_sum,
)
from lightning_sensitivity.functional.evaluation import _held_modules
from lightning_sensitivity.functional.trajectories import Trajectory
from lightning_sensitivity.functional.units import _Pool, _Unit

#: The exact count reads each new region's code this far (in t) past the boundary that ends the previous one.
_STEP_PAST = 1e-8
#: Relative tolerance of the check that the network is affine inside a region.
_AFFINE_TOLERANCE = 1e-6


class _RegionRecorder(_CodeRecorder):
    r"""Runs a batch through the linear region of its first row, and records every unit's boundary functions.

    Row 0 goes through the network unchanged. Every other row goes through the affine map that the network is
    inside row 0's linear region: each unit applies row 0's piece, :math:`f(u_0) + f'_{p_0}\,(u - u_0)`, and each
    pooling window picks row 0's winner. For each unit it records, for every row, the values whose sign changes
    where the unit changes piece: :math:`u - \theta` for each threshold, and :math:`u_k - u_{w}` for each input
    :math:`k` of a pooling window with winner :math:`w`. Inside the region all of these are affine in the input.
    """

    def __init__(self, batch_size: int, follow: Tensor | None = None) -> None:
        super().__init__(batch_size, follow=follow)
        self.boundaries: list[Tensor] = []

    def _unit_call(
        self,
        name: str,
        unit: _Unit | _Pool,
        func: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one piecewise-linear call with row 0's piece for every row, recording the boundary functions."""
        u = unit.input
        if isinstance(unit, _Pool):
            return self._pool(unit, u)
        pieces = unit.pieces(u[:1])
        self._store(len(unit.thresholds), unit.sides(u[:1]))
        first = func(u[:1].clone(), *args[1:], **kwargs)
        out = first + unit.slope(pieces, u) * (u - u[:1])
        for threshold in unit.thresholds:
            self.boundaries.append((u - threshold).flatten(1))
        if unit.inplace:
            return u.copy_(out)
        return out

    def _pool(self, unit: _Pool, u: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        first, indices = unit.pool(u[:1])
        self._record_winners(unit, indices)
        flat = u.flatten(2)
        winner = flat.gather(2, indices.flatten(2).expand(u.shape[0], -1, -1))  # [R, C, O]
        table, valid = unit.window_table(first.shape[2:])
        window = flat[:, :, table]  # [R, C, O, K]
        others = valid & (table != indices.flatten(2)[..., None])
        self.boundaries.append((window - winner[..., None]).masked_fill(~others, math.nan).flatten(1))
        out = winner.view(u.shape[0], *first.shape[1:])
        return (out, indices.expand_as(out)) if unit.return_indices else out


class _Holding(nn.Module):
    """A callable as a module that holds the modules it computes with, so that ``torch.func.functional_call`` can
    run it with other tensors in their place."""

    def __init__(self, function: Callable[[Tensor], Tensor], modules: list[nn.Module]) -> None:
        super().__init__()
        self.function = function
        self.held = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)


def _in_float64(model: Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], bool]:
    """The model evaluated in float64, without touching it, and whether anything was cast: the modules it computes
    with (:func:`~lightning_sensitivity.functional.evaluation._held_modules`) get float64 copies of their tensors for
    the call; a callable that holds none is run as it is."""
    modules = _held_modules(model)
    if not modules:
        return model, False
    holder = model if isinstance(model, nn.Module) else _Holding(model, modules)
    tensors = {**dict(holder.named_parameters()), **dict(holder.named_buffers())}
    state = {
        name: t.detach().to(torch.float64) if t.is_floating_point() else t for name, t in tensors.items()
    }
    return (lambda x: torch.func.functional_call(holder, state, (x,))), True


def _count_exact(
    model: Callable[[Tensor], Tensor], trajectory: Trajectory, max_regions: int
) -> tuple[int, int]:
    """Step from region to region along the ellipse; returns the transitions and the regions visited. The caller
    sets eval mode and disables autograd."""
    forward, cast = _in_float64(model)
    a, b, c = trajectory.constant[None], trajectory.cosines, trajectory.sines
    # The region's affine map at these four points gives alpha, beta, gamma, and the check that it is affine.
    corners = torch.cat([a, a + b, a + c, a + b + c])
    t, total, regions = 0.0, 0, 0
    first: ActivationCodes | None = None
    last: ActivationCodes | None = None
    while True:
        regions += 1
        if regions > max_regions:
            raise RuntimeError(
                f"The exact count visited more than `max_regions={max_regions}` linear regions."
            )
        # The region is read at t itself, in float64: the next crossing is searched for after t, so a point read
        # short of t (a float32 t is up to 2.4e-7 short, far more than _STEP_PAST) would be the previous region,
        # the crossing just passed would be skipped, and a unit crossing back before any other unit crosses
        # would be missed twice.
        rows = torch.cat([trajectory.at(torch.tensor([t], dtype=torch.float64), torch.float64), corners])
        # The first pass also follows the data flow, to refuse a network that is not piecewise linear.
        recorder = _RegionRecorder(rows.shape[0], follow=rows if last is None else None)
        try:
            with recorder:
                out = forward(rows)
        except RuntimeError as error:
            if cast or last is not None:
                raise
            raise TypeError(
                "The exact count runs the model in float64, casting the parameters of an nn.Module (or of the modules "
                "that a functools.partial, a bound method or a closure holds) for the count; this callable holds no "
                "module and failed on float64 inputs (see the error above). Pass an nn.Module whose forward calls "
                "the model, or use method='sampled'."
            ) from error
        _check_finite(_output_sum(out), "along the trajectory")
        codes = recorder.codes(rows[:1])
        if last is None:
            _refuse_smooth(recorder.smooth_operations)
            first = codes
        else:
            total += int(codes.distance(last).sum())
        last = codes
        g = torch.cat(recorder.boundaries, dim=1)
        _check_affine(g)
        crossing = _next_crossing(g[1], g[2] - g[1], g[3] - g[1], after=t)
        if crossing is None or crossing + _STEP_PAST >= 2 * math.pi:
            break
        t = crossing + _STEP_PAST
    return total + int(last.distance(first).sum()), regions


def _refuse_smooth(smooth_operations: tuple[str, ...]) -> None:
    if smooth_operations:
        raise ValueError(
            "The exact count needs a piecewise-linear model, but upstream of its piecewise-linear units it also "
            f"applies {', '.join(smooth_operations)}: the units' inputs are not affine in the model's input inside "
            "a region, so there are no linear regions to step through. Use method='sampled', which counts the "
            "boundaries of those units."
        )


def _check_affine(g: Tensor) -> None:
    """Inside a region, ``g(a + b + c) - g(a + b) - g(a + c) + g(a)`` vanishes for an affine ``g``: the backstop for
    non-linear operations that the data flow does not name (one computed outside torch, or not catalogued)."""
    residual = (g[4] - g[2] - g[3] + g[1]).abs().nan_to_num(0.0).max()
    scale = g[1:].abs().nan_to_num(0.0).max()
    if residual > _AFFINE_TOLERANCE * (1.0 + scale):
        raise ValueError(
            "The exact count needs a piecewise-linear network, but inside a linear region the inputs of its "
            "piecewise-linear units are not affine in the model's input. Use method='sampled'."
        )


def _next_crossing(alpha: Tensor, beta: Tensor, gamma: Tensor, after: float) -> float | None:
    r"""The first :math:`t \in (\text{after}, 2\pi)` where some :math:`\alpha + \beta\cos t + \gamma\sin t`
    changes sign, or ``None``. Tangencies (:math:`\lvert\alpha\rvert = R`) touch without crossing."""
    radius = torch.hypot(beta, gamma)
    crosses = alpha.abs() < radius  # False for NaN entries (pooling inputs that cannot win)
    if not bool(crosses.any()):
        return None
    alpha, beta, gamma, radius = alpha[crosses], beta[crosses], gamma[crosses], radius[crosses]
    phase = torch.atan2(gamma, beta)
    half_width = torch.arccos((-alpha / radius).clamp(-1.0, 1.0))
    zeros = torch.cat([phase + half_width, phase - half_width]).remainder(2 * math.pi)
    later = zeros[zeros > after]
    return float(later.min()) if later.numel() else None
