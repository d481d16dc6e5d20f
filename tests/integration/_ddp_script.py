"""Train digits with every monitor attached under a DDP strategy on two CPU processes (gloo).

    PYTHONPATH=. python tests/integration/_ddp_script.py --strategy ddp --out /tmp/run

The rank-zero-only paths run too: TensorBoard scalars, histograms, the transitions figure and the dashboard
layout. At the end of ``fit`` every rank writes ``{out}/rank{r}.pt`` (its monitors' ``state_dict``), and rank 0
``{out}/metrics.json`` (``trainer.callback_metrics``) and ``{out}/weights.pt`` (the trained weights). Then
``trainer.validate`` runs on those weights, and rank 0 writes its ``callback_metrics`` to ``{out}/validate.json``.
``test_ddp.py`` compares them with one process measuring the same weights, trajectories and subsets.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from examples.digits import DigitsDataModule, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

#: Digits has 539 validation points (odd: the validation sampler pads the second rank's share with a repeat).
JACOBIAN_MAX_POINTS = 301
GAP_MAX_TRAIN_POINTS = 101


def monitors(without: Sequence[str] = ()) -> list[Callback]:
    """The monitors under test, configured the same way in the DDP run and in the one-process reference; those
    whose class is named in ``without`` are left out."""
    every = [
        JacobianNormMonitor(max_points=JACOBIAN_MAX_POINTS),
        JacobianNormMonitor(max_points=None, prefix="all_points", record_epochs=None),
        TransitionMonitor(num_trajectories=2, num_points=64, every_n_epochs=1),
        GeneralizationGapMonitor(max_train_points=GAP_MAX_TRAIN_POINTS, seed=5),
    ]
    return [m for m in every if type(m).__name__ not in without]


class _Dump(Callback):
    """Writes each rank's monitor states, and rank 0's metrics and weights, at the end of ``fit``."""

    def __init__(self, out: str, watched: Sequence[Callback]) -> None:
        self.out, self.watched = out, watched

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states = {type(m).__name__ + "/" + m.state_key: m.state_dict() for m in self.watched}
        torch.save(states, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))
        if trainer.global_rank == 0:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            with open(os.path.join(self.out, "metrics.json"), "w") as handle:
                json.dump(metrics, handle, indent=1)
            torch.save(pl_module.state_dict(), os.path.join(self.out, "weights.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["ddp", "ddp_spawn"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--without", nargs="*", default=[], help="class names of monitors to leave out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    watched = monitors(args.without)
    trainer, model = train(
        [*watched, _Dump(args.out, watched)],
        max_epochs=args.max_epochs,
        datamodule=DigitsDataModule(),
        strategy=args.strategy,
        devices=2,
        default_root_dir=args.out,
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        limit_train_batches=4,
    )
    # `trainer.validate` measures under `torch.inference_mode()`, and writes its per-point records at once.
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    if trainer.global_rank == 0:
        with open(os.path.join(args.out, "validate.json"), "w") as handle:
            json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, handle, indent=1)


if __name__ == "__main__":
    main()
