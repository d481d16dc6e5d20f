r"""Activation codes: which linear piece every piecewise-linear unit of a network is on (SPEC section 3).

A piecewise-linear unit maps its input :math:`u` through one of a few affine pieces. Its *piece index* is

- ReLU, LeakyReLU, PReLU, ``clamp(min=...)`` or ``clamp(max=...)``: :math:`[u > \theta]` (2 pieces);
- ReLU6, Hardtanh, ``clamp(min, max)``, Hardsigmoid: :math:`[u > \theta_1] + [u > \theta_2]` (3 pieces);
- max-pooling: the index of the winning input of each window (its position in the pooled plane).

The activation code :math:`c(x)` of a network at :math:`x` is the concatenation of the indices of all units
of its forward pass. Two points with the same code lie in the same linear region, where the network is one
affine map. The number of unit boundaries between two codes is

.. math::

    d(c, c') = \sum_{\text{ordered units}} \lvert c_u - c'_u \rvert + \sum_{\text{pooling windows}} [w \ne w'],

so a 3-piece unit jumping from piece 0 to piece 2 counts 2, and a changed max-pooling winner counts 1.

Ordered units are stored as the side of each of their boundaries, :math:`[u > \theta_j]`, one bit per
boundary: the piece index is the sum of a unit's bits, and since :math:`[u > \theta_2]` implies
:math:`[u > \theta_1]`, :math:`\lvert c_u - c'_u \rvert` is the number of bits that differ. The distance is then
one comparison of two boolean tensors.

Units are found by intercepting the forward pass at the torch-function level
(:class:`torch.overrides.TorchFunctionMode`): modules (``nn.ReLU``, ``nn.MaxPool2d``, ...) and functional calls
inside ``forward`` (``F.relu``, ``torch.relu``, ``x.clamp(min=0)``, ``F.max_pool2d``, ...) are seen alike.
A mode is switched off while it handles a call, so ``nn.ReLU -> F.relu -> torch.relu`` is one unit, not three.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_sensitivity.functional._utils import _measuring

__all__ = ["ActivationCodes", "NonFiniteOutputError", "activation_codes"]

Threshold = float | Tensor

_RELU = frozenset({"relu", "relu_"})
_LEAKY_RELU = frozenset({"leaky_relu", "leaky_relu_"})
_CLAMP = frozenset({"clamp", "clamp_", "clip", "clip_"})
_CLAMP_MIN = frozenset({"clamp_min", "clamp_min_"})
_CLAMP_MAX = frozenset({"clamp_max", "clamp_max_"})
_HARDTANH = frozenset({"hardtanh", "hardtanh_"})
_HARDSIGMOID = frozenset({"hardsigmoid", "hardsigmoid_"})
_MAX_POOL = {
    "max_pool1d": 1,
    "max_pool2d": 2,
    "max_pool3d": 3,
    "max_pool1d_with_indices": 1,
    "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3,
}
_POOL_WITH_INDICES = {
    1: F.max_pool1d_with_indices,
    2: F.max_pool2d_with_indices,
    3: F.max_pool3d_with_indices,
}
_POOL_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
# Every call that _parse_unit may read as a unit.
_PIECEWISE_LINEAR = (
    _RELU
    | _LEAKY_RELU
    | _CLAMP
    | _CLAMP_MIN
    | _CLAMP_MAX
    | _HARDTANH
    | _HARDSIGMOID
    | {"prelu", "relu6", *_MAX_POOL}
)
# Piecewise-linear operations whose pieces are not recorded: a model that uses them gets a warning, not a silent
# undercount.
_UNCOUNTED = frozenset(
    {
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
        "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "fractional_max_pool2d",
        "fractional_max_pool3d", "hardshrink", "softshrink", "threshold", "threshold_", "abs", "abs_", "maximum",
        "minimum", "amax", "amin", "rrelu", "rrelu_",
    }
)  # fmt: skip
# Smooth non-linearities, named in the error for models without any piecewise-linear unit.
_SMOOTH = frozenset(
    {
        "tanh", "tanh_", "sigmoid", "sigmoid_", "gelu", "silu", "elu", "elu_", "selu", "selu_", "celu", "celu_",
        "softplus", "mish", "hardswish", "logsigmoid", "softsign", "tanhshrink", "softmax", "log_softmax",
        "layer_norm", "group_norm", "exp", "log", "erf", "sin", "cos",
    }
)  # fmt: skip


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
    """

    sides: Tensor
    winners: Tensor
    units: tuple[str, ...]
    layout: tuple[tuple[int, int], ...]
    words: Tensor | None = None

    def __len__(self) -> int:
        return self.sides.shape[0]

    def __getitem__(self, index: slice | Tensor) -> ActivationCodes:
        words = None if self.words is None else self.words[index]
        return ActivationCodes(self.sides[index], self.winners[index], self.units, self.layout, words)

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
    filled by :func:`_codes_and_probe` or :func:`_copy_codes`."""
    width = like.sides.shape[1]
    buffer = like.sides.new_empty((rows, _padded(width)))
    buffer[:, width:] = False
    winners = like.winners.new_empty((rows, like.winners.shape[1]))
    words = buffer.view(torch.int64) if width else None
    return ActivationCodes(buffer[:, :width], winners, like.units, like.layout, words)


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


def _non_finite_probe(out: object) -> Tensor | float:
    """A number that is finite exactly when a model's output is free of NaN and infinities, computed on the
    output's device without a synchronization, so that the probes of many batches can be added up and checked once.

    The output's sum in ``float64``: NaN and infinities carry through a sum, and finite values of 32 bits or fewer
    cannot overflow it. A ``float64`` output could, so its probe is ``(out * 0).sum()`` instead (``0`` or NaN).
    ``0`` for outputs that are not floating point."""
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return 0.0
    if out.dtype == torch.float64:
        return out.mul(0).sum()
    return out.sum(dtype=torch.float64)


def _is_finite(probe: Tensor | float) -> bool:
    """Read a (sum of) :func:`_non_finite_probe` (one synchronization)."""
    return math.isfinite(float(probe))


def activation_codes(model: Callable[[Tensor], Tensor], x: Tensor) -> ActivationCodes:
    r"""The activation code :math:`c(x)` of every point of a batch.

    One forward pass (no autograd) with every piecewise-linear call of the forward pass intercepted, whether it
    comes from a module or from a functional call. An ``nn.Module`` is evaluated in eval mode (dropout off,
    batch-norm running statistics) and every submodule's previous mode is restored afterwards; an ``autocast``
    region is switched off for the pass (half-precision inputs of the units would change the codes). Codes are stored
    as booleans (one per unit boundary) and small integers (pooling winners), never as float activations.

    Only calls on tensors whose first dimension is the batch are units, so a ``clamp`` on a parameter is not.

    Args:
        model: an ``nn.Module`` or any callable of a batch ``[B, ...]``. Its output is not used (transitions need
            no classifier).
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
        >>> codes.units
        ('relu', 'clamp')
        >>> codes.pieces
        tensor([[1, 0, 0, 1, 0, 0],
                [1, 1, 0, 0, 0, 0]], dtype=torch.uint8)
        >>> codes[:1].distance(codes[1:]).tolist()
        [2]
    """
    with _measuring(model, x.device):
        return _codes(model, x)


def _codes(model: Callable[[Tensor], Tensor], x: Tensor) -> ActivationCodes:
    """:func:`activation_codes` without the set-up: the caller sets eval mode and disables autograd."""
    codes, probe = _codes_and_probe(model, x)
    if not _is_finite(probe):
        # NaN pre-activations read as one piece or another: the codes would be made up, and a count of them a
        # silent wrong number (often 0).
        raise NonFiniteOutputError(
            "The model's output is NaN or infinite at some of the points, so their activation codes are "
            "meaningless (were the weights or the inputs NaN?)."
        )
    return codes


def _codes_and_probe(
    model: Callable[[Tensor], Tensor], x: Tensor, out: ActivationCodes | None = None
) -> tuple[ActivationCodes, Tensor | float]:
    """The codes, and the output's :func:`_non_finite_probe` for the caller to check when it likes.

    With ``out`` (codes of ``x.shape[0]`` rows with the layout of an earlier pass through the same model, over
    storage the caller owns), every unit writes its code straight into ``out``'s storage and ``out`` is returned;
    if this pass's units differ from ``out``'s, the codes are recorded into new storage as without ``out``."""
    recorder = _CodeRecorder(x.shape[0], out)
    with recorder:
        output = model(x)
    return recorder.codes(x), _non_finite_probe(output)


class NonFiniteOutputError(ValueError):
    """The model's output is NaN or infinite: activation codes and transition counts are undefined."""


