r"""Activation codes: which linear piece every piecewise-linear unit of a network is on.

The units and their piece indices are catalogued in :mod:`~lightning_sensitivity.functional.units`. The activation
code :math:`c(x)` of a network at :math:`x` is the concatenation of the indices of all units of its forward pass.
Two points with the same code lie in the same linear region, where the network is one affine map. The number of
unit boundaries between two codes is

.. math::

    d(c, c') = \sum_{\text{ordered units}} \lvert c_u - c'_u \rvert + \sum_{\text{pooling windows}} [w \ne w'],

so a 3-piece unit jumping from piece 0 to piece 2 counts 2, and a changed max-pooling winner counts 1.

Ordered units are stored as the side of each of their boundaries, :math:`[u > \theta_j]`, one bit per
boundary: the piece index is the sum of a unit's bits, and since :math:`[u > \theta_2]` implies
:math:`[u > \theta_1]`, :math:`\lvert c_u - c'_u \rvert` is the number of bits that differ. The distance is then
one comparison of two boolean tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_sensitivity.functional.evaluation import measuring
from lightning_sensitivity.functional.units import (
    _PIECEWISE_LINEAR,
    _RELU,
    _DataFlow,
    _no_units_error,
    _parse_unit,
    _Pool,
    _Unit,
)

__all__ = ["ActivationCodes", "NonFiniteOutputError", "activation_codes"]


@dataclass(frozen=True, eq=False)
class ActivationCodes:
    """The activation codes of a batch of points.

    Attributes:
        sides: ``[B, S]`` ``bool``, for every boundary of every ordered unit, whether the unit's input is above
            it (one bit for the ReLU family, two for ReLU6, Hardtanh, Hardsigmoid and two-sided clamps).
        winners: ``[B, W]`` small integers, the index of the winning input (in its pooled plane) of every
            max-pooling window.
        units: the name of every piecewise-linear call of the forward pass, in call order.
        layout: for every ordered unit call, its number of boundaries and of elements per point.
        words: ``sides`` eight to a 64-bit word (one byte each, zero padded), ``[B, ceil(S / 8)]`` ``int64``,
            or ``None``; :meth:`distance` then compares eight boundaries per operation.
        smooth_operations: the operations that are not piecewise linear (smooth functions such as ``gelu`` or
            ``hardswish``, normalizations such as ``layer_norm`` or ``softmax``, attention, and products of two
            tensors that both depend on the input, such as ``mul``) applied to the input upstream of some unit,
            sorted. Empty for a piecewise-linear network: then two points with the same code lie in one linear
            region. Otherwise the codes are still the units' pieces, but equal codes no longer mean one affine map.
    """

    sides: Tensor
    winners: Tensor
    units: tuple[str, ...]
    layout: tuple[tuple[int, int], ...]
    words: Tensor | None = None
    smooth_operations: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.sides.shape[0]

    def __getitem__(self, index: slice | Tensor) -> ActivationCodes:
        words = None if self.words is None else self.words[index]
        return ActivationCodes(
            self.sides[index], self.winners[index], self.units, self.layout, words, self.smooth_operations
        )

    @property
    def pieces(self) -> Tensor:
        """``[B, U]`` ``uint8``: the piece index of every ordered unit (0 or 1; 0, 1 or 2 for 3-piece units)."""
        chunks = self.sides.split([boundaries * elements for boundaries, elements in self.layout], dim=1)
        pieces = [
            chunk.view(len(self), boundaries, elements).sum(1, dtype=torch.uint8)
            for chunk, (boundaries, elements) in zip(chunks, self.layout, strict=True)
        ]
        return torch.cat(pieces, dim=1) if pieces else self.sides.new_zeros((len(self), 0), dtype=torch.uint8)

    @property
    def num_units(self) -> int:
        """Ordered units plus max-pooling windows per point."""
        return sum(elements for _, elements in self.layout) + self.winners.shape[1]

    def distance(self, other: ActivationCodes) -> Tensor:
        r"""Unit boundaries between two codes, row by row: :math:`d(c, c')` of the module docstring, ``[B]`` int32."""
        if self.words is not None and other.words is not None:
            distance = _differing_bytes(self.words, other.words)
        else:
            distance = (self.sides != other.sides).sum(dim=1, dtype=torch.int32)
        if self.winners.shape[1]:
            distance += (self.winners != other.winners).sum(dim=1, dtype=torch.int32)
        return distance


def _empty_codes(like: ActivationCodes, rows: int) -> ActivationCodes:
    """Codes of ``rows`` points with ``like``'s units, over new storage (padding zeroed, the rest uninitialized), to be
    filled by :func:`_codes_and_output_sum` or :func:`_copy_codes`."""
    width = like.sides.shape[1]
    buffer = like.sides.new_empty((rows, _padded(width)))
    buffer[:, width:] = False
    winners = like.winners.new_empty((rows, like.winners.shape[1]))
    words = buffer.view(torch.int64) if width else None
    return ActivationCodes(buffer[:, :width], winners, like.units, like.layout, words, like.smooth_operations)


def _copy_codes(out: ActivationCodes, codes: ActivationCodes) -> ActivationCodes:
    """Copy ``codes`` into ``out`` (same units and number of points), in place; returns ``out``."""
    if out.words is not None and codes.words is not None:
        out.words.copy_(codes.words)
    else:
        out.sides.copy_(codes.sides)
    out.winners.copy_(codes.winners)
    return out


def _padded(width: int) -> int:
    """Bytes per row of packed sides: whole 64-bit words."""
    return -(-width // 8) * 8


# A byte lane of an int64 sum of words of 0/1 bytes holds at most this many ones before it carries.
_LANE_CAPACITY = 255


def _differing_bytes(a: Tensor, b: Tensor) -> Tensor:
    """Row by row, how many of the 0/1 bytes packed in two ``int64`` tensors differ, ``[B]`` int32.

    The words' xor has a 1 byte where the bytes differ. Summing up to 255 such words as integers adds the bytes lane
    by lane without a carry, so the sum's eight bytes, added up, are the count: two passes over the words."""
    diff = a ^ b
    rows, words = diff.shape
    whole = words - words % _LANE_CAPACITY if words > _LANE_CAPACITY else 0
    lanes = [diff[:, :whole].reshape(rows, -1, _LANE_CAPACITY).sum(2)] if whole else []
    if words > whole:
        lanes.append(diff[:, whole:].sum(1, keepdim=True))
    lanes_sum = lanes[0] if len(lanes) == 1 else torch.cat(lanes, dim=1)
    return lanes_sum.view(torch.uint8).sum(1, dtype=torch.int32)


