"""The monitors' own random generator: draws that never touch the global random streams of training, carried in
the callback's state and across ``ddp_spawn``."""

from __future__ import annotations

from typing import Any

import torch


def _new_generator(seed: int) -> torch.Generator:
    """The package's own CPU generator: random draws never touch the global RNG streams of training."""
    return torch.Generator().manual_seed(seed)


class _OwnGenerator:
    """Mixin for a monitor that draws with its own ``torch.Generator`` (its ``_generator`` attribute): the
    generator's state goes into the callback's ``state_dict`` (a resumed run continues its stream), and the
    monitor pickles for ``ddp_spawn``.

    ``ddp_spawn`` pickles the callbacks for its processes. A ``torch.Generator`` pickles its state as a temporary
    tensor that ``torch.multiprocessing`` shares through a file descriptor, closed before the process starts
    ("bad value(s) in fds_to_keep"); the state travels as bytes instead.
    """

    _generator: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator_state": self._generator.get_state()}  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._generator.set_state(state_dict["generator_state"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = bytes(self._generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update(state, _generator=generator)
