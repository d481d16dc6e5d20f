"""When a monitor measures: its watch set at every pass that runs, its full measurement on every n-th pass and on the
last one of the fit."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl

#: What a pass measures: the full measurement (which gives the watch values too), the watch set alone, or nothing.
Measurement = Literal["full", "watch"] | None


class _Schedule:
    """The full measurement on every ``every_n``-th pass that runs (validation passes, or training epochs for a
    monitor that measures on training data; ``None``: none but the last) and on the last one of the fit; the watch
    set, when the monitor has one (``watch``), on every other pass.

    The last pass is known in advance when a limit says so (``max_epochs``, ``max_steps``, the next validation
    epoch past ``max_epochs``) or ``trainer.should_stop`` is already set. When the fit ends otherwise (early
    stopping decided after the pass, ``max_time``), :attr:`owes_last` tells the monitor to make the full
    measurement at the end of training, on the final weights.
    """

    def __init__(self, every_n: int | None, watch: bool) -> None:
        self.every_n = every_n
        self.watch = watch
        self.passes = 0
        self.ran = False
        self.last_measured = False

    def start(self, trainer: pl.Trainer, *, validation: bool) -> Measurement:
        """A pass starts: what it measures."""
        self.passes += 1
        self.ran = True
        every = self.every_n is not None and self.passes % self.every_n == 0
        self.last_measured = every or _fit_ends_here(trainer, validation)
        if self.last_measured:
            return "full"
        return "watch" if self.watch else None

    @property
    def owes_last(self) -> bool:
        return self.ran and not self.last_measured

    def reset_fit(self) -> None:
        self.ran = self.last_measured = False


def _fit_ends_here(trainer: pl.Trainer, validation: bool) -> bool:
    """True when no pass of the same kind will follow this one in the current fit."""
    if trainer.should_stop:
        return True
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    if not validation:
        return trainer.current_epoch + 1 >= max_epochs
    if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return False  # a validation inside the epoch: more batches, and maybe more validations, follow
    return trainer.current_epoch + (trainer.check_val_every_n_epoch or 1) >= max_epochs
