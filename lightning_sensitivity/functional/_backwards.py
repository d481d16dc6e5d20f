r"""Cheaper backward passes for operations of the Jacobian's forward pass, with the same forward values: one table of
shortcuts (:data:`_SHORTCUTS`), by the torch function they stand in for.

- ``F.batch_norm`` in eval mode, on the CPU (:func:`_eval_batch_norm`): its vector-Jacobian product is the
  per-channel scale it applies, where autograd's general batch-norm backward computes the training-mode formula
  and, under ``torch.func.vmap``, copies its inputs once per row.
- ``F.conv2d`` of the measured input itself, on the CPU, into one input channel or with patches that do not overlap
  (:func:`_input_conv2d`): its vector-Jacobian product to the input is one matrix product with the kernel and a
  ``fold`` (col2im), where the CPU's transposed convolution into one channel, or over a patch embedding's large
  kernel, is slow. For several input channels and overlapping windows (a 3 x 3 convolution of an RGB image, a
  strided 7 x 7 stem) the transposed convolution is as fast or faster, and the operator's own backward runs.

Both were measured on the CPU only (``docs/benchmarks.md``), and are taken there only. A shortcut builder returns
``None`` where its shortcut does not apply (another device, batch statistics, a kernel computed in the graph, a
geometry it does not cover), and the call then runs as it is. No shortcut is taken with autograd off (it would
change nothing) or while saved-tensor hooks are active (:func:`_saved_tensors_hooked`): activation checkpointing
recomputes a region's forward pass during the backward pass, outside the measurement's watch, and checks that the
recomputation saves the tensors the forward pass saved, which a shortcut changes.

The shortcuts are ``torch.autograd.Function`` subclasses in the ``forward`` / ``setup_context`` form, with every
tensor an explicit input and a generated ``vmap`` rule: the form that composes with ``torch.func`` transforms (a
model whose ``forward`` vmaps an ensemble), and whose backward, written with operators that ``torch.func.vmap``
batches, lets the rows of a Jacobian be pulled back together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sensitivity.functional._arguments import _arg, _pair

#: A shortcut builder: from a call's ``args`` and ``kwargs``, and whether a tensor is the measured input (or a
#: reshaping of it), the call's result with a cheaper backward, or ``None`` where the shortcut does not apply.
_Shortcut = Callable[[tuple[Any, ...], dict[str, Any], Callable[[Any], bool]], "Tensor | None"]


class _ScaledBackward(torch.autograd.Function):
    r"""An eval-mode ``F.batch_norm(x, running_mean, running_var, weight, bias)``, with the gradient
    ``grad * scale`` to ``x`` and none to the others.

    In eval mode a batch norm is the affine map :math:`y = s \odot x + t`, per channel, with
    :math:`s = w / \sqrt{\sigma^2 + \epsilon}`; its vector-Jacobian product is :math:`s \odot v`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        scale: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None, None, None, None, None


def _eval_batch_norm(
    args: tuple[Any, ...], kwargs: dict[str, Any], measured: Callable[[Any], bool]
) -> Tensor | None:
    """``F.batch_norm(*args, **kwargs)`` through :class:`_ScaledBackward` when it normalizes a CPU tensor with
    running statistics (eval mode) that are not computed in the graph; ``None`` for any other call (batch statistics
    couple the points)."""
    x, mean, var, weight, bias = (
        _arg(args, kwargs, i, name, None)
        for i, name in enumerate(("input", "running_mean", "running_var", "weight", "bias"))
    )
    if _arg(args, kwargs, 5, "training", False) or not isinstance(x, Tensor) or mean is None or var is None:
        return None
    if x.device.type != "cpu" or x.ndim < 2 or _computed(mean, var, weight, bias):
        return None
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    with torch.no_grad():
        scale = torch.rsqrt(var.to(x.dtype) + eps)
        if weight is not None:
            scale = scale * weight.to(x.dtype)
        scale = scale.view(1, -1, *[1] * (x.ndim - 2))
    return _ScaledBackward.apply(x, scale, mean, var, weight, bias, eps)


