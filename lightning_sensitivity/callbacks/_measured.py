"""The model as a monitor measures it: ``forward_fn(pl_module, x)`` as a module, run eager and in full precision;
the batches a monitor reads itself, brought to the module as Lightning brings its own; and the wall time of a
measurement."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_sensitivity.callbacks._utils import ForwardFn

#: Floating dtypes a measurement never runs in: their rounding would be the measurement's noise.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


class _Stopwatch:
    """The wall time of a monitor's measurement, summed over the pieces it is done in (the batches of a pass, then
    its end), read with ``time.perf_counter``. On a CUDA module each piece starts and ends with a synchronization,
    so the queued kernels are counted where they run; when the monitor logs no time, nothing is synchronized."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds = 0.0

    @contextlib.contextmanager
    def running(self, device: torch.device) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start

    def take(self, device: torch.device) -> Tensor:
        """The time so far, as a tensor on ``device``, and a fresh start."""
        seconds, self.seconds = self.seconds, 0.0
        return torch.tensor(seconds, dtype=torch.float32, device=device)


def _load_batch(trainer: pl.Trainer, batch: Any, dataloader_idx: int = 0) -> Any:
    """A batch the monitor reads itself, brought to the module as Lightning's loops bring theirs: the precision
    plugin's input conversion, the module's batch-transfer hooks, the strategy's device."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
