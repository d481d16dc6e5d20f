r"""The catalogue of piecewise-linear units, how their calls are read, and which other operations a forward pass
applies to its input.

A piecewise-linear unit maps its input :math:`u` through one of a few affine pieces. Its *piece index* is

- ReLU, LeakyReLU, PReLU, ``clamp(min=...)`` or ``clamp(max=...)``: :math:`[u > \theta]` (2 pieces);
- ReLU6, Hardtanh, ``clamp(min, max)``, Hardsigmoid: :math:`[u > \theta_1] + [u > \theta_2]` (3 pieces);
- max-pooling: the index of the winning input of each window (its position in the pooled plane).

Units are found by intercepting the forward pass at the torch-function level
(:class:`torch.overrides.TorchFunctionMode`): modules (``nn.ReLU``, ``nn.MaxPool2d``, ...) and functional calls
inside ``forward`` (``F.relu``, ``torch.relu``, ``x.clamp(min=0)``, ``F.max_pool2d``, ...) are seen alike.
A mode is switched off while it handles a call, so ``nn.ReLU -> F.relu -> torch.relu`` is one unit, not three.

A network whose units are the only non-linearities is piecewise linear: its input space is cut into linear regions
by the units' boundaries. Other operations between the input and a unit break that: a smooth function (tanh, GELU,
Hardswish, SiLU, ...), a normalization by statistics of the input (LayerNorm, GroupNorm, softmax, attention), or a
product of two tensors that both depend on the input (a gate, :math:`q k^\top`). :class:`_DataFlow` follows one
forward pass from its input and names those that feed a unit. Affine operations (linear and convolution layers,
batch norm in eval mode, average pooling, sums, reshapes) are not named, nor is anything applied after the last
unit (a softmax on the logits does not move a boundary).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sensitivity.functional._arguments import _arg, _tuple

Threshold = float | Tensor

_RELU = frozenset({"relu", "relu_"})
_LEAKY_RELU = frozenset({"leaky_relu", "leaky_relu_"})
_CLAMP = frozenset({"clamp", "clamp_", "clip", "clip_"})
_CLAMP_MIN = frozenset({"clamp_min", "clamp_min_"})
_CLAMP_MAX = frozenset({"clamp_max", "clamp_max_"})
_HARDTANH = frozenset({"hardtanh", "hardtanh_"})
_HARDSIGMOID = frozenset({"hardsigmoid", "hardsigmoid_"})
#: Max-pooling calls by the name of the torch function, and their number of spatial dimensions.
_MAX_POOL = {
    "max_pool1d": 1,
    "max_pool2d": 2,
    "max_pool3d": 3,
    "max_pool1d_with_indices": 1,
    "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3,
}
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
# undercount. Names as _operation writes them (no trailing underscore).
_UNCOUNTED = frozenset(
    {
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
        "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "fractional_max_pool2d",
        "fractional_max_pool3d", "hardshrink", "softshrink", "threshold", "abs", "maximum", "minimum", "amax",
        "amin", "rrelu",
    }
)  # fmt: skip
# Operations that are not piecewise linear in any tensor input that depends on the model's input.
_SMOOTH = frozenset(
    {
        # smooth activations
        "tanh", "sigmoid", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "hardswish", "logsigmoid",
        "softsign", "tanhshrink", "glu",
        # normalizations by statistics of the input, and attention
        "softmax", "log_softmax", "softmin", "layer_norm", "group_norm", "rms_norm", "normalize",
        "local_response_norm", "scaled_dot_product_attention", "multi_head_attention_forward",
        # elementwise and reducing functions
        "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "logit", "erf", "erfc", "erfinv", "sin", "cos",
        "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sinc", "sqrt", "rsqrt",
        "reciprocal", "pow", "square", "float_power", "norm", "linalg_vector_norm", "linalg_norm", "std", "var",
        "std_mean", "var_mean", "logsumexp", "logaddexp", "cumprod", "prod", "cosine_similarity",
        "pairwise_distance", "cdist", "special_expit", "special_erf", "special_erfc", "special_logit",
        "special_softmax", "special_log_softmax",
    }
)  # fmt: skip
# Products: not linear when two or more of their tensor operands depend on the model's input.
_PRODUCTS = frozenset(
    {
        "mul", "div", "true_divide", "matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "dot",
        "vdot", "inner", "outer", "einsum", "tensordot", "kron", "bilinear", "linear", "conv1d", "conv2d",
        "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "addcmul", "addcdiv", "cross",
    }
)  # fmt: skip


def _operation(name: str) -> str:
    """The operation a torch-function name stands for: ``relu_``, ``__rpow__`` and ``__rdiv__`` are ``relu``,
    ``pow`` and ``div``."""
    base = name.strip("_")
    if name.startswith("__") and base[:1] == "r" and base[1:] in _PRODUCTS | _SMOOTH:
        return base[1:]
    return base


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


_POOL_WITH_INDICES = {
    1: F.max_pool1d_with_indices,
    2: F.max_pool2d_with_indices,
    3: F.max_pool3d_with_indices,
}
_POOL_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
#: On the CPU, 2-d max-pooling with indices of a contiguous (NCHW) input of at least this many channels runs in the
#: channels-last layout: the CPU's NCHW kernel is 1.5 to 3 times slower from 4 channels up (64 x 16 x 32 x 32: 2.4
#: against 0.9 ms with both layout copies, 2 threads), and the values and winners are the same, ties included.
_CHANNELS_LAST_POOL = 4


@dataclass
class _Pool:
    """A max-pooling call, with its window geometry. Its piece index is the winner of each window: the position,
    in its pooled plane, of the window's maximum, the first one in scan order where several tie, as PyTorch's
    kernel returns it with ``return_indices=True``."""

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
        """PyTorch's pooling of ``u`` with this call's geometry: the values and the winners (``int64``), in ``u``'s
        layout (on the CPU computed in the channels-last one where that is faster, see :data:`_CHANNELS_LAST_POOL`)."""
        pool = _POOL_WITH_INDICES[self.dims]
        geometry = (self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
        if self.dims == 2 and u.device.type == "cpu" and u.shape[1] >= _CHANNELS_LAST_POOL and u.is_contiguous():
            values, winners = pool(u.contiguous(memory_format=torch.channels_last), *geometry, return_indices=True)
            return values.contiguous(), winners.contiguous()
        return pool(u, *geometry, return_indices=True)

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


def _parse_pool(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> _Pool | None:
    """The max-pooling call that a torch-function call is, or ``None``."""
    dims = _MAX_POOL.get(name)
    if dims is None or not args or not isinstance(args[0], Tensor):
        return None
    u = args[0]
    if u.ndim != dims + 2 or not u.is_floating_point():
        return None
    try:
        bound = _POOL_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
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
        return _parse_pool(name, args, kwargs)
    return None


def _is_smooth(name: str, args: Sequence[Any], kwargs: dict[str, Any], dependent_operands: int) -> bool:
    """Whether a call on tensors that depend on the model's input is not piecewise linear in them."""
    operation = _operation(name)
    if operation in _SMOOTH or name in ("__rdiv__", "__rtruediv__"):  # c / x: the input is the divisor
        return True
    if operation in _PRODUCTS:
        return dependent_operands >= 2
    if operation == "batch_norm":  # batch statistics; in eval mode (running statistics) it is affine
        return bool(_arg(args, kwargs, 5, "training", False))
    if operation == "instance_norm":
        return bool(_arg(args, kwargs, 5, "use_input_stats", True))
    return False


