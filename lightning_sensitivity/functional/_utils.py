"""Private helpers shared by the functional measurements: grad contexts, eval mode, input checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def _grad_enabled() -> Iterator[None]:
    """Undo ``torch.no_grad()`` and ``torch.inference_mode()`` for a measurement.

    Lightning validates under ``no_grad`` during ``fit`` and under ``inference_mode`` in
    ``trainer.validate``/``trainer.test``; a Jacobian needs autograd back on in both.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` (and every submodule) in eval mode, then restore each one's previous mode.

    Submodules are restored one by one: a user may have frozen a part of the model in eval mode on purpose.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _measuring(model: object, device: torch.device, *, grad: bool = False) -> Iterator[None]:
    """How every measurement runs the model: an ``nn.Module`` in eval mode (each submodule's mode restored
    afterwards), ``autocast`` off on ``device`` (half precision would change Jacobians and activation codes), and
    autograd on (``grad=True``, for a Jacobian, even under ``no_grad`` or ``inference_mode``) or off."""
    module = model if isinstance(model, nn.Module) else nn.Identity()
    autograd = _grad_enabled() if grad else torch.no_grad()
    with autograd, _eval_mode(module), torch.autocast(device.type, enabled=False):
        yield


def _fresh_input(x: Tensor) -> Tensor:
    """A clone of ``x`` made with autograd enabled: an inference tensor cannot be saved for backward."""
    return x.detach().clone()


def _check_continuous(x: Tensor, name: str = "x") -> None:
    if not (torch.is_floating_point(x) or torch.is_complex(x)):
        raise TypeError(
            f"The Jacobian needs continuous inputs, but `{name}` has dtype {x.dtype}. For integer inputs such as "
            "token ids, measure at the embeddings: pass the embedded inputs, or give the monitor "
            "`forward_fn=lambda module, x: module.classifier(x)` and `get_input=lambda batch: "
            "module.embedding(batch[0])` so that the input is a float tensor."
        )


def _check_logits(z: object, batch_size: int, hint: str = "") -> None:
    if not isinstance(z, Tensor):
        raise ValueError(
            f"Expected the model to return logits of shape [batch, num_classes], got a {type(z).__name__}.{hint}"
        )
    if z.ndim != 2 or z.shape[0] != batch_size:
        raise ValueError(
            f"Expected the model to return logits of shape [batch, num_classes] = [{batch_size}, C], got "
            f"{tuple(z.shape)}.{hint}"
        )
