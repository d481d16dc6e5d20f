"""How the arguments of an intercepted torch-function call are read.

A :class:`~torch.overrides.TorchFunctionMode` receives a call as the function and its ``args`` and ``kwargs`` as
the caller wrote them: ``F.batch_norm(x, mean, var, training=False)`` and ``F.batch_norm(x, mean, var, None, None,
False)`` are the same call. Both the unit catalogue (:mod:`~lightning_sensitivity.functional.units`) and the
Jacobian's backward shortcuts (:mod:`~lightning_sensitivity.functional._backwards`) read calls this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, key: str, default: Any) -> Any:
    """The argument at position ``index`` (or keyword ``key``) of a call, else ``default``."""
    return args[index] if len(args) > index else kwargs.get(key, default)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """A size argument (``kernel_size=2`` or ``(2, 3)``) as a tuple, an integer repeated ``n`` times."""
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def _pair(value: Any) -> tuple[int, int] | None:
    """A 2-d size argument as a pair of integers, or ``None`` for anything else (``padding="same"``, a tensor)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None
