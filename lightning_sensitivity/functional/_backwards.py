r"""Cheaper backward passes for two operations of the Jacobian's forward pass, with the same forward values.

- An eval-mode batch norm (:func:`_eval_batch_norm`): its vector-Jacobian product is the per-channel scale it
  applies.
- A 2-d convolution of the measured input itself, on the CPU (:func:`_input_conv2d`): its vector-Jacobian product
  to the input is one matrix product with the kernel and a ``fold`` (col2im), where the CPU's transposed
  convolution into few channels is slow (3 to 20 GFLOP/s here, against 50 to 180 for the layers after it).

Both are ``torch.autograd.Function`` subclasses whose backward is written with operators that ``torch.func.vmap``
batches, so the rows of a Jacobian are still pulled back together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_sensitivity.functional._arguments import _arg


class _ScaledBackward(torch.autograd.Function):
    """``normalize(x)``, with the gradient ``grad * scale`` to ``x``.

    In eval mode a batch norm is the affine map :math:`y = s \\odot x + t`, per channel, with
    :math:`s = w / \\sqrt{\\sigma^2 + \\epsilon}`; its vector-Jacobian product is :math:`s \\odot v`. Autograd's own
    backward of ``batch_norm`` computes the general (training-mode) formula and, under ``torch.func.vmap``, copies
    its inputs once per row: about 40% of a batched backward pass through a torchvision ``resnet18`` on CPU."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, normalize: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return normalize(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


def _eval_batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """``F.batch_norm(*args, **kwargs)`` with the cheap backward of :class:`_ScaledBackward` when it normalizes with
    running statistics (eval mode); ``None`` for any other call (batch statistics couple the points)."""
    x, mean, var, weight, bias = (
        _arg(args, kwargs, i, name, None)
        for i, name in enumerate(("input", "running_mean", "running_var", "weight", "bias"))
    )
    if _arg(args, kwargs, 5, "training", False) or not isinstance(x, Tensor) or mean is None or var is None:
        return None
    if x.ndim < 2 or _computed(mean, var, weight, bias):
        return None
    with torch.no_grad():
        scale = torch.rsqrt(var.to(x.dtype) + _arg(args, kwargs, 7, "eps", 1e-5))
        if weight is not None:
            scale = scale * weight.to(x.dtype)
        scale = scale.view(1, -1, *[1] * (x.ndim - 2))
    rest = {name: value for name, value in kwargs.items() if name != "input"}
    return _ScaledBackward.apply(x, scale, lambda v: torch.nn.functional.batch_norm(v, *args[1:], **rest))


class _FoldedBackward(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, dilation)``, with the gradient to ``x`` only, computed as
    ``fold(weight^T @ grad)``: the transposed convolution written as a matrix product and a col2im."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        ctx.save_for_backward(weight.detach())
        ctx.geometry = (tuple(x.shape[-2:]), stride, padding, dilation)
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        size, stride, padding, dilation = ctx.geometry
        out_channels, in_channels, kh, kw = weight.shape
        columns = torch.matmul(weight.reshape(out_channels, in_channels * kh * kw).T, grad.flatten(-2))
        x_grad = torch.nn.functional.fold(columns, size, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return x_grad, None, None, None, None, None


def _computed(*values: Any) -> bool:
    """Whether one of ``values`` is itself computed in the graph (has a ``grad_fn``), so that it may depend on the
    input: the cheaper backwards give no gradient through it, and are not taken (parameters and buffers are
    leaves)."""
    return any(isinstance(value, Tensor) and value.grad_fn is not None for value in values)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None


def _input_conv2d(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """``F.conv2d(*args, **kwargs)`` with the backward of :class:`_FoldedBackward`, for a batched CPU input and one
    group with integer geometry (``padding="same"`` and the like keep the operator's own backward); ``None`` for any
    other call. The caller applies it to convolutions of the measured input only."""
    x, weight, bias = (_arg(args, kwargs, i, name, None) for i, name in enumerate(("input", "weight", "bias")))
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.ndim != 4 or x.device.type != "cpu":
        return None
    stride, padding, dilation = (
        _pair(_arg(args, kwargs, i, name, default))
        for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
    )
    if _arg(args, kwargs, 6, "groups", 1) != 1 or stride is None or padding is None or dilation is None:
        return None
    if _computed(weight, bias):
        return None
    return _FoldedBackward.apply(x, weight, bias, stride, padding, dilation)