def _no_units_error(smooth: set[str]) -> ValueError:
    found = ", ".join(sorted(smooth)) if smooth else "none that this package recognizes"
    return ValueError(
        "The model has no piecewise-linear unit (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, Hardsigmoid, clamp, "
        "max-pooling, as modules or functional calls), so it has no linear regions and no transitions to count. "
        f"Non-linearities found in its forward pass: {found}."
    )


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(key, default)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def _above(u: Tensor, threshold: Threshold) -> Tensor:
    """:math:`[u > \\theta]` as ``bool``, computed as ``relu(u - theta) != 0``: on CPU a float comparison is several
    times slower than these two vectorized passes. Exact: in floating point, ``u - theta`` is 0 only if
    ``u == theta``, and has the sign of ``u - theta`` otherwise."""
    shifted = u if isinstance(threshold, (int, float)) and threshold == 0 else u - threshold
    return torch.relu(shifted).to(torch.bool)


@dataclass
class _Unit:
    """An ordered piecewise-linear call: piece index = number of ``thresholds`` below the input."""

    input: Tensor
    thresholds: tuple[Threshold, ...]
    slopes: tuple[Threshold, ...]  # the slope of each piece
    inplace: bool

    def sides(self, u: Tensor) -> Tensor:
        """``[B, boundaries * elements]``: whether each element is above each threshold."""
        if len(self.thresholds) == 1:
            return _above(u, self.thresholds[0]).flatten(1)
        return torch.stack([_above(u, threshold) for threshold in self.thresholds], dim=1).flatten(1)

    def pieces(self, u: Tensor) -> Tensor:
        index = _above(u, self.thresholds[0]).to(torch.uint8)
        for threshold in self.thresholds[1:]:
            index += _above(u, threshold)
        return index

    def slope(self, pieces: Tensor, like: Tensor) -> Tensor:
        slope = torch.zeros((), dtype=like.dtype, device=like.device)
        for index, value in enumerate(self.slopes):
            slope = torch.where(
                pieces == index, torch.as_tensor(value, dtype=like.dtype, device=like.device), slope
            )
        return slope


