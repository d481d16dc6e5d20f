"""Interleaved timing shared by the benchmark scripts."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any


def timed(
    fns: dict[str, Callable[[], Any]], repeats: int, shuffle_seed: int | None = None
) -> dict[str, list[float]]:
    """Seconds of each function per repeat, calls interleaved round-robin (after one warm-up call each), so that
    load from other processes affects every side alike.

    With ``shuffle_seed``, every round runs the functions in a new random order, so that no function always runs
    right after the same other one (a heavy run can leave the allocator and caches slower for the next)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(shuffle_seed) if shuffle_seed is not None else None
    for _ in range(repeats):
        if shuffle is not None:
            shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return samples
