"""One harness for every metric of the package, in the spirit of torchmetrics' ``MetricTester``: the updates of
each case are split over two gloo processes (round-robin, so the processes may hold different numbers of them, or
none), each process computes, and every process's result must equal one process's result on all the updates.

All the cases run in one two-process run (starting processes is the slow part)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

WORLD_SIZE = 2


@dataclass
class Case:
    """A metric (``make()`` builds it), the updates to split, and what to read from it (``reads``: name to a
    picklable function of the metric). ``make`` and ``reads`` must be picklable (module-level functions)."""

    make: Callable[[], Metric]
    updates: Sequence[tuple[Any, ...]]
    reads: dict[str, Callable[[Metric], Any]]

    def run(self, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        metric = self.make()
        for update in self.updates[rank::world_size]:
            metric.update(*update)
        return {name: read(metric) for name, read in self.reads.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cases: dict[str, Case], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {name: case.run(rank, WORLD_SIZE) for name, case in cases.items()}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def distributed_results(cases: dict[str, Case]) -> list[dict[str, dict[str, Any]]]:
    """Each process's results of every case, from one run of two processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), cases, out), nprocs=WORLD_SIZE)
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD_SIZE)]


def assert_like_one_process(case: Case, results: Sequence[dict[str, Any]], **tolerances: float) -> None:
    """Every process read what one process reads on all the updates; the metric declares no full state update."""
    assert case.make().full_state_update is False
    expected = case.run()
    for rank, result in enumerate(results):
        for name in case.reads:
            torch.testing.assert_close(result[name], expected[name], **tolerances, msg=f"rank {rank}: {name}")
