"""Train the digits MLP against its Jacobian norm (``jacobian_penalty`` in ``training_step``) under DDP on two CPU
processes (gloo), with a ``JacobianNormMonitor`` beside it.

    PYTHONPATH=. python tests/integration/_penalty_ddp_script.py --out /tmp/run

The batches are not shuffled: rank ``r`` takes points ``r, r + 2, ...``, so that the two ranks' batch ``k`` together are
the one-process batch ``k`` at twice the size. Rank 0 writes ``{out}/weights.pt``
and ``{out}/metrics.json`` at the end of ``fit``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import JacobianNormMonitor
from lightning_sensitivity.functional import jacobian_penalty

#: Points per rank and batch (the one-process reference takes twice as many), the steps of the run, and the
#: penalty's strength (large enough that its gradient moves the weights far beyond the comparison's tolerance).
BATCH = 16
STEPS = 6
STRENGTH = 50.0


class PenalisedMLP(MLPClassifier):
    """The digits MLP with the documented one line in ``training_step``: cross-entropy plus ``strength`` times the
    exact softmax Jacobian penalty (or the projection estimator with ``method="projection"``)."""

    def __init__(self, strength: float = 0.1, method: str = "exact", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strength, self.method = strength, method

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) + self.strength * jacobian_penalty(self, x, method=self.method)


class InOrder(DigitsDataModule):
    """Digits, training batches in the data set's order; under DDP, rank ``r`` of ``n`` takes points ``r, r + n,
    ...`` (Lightning's own distributed sampler would shuffle them: it is turned off with
    ``use_distributed_sampler=False``)."""

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.x_train, self.y_train)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)
        sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class _Dump(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), os.path.join(self.out, "weights.pt"))
            with open(os.path.join(self.out, "metrics.json"), "w") as handle:
                json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)  # the initial weights of the one-process reference
    model = PenalisedMLP(strength=STRENGTH)
    train(
        [JacobianNormMonitor(max_points=64), _Dump(args.out)],
        max_epochs=1,
        model=model,
        datamodule=InOrder(batch_size=BATCH),
        strategy="ddp",
        devices=2,
        default_root_dir=args.out,
        limit_train_batches=STEPS,
        limit_val_batches=1,
        use_distributed_sampler=False,
    )


if __name__ == "__main__":
    main()
