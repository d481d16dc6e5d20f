r"""How every measurement of this package runs a model and reads its output.

:func:`measuring` is the context the measurements run the model in (its eager form, eval mode, autograd on or off,
no autocast), and :func:`class_logits` is how they read its output (a classifier's logits ``[B, C]``, a one-logit
binary classifier as the two classes :math:`(0, z)`); :func:`logits_from_probabilities` reads the output of a model
that returns probabilities as such logits. Both are public so that code computing something beside a
measurement (a loss, a prediction, a check of the output) sees the model exactly as the measurement does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

__all__ = ["class_logits", "logits_from_probabilities", "measuring"]

Model = TypeVar("Model", bound=Callable[..., Any])


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


def _held_modules(model: object) -> list[nn.Module]:
    """The modules whose parameters a model computes with: the model itself if it is an ``nn.Module``; else those
    that a ``functools.partial`` binds, a bound method's object, and those a closure holds."""
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, functools.partial):
        held = [*model.args, *model.keywords.values()]
    else:
        held = [getattr(model, "__self__", None)]
        for cell in getattr(model, "__closure__", None) or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                continue
    return [value for value in held if isinstance(value, nn.Module)]


def _eager_original(module: nn.Module) -> nn.Module:
    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


@contextlib.contextmanager
def _eager(model: Model) -> Iterator[Model]:
    """Yield the model with every ``torch.compile`` wrapper out of the way, restoring them afterwards.

    A compiled graph does not support the repeated and batched backward passes of a Jacobian (it raises, or gives
    wrong values when forced to), and compiling for a measurement would cost more than the measurement. The three
    forms are undone: ``torch.compile(module)`` (an ``OptimizedModule``: its eager original ``_orig_mod`` is used,
    with the same parameters), a submodule replaced by one (swapped for its original for the measurement), and
    ``module.compile()`` (which sets ``_compiled_call_impl``, cleared for the measurement). A ``functools.partial``
    over a compiled module is replaced by the same partial over its original."""
    if isinstance(model, OptimizedModule):
        model = _eager_original(model)
    elif isinstance(model, functools.partial):
        args = [_eager_original(a) if isinstance(a, nn.Module) else a for a in model.args]
        keywords = {
            k: _eager_original(v) if isinstance(v, nn.Module) else v for k, v in model.keywords.items()
        }
        model = functools.partial(model.func, *args, **keywords)
    undo: list[Callable[[], None]] = []
    try:
        visited: set[int] = set()
        stack = _held_modules(model)
        while stack:
            module = stack.pop()
            if id(module) in visited:
                continue
            visited.add(id(module))
            compiled_call = module.__dict__.get("_compiled_call_impl")
            if compiled_call is not None:
                module._compiled_call_impl = None
                undo.append(functools.partial(setattr, module, "_compiled_call_impl", compiled_call))
            for name, child in list(module._modules.items()):
                if isinstance(child, OptimizedModule):
                    module._modules[name] = _eager_original(child)
                    undo.append(functools.partial(module._modules.__setitem__, name, child))
                    child = module._modules[name]
                if child is not None:
                    stack.append(child)
        yield model
    finally:
        for step in reversed(undo):
            step()


@contextlib.contextmanager
def measuring(model: Model, device: torch.device | str, *, grad: bool = False) -> Iterator[Model]:
    """Run ``model`` as every measurement of this package runs it; yields the callable to call.

    Inside the block:

    - the model is in its eager form: ``torch.compile`` wrappers are undone (``torch.compile(module)``, a
      submodule replaced by a compiled one, ``module.compile()``), with the same parameters;
    - every module it computes with (the model itself, or the modules a ``functools.partial``, a bound method or a
      closure holds) is in eval mode, and each submodule's previous mode is restored afterwards, so a part frozen
      in eval mode on purpose stays so;
    - ``autocast`` is off on ``device`` (half precision would change Jacobians and activation codes);
    - autograd is on with ``grad=True`` (for a Jacobian, even under ``torch.no_grad()`` or
      ``torch.inference_mode()``), and off otherwise.

    Nothing else is changed on the modules for the measurement: each runs its own ``forward``, and only the modes
    and the compiled forms above are set for the block and put back after it.

    Args:
        model: an ``nn.Module`` or a callable over modules.
        device: the device the model runs on (the one whose ``autocast`` is turned off).
        grad: whether autograd is on inside the block.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_sensitivity.functional import measuring
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
        >>> with measuring(model, "cpu") as net:
        ...     logits = net(torch.ones(2, 4))
        >>> logits.requires_grad, model.training
        (False, True)
    """
    device = torch.device(device)
    autograd = _grad_enabled() if grad else torch.no_grad()
    with _eager(model) as eager, contextlib.ExitStack() as modes:
        for module in _held_modules(eager):
            modes.enter_context(_eval_mode(module))
        with autograd, torch.autocast(device.type, enabled=False):
            yield eager