class _FoldedBackward(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, dilation)``, with the gradient to ``x`` only, computed as
    ``fold(weight^T @ grad)``: the transposed convolution written as a matrix product and a col2im."""

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, stride, padding, dilation = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[-2:]), stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        size, stride, padding, dilation = ctx.geometry
        out_channels, in_channels, kh, kw = weight.shape
        columns = torch.matmul(weight.reshape(out_channels, in_channels * kh * kw).T, grad.flatten(-2))
        x_grad = F.fold(columns, size, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return x_grad, None, None, None, None, None


def _input_conv2d(
    args: tuple[Any, ...], kwargs: dict[str, Any], measured: Callable[[Any], bool]
) -> Tensor | None:
    """``F.conv2d(*args, **kwargs)`` through :class:`_FoldedBackward`, for a convolution of the measured input
    itself, batched, on the CPU, in one group with integer geometry (``padding="same"`` and the like keep the
    operator's own backward), a kernel not computed in the graph, and one input channel or windows that do not
    overlap (stride at least the dilated kernel's extent, as in a patch embedding); ``None`` for any other call.

    Where the fold was measured (``docs/benchmarks.md``, 2 threads, ``jacobian_norm`` of a convolution and a linear
    head, 32 points), it took 0.7 to 0.93 times the transposed convolution's time into one channel and 0.37 to 0.74
    times over non-overlapping patches (0.37 for a 16 x 16 patch embedding of 224 x 224 images), but 1.04 to 2.3
    times for 3 x 3 and 5 x 5 convolutions of 2 or 3 channels at stride 1 (2.9 times for 8 channels), and 1.2 times
    for resnet18's 7 x 7 stem."""
    x, weight, bias = (_arg(args, kwargs, i, name, None) for i, name in enumerate(("input", "weight", "bias")))
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.ndim != 4 or x.device.type != "cpu":
        return None
    if not measured(x):
        return None
    stride, padding, dilation = (
        _pair(_arg(args, kwargs, i, name, default))
        for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))
    )
    if _arg(args, kwargs, 6, "groups", 1) != 1 or stride is None or padding is None or dilation is None:
        return None
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[-2:], strict=True)]
    if weight.shape[1] != 1 and any(s < e for s, e in zip(stride, extent, strict=True)):
        return None  # several channels under overlapping windows: the transposed convolution is faster
    if _computed(weight, bias):
        return None
    return _FoldedBackward.apply(x, weight, bias, stride, padding, dilation)


#: The shortcuts, by the torch function whose call they take over.
_SHORTCUTS: dict[Callable[..., Any], _Shortcut] = {
    F.batch_norm: _eval_batch_norm,
    F.conv2d: _input_conv2d,
}


def _through_shortcut(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], measured: Callable[[Any], bool]
) -> Tensor | None:
    """The result of ``func(*args, **kwargs)`` through its shortcut, or ``None`` where ``func`` has none or it does
    not apply here; the caller then runs the call as it is. ``measured`` says whether a tensor is the measured
    input."""
    build = _SHORTCUTS.get(func)
    if build is None or not torch.is_grad_enabled() or _saved_tensors_hooked():
        return None
    return build(args, kwargs, measured)


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (``torch.autograd.graph.saved_tensors_hooks``: activation
    checkpointing with ``use_reentrant=False``, off-loading to the CPU): they act on the tensors the operations
    save, which a shortcut changes. Where torch does not say, they are assumed active."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _computed(*values: Any) -> bool:
    """Whether one of ``values`` is itself computed in the graph (has a ``grad_fn``), so that it may depend on the
    input: the shortcuts give no gradient through it, and are not taken (parameters and buffers are leaves)."""
    return any(isinstance(value, Tensor) and value.grad_fn is not None for value in values)