class NonFiniteOutputError(ValueError):
    """The model's output is NaN or infinite: activation codes and transition counts are undefined."""


def _output_sum(out: object) -> Tensor | float:
    """A number that is finite exactly when a model's output is free of NaN and infinities, computed on the
    output's device without a synchronization, so that the sums of many batches can be added up and checked once.

    The output's sum in ``float64``: NaN and infinities carry through a sum, and finite values of 32 bits or fewer
    cannot overflow it. A ``float64`` output could, so its sum is taken of ``out * 0`` instead (``0`` or NaN).
    ``0`` for outputs that are not floating point."""
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return 0.0
    if out.dtype == torch.float64:
        return out.mul(0).sum()
    return out.sum(dtype=torch.float64)


def _check_finite(output_sum: Tensor | float, where: str) -> None:
    """Read a (sum of) :func:`_output_sum` (one synchronization), and raise if it is not finite."""
    if not math.isfinite(float(output_sum)):
        # NaN pre-activations read as one piece or another: the codes would be made up, and a count of them a
        # silent wrong number (often 0).
        raise NonFiniteOutputError(
            f"The model's output is NaN or infinite {where}, so the activation codes there are meaningless and no "
            "transitions can be counted (were the weights or the inputs NaN?)."
        )


def activation_codes(model: Callable[[Tensor], Tensor], x: Tensor) -> ActivationCodes:
    r"""The activation code :math:`c(x)` of every point of a batch.

    One forward pass (no autograd) with every piecewise-linear call of the forward pass intercepted, whether it
    comes from a module or from a functional call. An ``nn.Module`` is evaluated in eval mode (dropout off,
    batch-norm running statistics) and every submodule's previous mode is restored afterwards; an ``autocast``
    region is switched off for the pass (half-precision inputs of the units would change the codes). Codes are stored
    as booleans (one per unit boundary) and small integers (pooling winners), never as float activations.

    Only calls on tensors whose first dimension is the batch are units, so a ``clamp`` on a parameter is not.
    The pass is followed from ``x`` on: the codes' ``smooth_operations`` name the operations upstream of a unit
    that are not piecewise linear (then equal codes do not mean one linear region; no warning is given here,
    :func:`~lightning_sensitivity.functional.count_transitions` gives one).

    A module compiled with ``torch.compile`` (the module itself, a submodule, or in place with ``module.compile()``)
    is run through its eager original, with the same parameters.

    Args:
        model: an ``nn.Module`` or any callable of a batch ``[B, ...]`` (the modules that a ``functools.partial``,
            a bound method or a closure holds get the same treatment as an ``nn.Module``). Its output is not used
            (transitions need no classifier).
        x: the points ``[B, ...]``.

    Returns:
        The codes, see :class:`ActivationCodes`.

    Raises:
        ValueError: if the forward pass has no piecewise-linear unit; the message names the non-linearities found.
        NonFiniteOutputError: (a ``ValueError``) if the model's output is NaN or infinite at some point.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_sensitivity.functional import activation_codes
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 3)
        ...     def forward(self, x):
        ...         return F.relu(self.fc(x)).clamp(max=0.5)
        >>> net = Net()
        >>> with torch.no_grad():
        ...     _ = net.fc.weight.copy_(torch.eye(3, 2)); _ = net.fc.bias.zero_()
        >>> codes = activation_codes(net, torch.tensor([[1.0, -1.0], [0.2, 0.3]]))
        >>> codes.units, codes.smooth_operations
        (('relu', 'clamp'), ())
        >>> codes.pieces
        tensor([[1, 0, 0, 1, 0, 0],
                [1, 1, 0, 0, 0, 0]], dtype=torch.uint8)
        >>> codes[:1].distance(codes[1:]).tolist()
        [2]
    """
    with measuring(model, x.device) as model:
        codes, output_sum = _codes_and_output_sum(model, x, follow_input=True)
    _check_finite(output_sum, "at some of the points")
    return codes