def class_logits(output: object, batch_size: int | None = None) -> Tensor:
    r"""A classifier's output read as the logits of its classes, ``[B, C]``.

    The output must be a tensor ``[B, C]`` (with ``B = batch_size`` when given). A single column ``[B, 1]`` is a
    binary classifier's logit :math:`z`, read as the two classes' logits :math:`(0, z)`: their softmax is
    :math:`(1 - \sigma(z), \sigma(z))`, their argmax the sign of :math:`z`, and their cross-entropy the binary
    cross-entropy. Every measurement reads a model's output this way.

    Raises:
        ValueError: if ``output`` is not a tensor ``[B, C]``.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import class_logits
        >>> class_logits(torch.tensor([[2.0], [-1.0]]))
        tensor([[ 0.,  2.],
                [ 0., -1.]])
    """
    if not isinstance(output, Tensor):
        raise ValueError(
            f"Expected the model to return logits of shape [batch, num_classes], got a {type(output).__name__}."
        )
    if output.ndim != 2 or (batch_size is not None and output.shape[0] != batch_size):
        rows = "B" if batch_size is None else batch_size
        raise ValueError(
            f"Expected the model to return logits of shape [batch, num_classes] = [{rows}, C], got "
            f"{tuple(output.shape)}."
        )
    if output.shape[1] == 1:
        return torch.cat([torch.zeros_like(output), output], dim=1)
    return output


def logits_from_probabilities(probabilities: Tensor) -> Tensor:
    r"""Logits of the same shape that :func:`class_logits` reads as the given class probabilities.

    A model that returns probabilities (a ``forward`` that ends in ``nn.Softmax`` or ``torch.sigmoid``) has the
    logits :math:`\log p` (``[B, C]``, :math:`C \ge 2`: their softmax is :math:`p / \sum_c p_c = p`), or for one
    column, the probability :math:`p` of class 1, :math:`\operatorname{logit} p = \log p - \log(1 - p)` (read as
    :math:`(0, \operatorname{logit} p)`, whose softmax is :math:`(1 - p, p)`). Their cross-entropy is the negative
    log-likelihood of :math:`p`, and their argmax that of :math:`p`. A probability of 0 gives a logit of
    :math:`-\infty` (and an infinite loss where it is the label's, as the model's own NLL is).

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import logits_from_probabilities
        >>> p = torch.tensor([[0.5, 0.25, 0.25]])
        >>> logits_from_probabilities(p).softmax(dim=1)
        tensor([[0.5000, 0.2500, 0.2500]])
        >>> logits_from_probabilities(torch.tensor([[0.75]]))
        tensor([[1.0986]])
    """
    if probabilities.ndim == 2 and probabilities.shape[1] == 1:
        return torch.logit(probabilities)
    return torch.log(probabilities)


#: On the CPU, the most bytes that one activation of a measurement's batched pass (the model's largest, for all the
#: points or rows of the pass) should take. Larger blocks risk being mapped fresh from the operating system at every
#: allocation (glibc maps blocks above a threshold that adapts up to 32 MiB) and page-faulted in again: on the overhead
#: benchmark's CNN that was half the time of a Jacobian of 256 points in one pass, and a third of the activation codes
#: of 2,048 points in passes of 1,024.
_CPU_PASS_BYTES = 2**24


def _per_pass_on_device(most: int, bytes_per_item: int, device: torch.device) -> int:
    """How many items (points, or rows) of ``bytes_per_item`` bytes each of the largest activation a pass may hold,
    at most ``most``: ``most`` off the CPU, else as many as fit :data:`_CPU_PASS_BYTES` (at least one)."""
    if device.type != "cpu":
        return most
    return max(1, min(most, _CPU_PASS_BYTES // max(1, bytes_per_item)))


def _fresh_input(x: Tensor) -> Tensor:
    """A clone of ``x`` made with autograd enabled: an inference tensor cannot be saved for backward."""
    return x.detach().clone()


def _check_continuous(x: Tensor, name: str = "x") -> None:
    if not (torch.is_floating_point(x) or torch.is_complex(x)):
        raise TypeError(
            f"The Jacobian needs continuous inputs, but `{name}` has dtype {x.dtype}. For integer inputs such as "
            "token ids, measure at the embeddings: pass the embedded inputs, and a model that maps them to the "
            "logits (the network after its embedding layer)."
        )
