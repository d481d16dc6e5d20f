"""Private helpers shared by the functional measurements: how a model is run for a measurement (its eager form,
eval mode, autograd, no autocast) and input checks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

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
        keywords = {k: _eager_original(v) if isinstance(v, nn.Module) else v for k, v in model.keywords.items()}
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
def _measuring(model: Model, device: torch.device, *, grad: bool = False) -> Iterator[Model]:
    """How every measurement runs the model; yields the callable to measure.

    Its eager form (:func:`_eager`: compiled modules are run through their originals); its modules
    (:func:`_held_modules`) in eval mode, each submodule's mode restored afterwards; ``autocast`` off on
    ``device`` (half precision would change Jacobians and activation codes); and autograd on (``grad=True``, for a
    Jacobian, even under ``no_grad`` or ``inference_mode``) or off."""
    autograd = _grad_enabled() if grad else torch.no_grad()
    with _eager(model) as eager, contextlib.ExitStack() as modes:
        for module in _held_modules(eager):
            modes.enter_context(_eval_mode(module))
        with autograd, torch.autocast(device.type, enabled=False):
            yield eager


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
