"""The checks every monitor makes of its arguments (at construction, ``ValueError`` naming the argument, as
Lightning's callbacks do) and of its first batch (the input's dtype, the model's output)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sensitivity.functional import class_logits


def _check_positive(name: str, value: Any, *, optional: bool = False) -> None:
    """``ValueError`` unless ``value`` is a positive integer (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        if optional:
            raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_watch_size(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a watch set's size: an integer >= 0, or ``None`` (0 and ``None``: no watch)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"`{name}` must be an integer >= 0 (0 or None: no watch set), got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices`` (``True`` is not ``1`` here)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"`{name}` must be a callable or None, got a {type(value).__name__}.")


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`seed` must be an integer, got {value!r}.")


def _check_continuous_input(monitor: str, x: Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{monitor} needs continuous inputs, but the input taken from the batch has dtype {x.dtype}. For "
            "integer inputs such as token ids, measure at the embeddings: `forward_fn=lambda module, x: "
            "module.classifier(x)` and `get_input=lambda batch: module.embedding(batch[0])`."
        )


def _check_classifier_output(monitor: str, out: Any, batch_size: int) -> None:
    """The first batch's output must be a classifier's logits ``[B, C]`` (``[B, 1]`` for a binary one)."""
    try:
        class_logits(out, batch_size)
    except ValueError as error:
        raise ValueError(
            f"{error} {monitor} measures `pl_module(x)`; if the module returns something else (a dict, a loss, "
            "several heads), pass `forward_fn=lambda module, x: <logits [B, C]>`."
        ) from None
