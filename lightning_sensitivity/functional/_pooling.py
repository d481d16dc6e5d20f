r"""Max-pooling calls: how they are read, and how a measurement pools on the CPU outside autograd.

ATen's CPU kernel for max-pooling a contiguous ``[N, C, *spatial]`` tensor scans every window element by element,
with a branch per element: on the CPU of the overhead benchmark it was 70% of a small CNN's forward pass in eval
mode. A window of :math:`K` positions covers, position by position, :math:`K` strided views of the input, so the
same pooling is :math:`K - 1` vectorized maxima of those views: 2.4 to 6 times faster at 2 x 2 windows
(``python -m benchmarks.pooling``; ATen's scan is faster on inputs with many ties, such as a ReLU's zeros, as its
branches are then predictable). The values are the same: a maximum rounds nothing; only the sign of a zero that
ties with another zero may differ, as the maximum's vectorized and scalar loops take different sides of a tie.

The winners (the index of each window's maximum, which activation codes record and ``return_indices=True``
returns) are left to ATen's kernel: ATen takes the first maximum in scan order, and reproducing that rule with the
views takes a comparison per window position, which is slower than ATen's scan on the tie-heavy activations of a
trained network. Autograd is left to it too: a maximum's backward pass splits the gradient among tied inputs, where
ATen's gives it to the winner.

:func:`_fast_pooling` takes over the forward pass of a model's ``nn.MaxPool1d/2d/3d`` modules inside
:func:`~lightning_sensitivity.functional.evaluation.measuring` on the CPU without autograd, for the calls that
:meth:`_Pool._fast` covers; everything else runs ATen's kernel.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def _pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The pooled length of one spatial dimension of ``size``, in floor mode."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


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

    def output_shape(self) -> tuple[int, ...] | None:
        """The pooled spatial shape in floor mode, or ``None`` where ATen would reject the geometry."""
        shape = []
        for size, k, s, p, d in zip(
            self.input.shape[2:], self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            if k < 1 or s < 1 or d < 1 or p < 0 or 2 * p > k:
                return None
            out = _pooled_size(size, k, s, p, d)
            if out < 1:
                return None
            shape.append(out)
        return tuple(shape)

    def _fast(self) -> bool:
        """Whether :func:`_strided_max` computes this call's values: its input a plain batched tensor, contiguous,
        on the CPU, of at least :data:`_FAST_MIN_ELEMENTS` elements, with no autograd graph to build, outside
        ``torch.func`` transforms, in floor mode, with a geometry ATen accepts, and no winners asked for."""
        u = self.input
        return (
            type(u) is Tensor
            and not self.return_indices
            and not _functorch_wrapped(u)  # under torch.func transforms: their batching and autograd rules
            and u.device.type == "cpu"
            and not self.ceil_mode
            and u.ndim == self.dims + 2
            and u.numel() >= _FAST_MIN_ELEMENTS
            and u.is_contiguous()
            and not (u.requires_grad and torch.is_grad_enabled())
            and len(self.kernel) == len(self.stride) == len(self.padding) == len(self.dilation) == self.dims
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
) -> Tensor:
    """Max-pooling of ``u`` ``[N, C, *spatial]`` (floor mode) as maxima of strided views, contiguous."""
    spatial = u.shape[2:]
    out_shape = [
        _pooled_size(size, k, s, p, d) for size, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True)
    ]
    if any(padding):  # ATen's windows skip the padding: -inf never wins, and a window holds an input element
        pads = [side for p in reversed(padding) for side in (p, p)]
        u = F.pad(u, pads, value=-math.inf)
    views = []
    for position in itertools.product(*(range(k) for k in kernel)):
        window = zip(position, dilation, stride, out_shape, strict=True)
        views.append(u[(slice(None), slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in window))])
    if len(views) == 1:
        return views[0].clone(memory_format=torch.contiguous_format)
    best = torch.maximum(views[1], views[0])
    for view in views[2:]:
        torch.maximum(view, best, out=best)
    return best


_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


def _pooled_forward(module: nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d, x: Tensor) -> Any:
    """``module(x)``'s forward through :func:`_strided_max` where it covers the call, else the module's own. A
    torch-function mode that is active (the activation codes' recorder) sees the module's own call, as it would
    without this."""
    if not torch._C._is_torch_function_mode_enabled():
        pool = _parse_pool(
            f"max_pool{_MODULES[type(module)]}d",
            (x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode),
            {"return_indices": module.return_indices},
        )
        if pool is not None and pool._fast():
            return _strided_max(x, pool.kernel, pool.stride, pool.padding, pool.dilation)
    return type(module).forward(module, x)


@contextlib.contextmanager
def _fast_pooling(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, the ``nn.MaxPool1d/2d/3d`` submodules of ``modules`` (of those classes exactly, whose
    ``forward`` is PyTorch's) pool through :func:`_pooled_forward`; their ``forward`` is restored afterwards. A
    module, not a torch-function mode: a mode would cost every other call of the forward pass a Python dispatch
    (1.5 us here; it made the exact transition count twice as slow). A ``F.max_pool2d`` call inside a ``forward``
    keeps PyTorch's kernel."""
    swapped = []
    try:
        for holder in modules:
            for module in holder.modules():
                if type(module) in _MODULES and "forward" not in module.__dict__:
                    module.forward = functools.partial(_pooled_forward, module)
                    swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward
