"""The batch reader: where a monitor finds the model input and the labels in a batch, the class labels its per-point
records take, and how a batch it reads itself reaches the module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sensitivity.callbacks._checks import _check_callable

GetInput = Callable[[Any], Tensor]


class _BatchReader:
    """Reads a monitor's batches: the input at ``input_key`` (a dict key, default ``"x"``, or a tuple position,
    default 0) or ``get_input(batch)``, the labels at ``target_key`` (default ``"y"`` or 1) or ``get_target(batch)``.

    Its arguments are checked at construction (``ValueError`` naming the argument): each ``*_key`` first, then each
    ``get_*``.

    >>> reader = _BatchReader(input_key="image")
    >>> batch = {"image": torch.zeros(2, 3), "y": torch.tensor([0, 1])}
    >>> reader.input(batch).shape, reader.target(batch).tolist()
    (torch.Size([2, 3]), [0, 1])
    """

    def __init__(
        self,
        input_key: str | int | None = None,
        get_input: GetInput | None = None,
        target_key: str | int | None = None,
        get_target: GetInput | None = None,
    ) -> None:
        _check_key("input_key", input_key)
        _check_key("target_key", target_key)
        _check_callable("get_input", get_input)
        _check_callable("get_target", get_target)
        self.input_key, self.get_input = input_key, get_input
        self.target_key, self.get_target = target_key, get_target

    def input(self, batch: Any) -> Tensor:
        """The model input held by a batch: a tensor, the first item of an ``(x, y, ...)`` tuple/list, or
        ``batch[input_key]`` of a dict; ``get_input(batch)`` overrides all of these. Every error says what to pass
        instead (``input_key``, ``get_input``, ``forward_fn``)."""
        if self.get_input is not None:
            x = self.get_input(batch)
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"`get_input` returned a {type(x).__name__}, not a tensor: it must return the one tensor the "
                    f"model is measured at (the Jacobian is taken with respect to it). {_MORE_THAN_ONE_TENSOR}"
                )
            return x
        if isinstance(batch, Tensor):
            x = batch
        elif isinstance(batch, Mapping):
            x = _lookup(batch, "x" if self.input_key is None else self.input_key, "input")
        elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
            x = _position(batch, 0 if self.input_key is None else self.input_key, "input")
        else:
            raise TypeError(
                f"Cannot find the model input in a batch of type {type(batch).__name__}. Pass "
                "`get_input=lambda batch: ...` to the monitor (and `forward_fn=lambda module, x: ...` if the module "
                "is not called on that tensor alone)."
            )
        if not isinstance(x, Tensor):
            raise TypeError(
                f"The model input taken from the batch is a {type(x).__name__}, not a tensor: the monitors measure "
                "the model at one input tensor. Pass `get_input=lambda batch: ...` that returns it (for batches "
                f"`((image, extra), y)`: `get_input=lambda batch: batch[0][0]`), or `input_key=` where it is in the "
                f"batch. {_MORE_THAN_ONE_TENSOR}"
            )
        return x

    def target(self, batch: Any) -> Tensor:
        """The labels held by a batch: the second item of an ``(x, y, ...)`` tuple/list, or ``batch[target_key]``
        of a dict; ``get_target(batch)`` overrides both."""
        if self.get_target is not None:
            return self.get_target(batch)
        if isinstance(batch, Mapping):
            return _lookup(batch, "y" if self.target_key is None else self.target_key, "target")
        sequence = isinstance(batch, Sequence) and not isinstance(batch, str)
        if sequence and (len(batch) > 1 or self.target_key is not None):
            return _position(batch, 1 if self.target_key is None else self.target_key, "target")
        raise TypeError(
            f"Cannot find the labels in a batch of type {type(batch).__name__}. Pass "
            "`get_target=lambda batch: ...` to the monitor (or `target_key=` where they are in the batch)."
        )

    def labels(self, batch: Any) -> Any:
        """What a batch holds as its labels, as it is, or ``None`` when it holds none: labels are optional where
        this is asked (per-point records), so a batch without them is not an error. A ``get_target`` is the user's
        own function: its errors are the user's to see."""
        if self.get_target is not None:
            return self.get_target(batch)
        try:
            return self.target(batch)
        except (KeyError, TypeError, IndexError):
            return None

    def class_labels(self, batch: Any, shape: torch.Size, num_logits: int) -> Tensor | None:
        """The class labels ``[B]`` of a batch of ``shape`` points (:func:`_class_labels`), or ``None``."""
        return _class_labels(self.labels(batch), shape, num_logits)

    @staticmethod
    def load(trainer: pl.Trainer, batch: Any, dataloader_idx: int = 0) -> Any:
        """A batch the monitor reads itself, brought to the module as Lightning's loops bring theirs: the precision
        plugin's input conversion, the module's batch-transfer hooks, the strategy's device."""
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


#: The way out for a model that takes more than the tensor it is measured at, said by every error about the input.
_MORE_THAN_ONE_TENSOR = (
    "If the module takes more than that tensor, pass `forward_fn=lambda module, x: ...` that calls it; to keep each "
    "point's other inputs with it, pack them into the tensor `get_input` returns (`torch.cat` of the flattened parts) "
    "and unpack them in `forward_fn` (the docs' callbacks page, 'Inputs that are not one tensor')."
)


def _position(batch: Sequence, key: Any, role: str) -> Any:
    """``batch[key]`` of a tuple or list, or an ``IndexError`` that names the argument to pass (``role``: ``"input"``
    or ``"target"``)."""
    if isinstance(key, int) and not isinstance(key, bool) and -len(batch) <= key < len(batch):
        return batch[key]
    kind = type(batch).__name__
    if role == "input":
        raise IndexError(
            f"The batch is a {kind} of {len(batch)} item(s), and has no input at position {key!r}. Pass "
            "`input_key=` a position in it (or `get_input=`)."
        )
    raise IndexError(
        f"The batch is a {kind} of {len(batch)} item(s), and has no target at position {key!r}. Pass "
        "`target_key=` a position in it (or `get_target=`)."
    )


def _lookup(batch: Mapping, key: Any, role: str) -> Any:
    """``batch[key]``, or a ``KeyError`` that names the argument to pass (``role``: ``"input"`` or ``"target"``)."""
    if key in batch:
        return batch[key]
    keys = sorted(map(str, batch))
    if role == "input":
        raise KeyError(
            f"The batch is a dict with keys {keys}, and has no input key {key!r}. "
            "Pass `input_key=` (or `get_input=`, and `forward_fn=` for a module that takes more than one tensor) to "
            "the monitor."
        )
    raise KeyError(
        f"The batch is a dict with keys {keys}, and has no target key {key!r}. "
        "Pass `target_key=` (or `get_target=`) to the monitor."
    )


def _class_labels(y: Any, shape: torch.Size, num_logits: int) -> Tensor | None:
    """Labels as a batch holds them (:meth:`_BatchReader.labels`) as class labels ``[B]`` of ``shape`` points, or
    ``None``. The labels of a one-logit classifier may be ``[B, 1]`` or floating point, as BCE takes them."""
    if isinstance(y, Tensor) and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if isinstance(y, Tensor) and torch.is_floating_point(y) and num_logits == 1:
        y = y.round().long()
    if not isinstance(y, Tensor) or y.shape != shape or torch.is_floating_point(y):
        return None
    return y


def _check_key(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise ValueError(f"`{name}` must be a dict key (str), a tuple position (int) or None, got {value!r}.")
