"""The checks every monitor makes of its arguments (at construction, ``ValueError`` naming the argument, as
Lightning's callbacks do), of the trainer's strategy (in ``setup``) and of its first batch (the input's dtype, the
model's output and how it is read)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
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


def _check_strategy(monitor: str, strategy: Strategy) -> None:
    """Fail in ``setup`` under a strategy whose processes hold shards of the parameters (FSDP, model parallelism,
    DeepSpeed ZeRO stage 3): every measurement calls the ``LightningModule`` itself, outside the wrapper's forward
    that gathers them, so it would run on shards. DDP and DeepSpeed stages 1 and 2 keep whole parameters on every
    process."""
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        sharded = type(strategy).__name__
    elif isinstance(strategy, DeepSpeedStrategy) and _zero_stage(strategy) == 3:
        sharded = "DeepSpeedStrategy (ZeRO stage 3)"
    else:
        return
    raise MisconfigurationException(
        f"{monitor} cannot measure under {sharded}: it shards the parameters across processes, and the measurement "
        "calls the LightningModule itself, outside the wrapper's forward pass that gathers them. Train with "
        "`strategy='ddp'` (or DeepSpeed stage 1 or 2) to measure during training, or measure the trained model "
        "afterwards on one device: `Trainer(devices=1, callbacks=[...]).validate(model, ...)`, or "
        "`lightning_sensitivity.functional` on the gathered weights."
    )


def _zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a ``DeepSpeedStrategy``'s configuration (read without DeepSpeed installed)."""
    config = getattr(strategy, "config", None) or {}
    return (config.get("zero_optimization") or {}).get("stage")


def _check_continuous_input(monitor: str, x: Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{monitor} needs continuous inputs, but the input taken from the batch has dtype {x.dtype}. For "
            "integer inputs such as token ids, measure at the embeddings: `forward_fn=lambda module, x: "
            "module.classifier(x)` and `get_input=lambda batch: module.embedding(batch[0])`."
        )


#: How far from 1 a row of the first batch's output may sum and still be read as probabilities (float32 sums of up to
#: thousands of entries are within 1e-4 of it; logits that happen to be non-negative and sum to 1 within this, in every
#: row of several points, are not met in practice).
_SUMS_TO_ONE = 1e-3


def _are_probabilities(out: Tensor) -> bool:
    """Whether a classifier's output ``[B, C]`` (``C >= 2``) holds probabilities: non-negative rows summing to 1."""
    if out.ndim != 2 or out.shape[1] < 2 or out.shape[0] == 0 or not torch.is_floating_point(out):
        return False
    out = out.detach().double()
    return bool((out >= 0).all() and ((out.sum(dim=1) - 1).abs() <= _SUMS_TO_ONE).all())


def _check_output_reading(monitor: str, out: Tensor, output: str) -> None:
    """The first batch's output is read as what it is: probabilities only with ``output="probabilities"`` (the
    default would take their softmax, a second one, and their cross-entropy), and ``output="probabilities"`` only for
    probabilities (rows of ``[B, C]`` non-negative and summing to 1; one column within ``[0, 1]``). Log-probabilities
    need nothing: their softmax is the probabilities."""
    rows = out.shape[0]
    if output != "probabilities" and _are_probabilities(out):
        raise ValueError(
            f"{monitor}: the model's output looks like probabilities (its {rows} row(s) on the first batch are "
            "non-negative and sum to 1), and the monitor would read them as logits, taking a second softmax (a far "
            "smaller Jacobian norm, and the cross-entropy of the probabilities instead of their negative "
            f"log-likelihood). Pass `{monitor}(output='probabilities')` to measure them as probabilities, or return "
            "logits or log-probabilities (`log_softmax`) from the module or from `forward_fn`."
        )
    if output == "probabilities":
        detached = out.detach().double()
        valid = (
            bool(((detached >= 0) & (detached <= 1)).all())
            if out.shape[1] == 1
            else _are_probabilities(out)
        )
        if not valid:
            raise ValueError(
                f"{monitor}(output='probabilities') reads the model's output as the classes' probabilities, but its "
                f"{rows} row(s) on the first batch are not (an entry is negative, or above 1, or a row does not sum "
                "to 1). For a model that returns logits or log-probabilities, leave `output` at its default."
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