def _codes_and_output_sum(
    model: Callable[[Tensor], Tensor], x: Tensor, out: ActivationCodes | None = None, *, follow_input: bool = False
) -> tuple[ActivationCodes, Tensor | float]:
    """The codes, and the output's :func:`_output_sum` for the caller to check when it likes; the caller sets eval
    mode and disables autograd.

    With ``out`` (codes of ``x.shape[0]`` rows with the layout of an earlier pass through the same model, over
    storage the caller owns), every unit writes its code straight into ``out``'s storage and ``out`` is returned;
    if this pass's units differ from ``out``'s, the codes are recorded into new storage as without ``out``.
    ``follow_input`` follows the pass's data flow (:class:`~lightning_sensitivity.functional.units._DataFlow`):
    the codes' ``smooth_operations`` are filled in, the no-units error names the non-linearities found and
    uncounted piecewise-linear operations are warned about. It costs a few dictionary operations per call of the
    forward pass, so a count does it on its first pass only."""
    recorder = _CodeRecorder(x.shape[0], out, x if follow_input else None)
    with recorder:
        output = model(x)
    return recorder.codes(x), _output_sum(output)


class _CodeRecorder(TorchFunctionMode):
    """Records the code (boundary sides, pooling winners) of every piecewise-linear call; the calls are unchanged.

    The sides are packed into one ``[B, 8 * words]`` ``bool`` buffer (see :attr:`ActivationCodes.words`). Given
    ``out``, codes with the layout of an earlier pass, every unit writes its sides straight into ``out``'s columns
    (one pass fewer than collecting and copying); once a call differs from ``out``'s layout, the recorder falls
    back to collecting the sides and copying them into a new buffer at the end. Given ``follow``, the input of the
    pass, it also follows the pass's data flow (:class:`~lightning_sensitivity.functional.units._DataFlow`).
    """

    def __init__(self, batch_size: int, out: ActivationCodes | None = None, follow: Tensor | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sides: list[Tensor] = []
        self.layout: list[tuple[int, int]] = []
        self.winners: list[Tensor] = []
        self.winner_dtype = torch.uint8
        self.units: list[str] = []
        self.flow = _DataFlow(follow) if follow is not None else None
        self.out = out if out is not None and len(out) == batch_size else None
        self.offset = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flow = self.flow
        if flow is None:
            if name not in _PIECEWISE_LINEAR:  # most calls: one set lookup
                return func(*args, **kwargs)
            return self._call(name, func, args, kwargs)
        upstream = flow.upstream(args, kwargs)
        units = len(self.units)
        result = self._call(name, func, args, kwargs)
        if upstream is not None:
            flow.follow(name, args, kwargs, upstream, result, unit=len(self.units) > units)
        return result

    def _call(self, name: str, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if name not in _PIECEWISE_LINEAR:
            return func(*args, **kwargs)
        unit = _parse_unit(name, args, kwargs, self.batch_size)
        if unit is None:
            return func(*args, **kwargs)
        self.units.append(name)
        return self._unit_call(name, unit, func, args, kwargs)

    def _unit_call(
        self,
        name: str,
        unit: _Unit | _Pool,
        func: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one piecewise-linear call, recording its code."""
        if isinstance(unit, _Pool):
            out, indices = unit.pool(unit.input)
            self._record_winners(unit, indices)
            return (out, indices) if unit.return_indices else out
        if name in _RELU:
            # relu(u) != 0 exactly when u > 0: the sides come from the call's own output (in place or not), which
            # saves a second pass over the pre-activations; casting to bool is the test != 0.
            out = func(*args, **kwargs)
            self._store(1, out.flatten(1))
            return out
        self._store(len(unit.thresholds), unit.sides(unit.input))  # before the call: it may be in place
        return func(*args, **kwargs)

    def _store(self, boundaries: int, sides: Tensor) -> None:
        """Record one unit's sides ``[B, boundaries * elements]``, given as ``bool`` or as values whose non-zeros
        are the ``True`` sides."""
        width = sides.shape[1]
        entry = (boundaries, width // boundaries)
        out, layout = self.out, self.layout
        if out is not None and len(layout) < len(out.layout) and out.layout[len(layout)] == entry:
            start = self.offset
            self.offset = start + width
            self.sides.append(out.sides[:, start : start + width].copy_(sides))
        else:
            self.out = None
            self.sides.append(sides.to(torch.bool))
        layout.append(entry)

    def _record_winners(self, unit: _Pool, indices: Tensor) -> None:
        self.winners.append(indices.flatten(1).to(unit.index_dtype))
        self.winner_dtype = torch.promote_types(self.winner_dtype, unit.index_dtype)

    @property
    def smooth_operations(self) -> tuple[str, ...]:
        """The non-piecewise-linear operations upstream of a unit (empty unless the data flow is followed)."""
        return tuple(sorted(self.flow.feeding_units)) if self.flow is not None else ()

    def codes(self, x: Tensor) -> ActivationCodes:
        flow = self.flow
        if not self.units:
            raise _no_units_error(flow.smooth if flow is not None else set())
        if flow is not None and flow.uncounted:
            warnings.warn(
                f"The forward pass calls {', '.join(sorted(flow.uncounted))}: piecewise linear, but their pieces are "
                "not part of the activation codes, so boundaries they cross are not counted.",
                stacklevel=2,
            )
        winners = [w.to(self.winner_dtype) for w in self.winners]
        out = self.out
        if (
            out is not None
            and tuple(self.layout) == out.layout
            and tuple(self.units) == out.units
            and out.winners.dtype == self.winner_dtype
            and sum(w.shape[1] for w in winners) == out.winners.shape[1]
        ):
            if winners:
                torch.cat(winners, dim=1, out=out.winners)
            return out
        # The sides are written into a buffer whose rows are whole 64-bit words (zero padded), so that distances
        # compare eight of them per operation.
        width = sum(side.shape[1] for side in self.sides)
        buffer = x.new_zeros((x.shape[0], _padded(width)), dtype=torch.bool)
        offset = 0
        for side in self.sides:
            buffer[:, offset : offset + side.shape[1]] = side
            offset += side.shape[1]
        words = buffer.view(torch.int64) if width else None
        empty = x.new_zeros((x.shape[0], 0), dtype=self.winner_dtype)
        return ActivationCodes(
            buffer[:, :width],
            torch.cat(winners, dim=1) if winners else empty,
            tuple(self.units),
            tuple(self.layout),
            words,
            self.smooth_operations,
        )