@dataclass
class _Pool:
    """A max-pooling call, with its window geometry."""

    input: Tensor
    dims: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    return_indices: bool

    @property
    def index_dtype(self) -> torch.dtype:
        """The smallest integer type that holds an index into one pooled plane."""
        plane = math.prod(self.input.shape[2:])
        return torch.uint8 if plane <= 256 else torch.int16 if plane <= 2**15 else torch.int32

    def pool(self, u: Tensor) -> tuple[Tensor, Tensor]:
        return _POOL_WITH_INDICES[self.dims](
            u, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode, return_indices=True
        )

    def window_table(self, out_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Flat input position of every (output position, window position) pair, ``[O, K]``, and its validity."""
        device = self.input.device
        flat = torch.zeros(1, 1, dtype=torch.long, device=device)
        valid = torch.ones(1, 1, dtype=torch.bool, device=device)
        for d, size in enumerate(self.input.shape[2:]):
            out = torch.arange(out_shape[d], device=device)[:, None]
            pos = (
                out * self.stride[d]
                - self.padding[d]
                + torch.arange(self.kernel[d], device=device) * self.dilation[d]
            )
            inside = (pos >= 0) & (pos < size)
            shape = (flat.shape[0] * pos.shape[0], flat.shape[1] * pos.shape[1])
            flat = (flat[:, None, :, None] * size + pos.clamp(0, size - 1)[None, :, None, :]).reshape(shape)
            valid = (valid[:, None, :, None] & inside[None, :, None, :]).reshape(shape)
        return flat, valid


def _parse_unit(
    name: str, args: Sequence[Any], kwargs: dict[str, Any], batch_size: int
) -> _Unit | _Pool | None:
    """The piecewise-linear unit that a torch-function call is, or ``None``."""
    if not args or not isinstance(args[0], Tensor):
        return None
    u = args[0]
    if u.ndim == 0 or u.shape[0] != batch_size or not u.is_floating_point():
        return None
    in_place = name.endswith("_")
    if name in _RELU:
        return _Unit(u, (0.0,), (0.0, 1.0), in_place or bool(_arg(args, kwargs, 1, "inplace", False)))
    if name in _LEAKY_RELU:
        slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
        return _Unit(u, (0.0,), (slope, 1.0), in_place or bool(_arg(args, kwargs, 2, "inplace", False)))
    if name == "prelu":
        weight = _arg(args, kwargs, 1, "weight", None)
        if weight.numel() > 1:
            weight = weight.reshape(1, -1, *[1] * (u.ndim - 2))
        return _Unit(u, (0.0,), (weight, 1.0), False)
    if name in _CLAMP | _CLAMP_MIN | _CLAMP_MAX:
        if name in _CLAMP:
            low, high = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        elif name in _CLAMP_MIN:
            low, high = _arg(args, kwargs, 1, "min", None), None
        else:
            low, high = None, _arg(args, kwargs, 1, "max", None)
        if low is not None and high is not None:
            return _Unit(u, (low, high), (0.0, 1.0, 0.0), in_place)
        if low is not None:
            return _Unit(u, (low,), (0.0, 1.0), in_place)
        return _Unit(u, (high,), (1.0, 0.0), in_place) if high is not None else None
    if name in _HARDTANH:
        low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        return _Unit(
            u, (low, high), (0.0, 1.0, 0.0), in_place or bool(_arg(args, kwargs, 3, "inplace", False))
        )
    if name == "relu6":
        return _Unit(u, (0.0, 6.0), (0.0, 1.0, 0.0), bool(_arg(args, kwargs, 1, "inplace", False)))
    if name in _HARDSIGMOID:
        inplace = in_place or bool(_arg(args, kwargs, 1, "inplace", False))
        return _Unit(u, (-3.0, 3.0), (0.0, 1.0 / 6.0, 0.0), inplace)
    if name in _MAX_POOL:
        dims = _MAX_POOL[name]
        if u.ndim != dims + 2:
            return None
        bound = _POOL_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        kernel = _tuple(options["kernel_size"], dims)
        stride = _tuple(options["stride"], dims) if options["stride"] not in (None, []) else kernel
        return _Pool(
            u,
            dims,
            kernel,
            stride,
            _tuple(options["padding"], dims),
            _tuple(options["dilation"], dims),
            bool(options["ceil_mode"]),
            bool(options["return_indices"]) or name.endswith("_with_indices"),
        )
    return None


class _CodeRecorder(TorchFunctionMode):
    """Records the code (boundary sides, pooling winners) of every piecewise-linear call; the calls are unchanged.

    The sides are packed into one ``[B, 8 * words]`` ``bool`` buffer (see :attr:`ActivationCodes.words`). Given
    ``out``, codes with the layout of an earlier pass, every unit writes its sides straight into ``out``'s columns
    (one pass fewer than collecting and copying); once a call differs from ``out``'s layout, the recorder falls
    back to collecting the sides and copying them into a new buffer at the end.
    """

    def __init__(self, batch_size: int, out: ActivationCodes | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.sides: list[Tensor] = []
        self.layout: list[tuple[int, int]] = []
        self.winners: list[Tensor] = []
        self.winner_dtype = torch.uint8
        self.units: list[str] = []
        self.smooth: set[str] = set()
        self.uncounted: set[str] = set()
        self.out = out if out is not None and len(out) == batch_size else None
        self.offset = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _PIECEWISE_LINEAR:  # most calls: one set lookup
            if name in _SMOOTH or name in _UNCOUNTED:
                self._note_other(name, args)
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

    def _note_other(self, name: str, args: Sequence[Any]) -> None:
        if name in _SMOOTH:
            self.smooth.add(name)
        elif (
            name in _UNCOUNTED
            and args
            and isinstance(args[0], Tensor)
            and args[0].shape[:1] == (self.batch_size,)
        ):
            self.uncounted.add(name)

    def _record_winners(self, unit: _Pool, indices: Tensor) -> None:
        self.winners.append(indices.flatten(1).to(unit.index_dtype))
        self.winner_dtype = torch.promote_types(self.winner_dtype, unit.index_dtype)

    def codes(self, x: Tensor) -> ActivationCodes:
        if not self.units:
            raise _no_units_error(self.smooth)
        if self.uncounted:
            warnings.warn(
                f"The forward pass calls {', '.join(sorted(self.uncounted))}: piecewise linear, but their pieces are "
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
        )


class _RegionRecorder(_CodeRecorder):
    r"""Runs a batch through the linear region of its first row, and records every unit's boundary functions.

    Row 0 goes through the network unchanged. Every other row goes through the affine map that the network is
    inside row 0's linear region: each unit applies row 0's piece, :math:`f(u_0) + f'_{p_0}\,(u - u_0)`, and each
    pooling window picks row 0's winner. For each unit it records, for every row, the values whose sign changes
    where the unit changes piece: :math:`u - \theta` for each threshold, and :math:`u_k - u_{w}` for each input
    :math:`k` of a pooling window with winner :math:`w`. Inside the region all of these are affine in the input.
    """

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size)
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
