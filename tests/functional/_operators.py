"""What the Jacobian tests observe of the work ``jacobian_norm`` does: the ATen operators it runs, and from their
output shapes the rows its backward passes pull back to the input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_sensitivity.functional import jacobian_norm


class OperatorRecorder(TorchDispatchMode):
    """Records every ATen operator run inside it: its name (``names``) and the shapes of the tensors it returns
    (``shapes``, one list per operator)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.shapes: list[list[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        self.names.append(func.__name__)
        self.shapes.append([tuple(t.shape) for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)])
        return result


def rows_pulled_back_to_the_input(model: Callable[..., Any], x: torch.Tensor, **kwargs: Any) -> int:
    """Runs ``jacobian_norm(model, x, **kwargs)`` and returns the most rows of a gradient at the input that one
    operator produced: 0 when the products stop before the input (at the output of its first linear layer), else
    the rows of one batched backward pass (``C - 1`` for the softmax, ``C`` for the logits, ``H`` when they stop
    at the ``H`` features of a last linear layer).

    A gradient at the input is a tensor that ends in the input's point shape and holds more than one batch of
    points (``[rows, B, *point]``, or the same with rows and points folded together); the forward pass's own
    tensors at the input hold one batch."""
    with OperatorRecorder() as recorder:
        jacobian_norm(model, x, **kwargs)
    point = tuple(x.shape[1:])
    return max(
        (
            math.prod(shape) // x.numel()
            for shapes in recorder.shapes
            for shape in shapes
            if len(shape) > len(point) and shape[len(shape) - len(point) :] == point and math.prod(shape) > x.numel()
        ),
        default=0,
    )
