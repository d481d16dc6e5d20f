"""The measured model: ``forward_fn(pl_module, x)`` as a module, run eager and in full precision; the fingerprint of
the weights it was measured with; the device it is measured on at the end of ``fit``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

ForwardFn = Callable[["pl.LightningModule", Tensor], Tensor]

#: Floating dtypes a measurement never runs in: their rounding would be the measurement's noise.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _default_forward(pl_module: pl.LightningModule, x: Tensor) -> Tensor:
    return pl_module(x)


class _MeasuredModel(nn.Module):
    """``forward_fn(pl_module, x)`` as an ``nn.Module``, the one model every measurement of a monitor runs.

    Being a module, it gets the functional layer's guarantees (eval mode with every submodule's mode restored, the
    float64 copy of the exact count). Two things are added here, both without touching the module:

    - a module compiled with ``trainer.fit(torch.compile(module))`` has its ``forward`` replaced by Lightning with
      a compiled one; the measurement runs the eager original, with the same parameters (a compiled graph does not
      take the repeated and batched backward passes of a Jacobian);
    - half-precision parameters, buffers and inputs (``precision="bf16-true"`` or ``"16-true"``) are read as
      float32 copies, so the measurement is that of the same weights in float32.
    """

    def __init__(self, pl_module: pl.LightningModule, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.module = pl_module
        self.forward_fn = forward_fn

    def forward(self, x: Tensor, upcast: bool = True) -> Any:
        if upcast:
            x = _full_precision(x)
            low = {
                name: t.detach().float()
                for name, t in [*self.named_parameters(), *self.named_buffers()]
                if t.dtype in _LOW_PRECISION
            }
            if low:
                return torch.func.functional_call(self, low, (x,), {"upcast": False})
        with _eager_forward(self.module):
            return self.forward_fn(self.module, x)


def _full_precision(x: Tensor) -> Tensor:
    """A half-precision input as float32: a Jacobian is taken with respect to the input in its own dtype."""
    return x.float() if x.dtype in _LOW_PRECISION else x


@contextlib.contextmanager
def _eager_forward(pl_module: pl.LightningModule) -> Iterator[None]:
    """The module's own ``forward`` in place of the compiled one Lightning puts there for a compiled module."""
    ctx = getattr(pl_module, "_compiler_ctx", None)
    compiled = pl_module.__dict__.get("forward")
    if not ctx or compiled is None or "original_forward" not in ctx:
        yield
        return
    pl_module.forward = ctx["original_forward"]
    try:
        yield
    finally:
        pl_module.forward = compiled


def _weights_fingerprint(module: nn.Module) -> Tensor:
    """A cheap fingerprint of a module's weights: the float64 sum and Euclidean norm of each floating parameter and
    buffer, computed where they are (a read of the weights, and a few numbers back). Two fingerprints differ when a callback
    changed the weights between them (``StochasticWeightAveraging`` copying its averages in); integer buffers (a
    batch norm's count of batches) do not change what a measurement sees and are left out."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if torch.is_floating_point(t)]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        sums = [torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)]) for t in tensors]
        return torch.cat(sums).cpu()


def _same_weights(first: Tensor, second: Tensor) -> bool:
    """Whether two fingerprints are the same, NaN equal to NaN (weights that turned NaN and stayed so)."""
    return first.shape == second.shape and bool(torch.isclose(first, second, rtol=0, atol=0, equal_nan=True).all())


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """``module`` on ``device`` for the block, and back where it was afterwards (the same parameter objects, moved and
    moved back exactly): Lightning's strategies move the module to the CPU at the end of ``fit``, before
    ``on_fit_end``, where a measurement must still run as during training (on the strategy's device, whose
    collectives and data the monitors use)."""
    previous = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    if previous == device:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(previous)
