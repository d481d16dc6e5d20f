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

