"""A ``torch.compile`` backend for tests: it runs the captured graph eagerly and counts the compilations and calls."""

from __future__ import annotations

import torch


class GraphCalls:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts the times it was compiled and
    ran."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)

        return run