class _DataFlow:
    """Follows one forward pass from its input: the operations applied to tensors that depend on the input, and
    which of them feed a piecewise-linear unit.

    Every floating-point tensor computed from the input carries the names of the non-piecewise-linear operations
    upstream of it (integer and boolean tensors, such as comparisons, are piecewise constant and carry none).
    Tensors are told apart by identity, through weak references, so the pass keeps no activation alive.
    """

    def __init__(self, x: Tensor) -> None:
        self._upstream: dict[int, tuple[weakref.ref[Tensor], frozenset[str]]] = {}
        #: Non-piecewise-linear operations on the input's data flow, wherever they are.
        self.smooth: set[str] = set()
        #: Those upstream of at least one piecewise-linear unit.
        self.feeding_units: set[str] = set()
        #: Piecewise-linear operations on the data flow whose pieces are not recorded.
        self.uncounted: set[str] = set()
        self._mark(x, frozenset())

    def upstream(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, frozenset[str]] | None:
        """How many operands of a call depend on the input, and the operations upstream of them; ``None`` if
        none does. Read before the call (an in-place call changes its operand)."""
        dependent, names = 0, frozenset[str]()
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, Tensor) and (entry := self._upstream.get(id(item))) and entry[0]() is item:
                    dependent += 1
                    names |= entry[1]
        return (dependent, names) if dependent else None

    def follow(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        upstream: tuple[int, frozenset[str]],
        result: Any,
        unit: bool,
    ) -> None:
        """Record a call made on tensors that depend on the input (``upstream``), and mark its results."""
        dependent, names = upstream
        if unit:
            self.feeding_units |= names
        else:
            operation = _operation(name)
            if operation in _UNCOUNTED:
                self.uncounted.add(operation)
            elif _is_smooth(name, args, kwargs, dependent):
                self.smooth.add(operation)
                names = names | {operation}
        for item in result if isinstance(result, (list, tuple)) else (result,):
            self._mark(item, names)

    def _mark(self, value: Any, names: frozenset[str]) -> None:
        if isinstance(value, Tensor) and value.is_floating_point():
            self._upstream[id(value)] = (weakref.ref(value), names)


def _no_units_error(smooth: set[str]) -> ValueError:
    found = ", ".join(sorted(smooth)) if smooth else "none that this package recognizes"
    return ValueError(
        "The model has no piecewise-linear unit (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, Hardsigmoid, clamp, "
        "max-pooling, as modules or functional calls), so it has no linear regions and no transitions to count. "
        f"Non-linearities found in its forward pass: {found}."
    )
