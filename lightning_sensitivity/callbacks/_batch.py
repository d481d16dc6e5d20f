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
        ``batch[input_key]`` of a dict; ``get_input(batch)`` overrides all of these."""
        if self.get_input is not None:
            x = self.get_input(batch)
        elif isinstance(batch, Tensor):
            x = batch
        elif isinstance(batch, Mapping):
            x = _lookup(batch, "x" if self.input_key is None else self.input_key, "input")
        elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
            x = batch[0 if self.input_key is None else self.input_key]
        else:
            raise TypeError(
                f"Cannot find the model input in a batch of type {type(batch).__name__}. Pass "
                "`get_input=lambda batch: ...` to the monitor."
            )
        if not isinstance(x, Tensor):
            raise TypeError(f"The model input taken from the batch is a {type(x).__name__}, not a tensor.")
        return x

    def target(self, batch: Any) -> Tensor:
        """The labels held by a batch: the second item of an ``(x, y, ...)`` tuple/list, or ``batch[target_key]``
        of a dict; ``get_target(batch)`` overrides both."""
        if self.get_target is not None:
            return self.get_target(batch)
        if isinstance(batch, Mapping):
            return _lookup(batch, "y" if self.target_key is None else self.target_key, "target")
        if isinstance(batch, Sequence) and len(batch) > 1:
            return batch[1 if self.target_key is None else self.target_key]
        raise TypeError(
            f"Cannot find the labels in a batch of type {type(batch).__name__}. Pass "
            "`get_target=lambda batch: ...` to the monitor."
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


def _lookup(batch: Mapping, key: Any, role: str) -> Any:
    """``batch[key]``, or a ``KeyError`` that names the argument to pass (``role``: ``"input"`` or ``"target"``)."""
    if key in batch:
        return batch[key]
    keys = sorted(map(str, batch))
    if role == "input":
        raise KeyError(
            f"The batch is a dict with keys {keys}, and has no input key {key!r}. "
            "Pass `input_key=` (or `get_input=`) to the monitor."
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
