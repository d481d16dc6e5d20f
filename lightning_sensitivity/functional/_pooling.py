r"""Max-pooling calls: how they are read, and how a measurement computes them on the CPU outside autograd.

ATen's CPU kernel for max-pooling a contiguous ``[N, C, *spatial]`` tensor scans every window element by element.
On the CPU of the overhead benchmark it was 70% of a small CNN's forward pass in eval mode, and 40% of counting the
transitions along its trajectories. A window of :math:`K` positions covers, position by position, :math:`K`
strided views of the input, so the same pooling is :math:`K - 1` vectorized maxima of those views (4 to 5 times
faster on that CNN's 2 x 2 pools, ``python -m benchmarks.pooling``). The result is the same:

- the values are the window maxima, exactly (a maximum rounds nothing; only the sign of a zero that ties with
  another zero may differ, as the maximum's vectorized and scalar loops take different sides of a tie);
- the winners (the index of each window's maximum in its pooled plane), when asked for, are ATen's: the first
  maximum in the window's scan order, found by comparing each view with the running maximum (a later position wins
  only where it is strictly greater). Ties are common (a window of zeros after a ReLU), and activation codes count a
  changed winner as a boundary crossed, so the rule matters. ATen lets a NaN win anywhere; when the pooled values
  are not all finite, the winners are taken from ATen's kernel instead.

Only the calls this covers are taken over: a batched tensor, contiguous, on the CPU, with no autograd graph to build
(a maximum's backward pass splits the gradient among tied inputs, ATen's gives it to the winner) and outside
``torch.func`` transforms, in floor mode.
Everything else, and every call on another device, runs ATen's kernel.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Max-pooling calls by the name of the torch function, and their number of spatial dimensions.
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
#: Below this many input elements a call runs ATen's kernel: the views' per-operation cost would exceed its scan.
_FAST_MIN_ELEMENTS = 2**16


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


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
        """ATen's pooling of ``u`` with this call's geometry: the values and the winners (``int64``)."""
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

    def winners(self) -> tuple[Tensor, Tensor]:
        """The pooled values of this call's input and the winners in :attr:`index_dtype`, through the strided views
        where they apply and give ATen's winners, else ATen's kernel."""
        if self._fast(self.input, winners=True):
            found = _strided_max(self.input, self.kernel, self.stride, self.padding, self.dilation, self.index_dtype)
            if found[1] is not None:
                return found[0], found[1]
        out, indices = self.pool(self.input)
        return out, indices.to(self.index_dtype)

    def output_shape(self) -> tuple[int, ...] | None:
        """The pooled spatial shape in floor mode, or ``None`` where ATen would reject the geometry."""
        shape = []
        for size, k, s, p, d in zip(
            self.input.shape[2:], self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            if k < 1 or s < 1 or d < 1 or p < 0 or 2 * p > k:
                return None
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            if out < 1:
                return None
            shape.append(out)
        return tuple(shape)

    def _fast(self, u: Tensor, winners: bool) -> bool:
        """Whether :func:`_strided_max` computes this call on ``u`` (see the module docstring), and is faster than
        ATen's kernel there: on at least :data:`_FAST_MIN_ELEMENTS` elements, and for the winners only with
        windows of at most 4 positions (at 3 x 3 the comparisons cost more than ATen's scan)."""
        return (
            type(u) is Tensor
            and not _functorch_wrapped(u)  # under torch.func transforms: their batching and autograd rules
            and u.device.type == "cpu"
            and not self.ceil_mode
            and u.ndim == self.dims + 2
            and u.numel() >= _FAST_MIN_ELEMENTS
            and u.is_contiguous()
            and not (u.requires_grad and torch.is_grad_enabled())
            and len(self.kernel) == len(self.stride) == len(self.padding) == len(self.dilation) == self.dims
            and math.prod(self.kernel) <= (4 if winners else 256)
            and self.output_shape() is not None
        )


def _functorch_wrapped(u: Tensor) -> bool:
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if is_wrapped is None else bool(is_wrapped(u))


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


def _strided_max(
    u: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    index_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Max-pooling of ``u`` ``[N, C, *spatial]`` (floor mode) as maxima of strided views: the values, and with
    ``index_dtype`` the winners' flat indices in their pooled plane (``None`` when the values are not all finite:
    ATen's NaN rule is not reproduced)."""
    spatial = u.shape[2:]
    out_shape = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True)
    ]
    if any(padding):  # ATen's windows skip the padding; -inf never wins over a finite value
        pads = [side for p in reversed(padding) for side in (p, p)]
        u = F.pad(u, pads, value=-math.inf)
    plane_strides = [math.prod(spatial[d + 1 :]) for d in range(len(spatial))]
    views, offsets = [], []
    for position in itertools.product(*(range(k) for k in kernel)):
        window = zip(position, dilation, stride, out_shape, strict=True)
        views.append(u[(slice(None), slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in window))])
        offsets.append(sum(o * d * w for o, d, w in zip(position, dilation, plane_strides, strict=True)))
    if len(views) == 1:
        best = views[0].clone(memory_format=torch.contiguous_format)
    else:
        best = torch.empty(views[0].shape, dtype=u.dtype)
    winners = above = scratch = None
    if index_dtype is not None:
        winners = torch.zeros(best.shape, dtype=index_dtype)
        above = torch.empty(best.shape, dtype=torch.bool)
        scratch = torch.empty(best.shape, dtype=index_dtype)
    for i in range(1, len(views)):
        view, previous = views[i], views[0] if i == 1 else best
        if winners is not None:
            # where this position is strictly above the maximum so far, it wins: winners += above * (offset - winners)
            torch.gt(view, previous, out=above)
            torch.neg(winners, out=scratch).add_(offsets[i])
            scratch.mul_(above.view(torch.uint8) if index_dtype == torch.uint8 else above)
            winners.add_(scratch)
        torch.maximum(view, previous, out=best)
    if winners is None:
        return best, None
    if not torch.isfinite(best.sum()):
        return best, None
    # the window's first position, in the unpadded plane (negative where the window starts in the padding)
    first = torch.zeros((), dtype=torch.int64)
    for n, s, p, w in zip(out_shape, stride, padding, plane_strides, strict=True):
        first = first[..., None] + (torch.arange(n) * s - p) * w
    if index_dtype == torch.uint8:
        first = first.remainder(256)  # uint8 sums wrap: the winner's true index is in [0, 256)
    winners.add_(first.to(index_dtype))
    return best, winners


class _FastMaxPooling(TorchFunctionMode):
    """Computes the max-pooling calls that :func:`_strided_max` covers (see the module docstring) through it; every
    other call is run unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _MAX_POOL:
            return func(*args, **kwargs)
        pool = _parse_pool(name, args, kwargs)
        if pool is None or not pool._fast(pool.input, winners=pool.return_indices):
            return func(*args, **kwargs)
        if not pool.return_indices:
            return _strided_max(pool.input, pool.kernel, pool.stride, pool.padding, pool.dilation)[0]
        out, winners = _strided_max(
            pool.input, pool.kernel, pool.stride, pool.padding, pool.dilation, torch.int64
        )
        return (out, winners) if winners is not None else func(*args, **kwargs)
