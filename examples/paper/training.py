"""How a model of the sweep trains: its network, the labels it learns, and the loop with its stopping rule.

A model trains (plain PyTorch on tensors: these networks are so small that a Lightning Trainer per model would
cost more than the training) until it classifies its own training set, with its random labels if any, perfectly
in eval mode (the fit criterion, checked after every epoch with the same measurement as the table's training
accuracy), or until its epoch budget: ``max_epochs`` for mini-batches, ten times as many for full-batch training
(``examples.paper.grid.FULL_BATCH_EPOCH_FACTOR``), which takes one step per epoch. A model whose loss or weights
become NaN or infinite stops at once and is recorded as diverged, with the epoch: it is never measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.digits import ACTIVATIONS
from examples.paper.grid import ModelConfig
from examples.paper.measures import loss_and_accuracy

#: The standard deviation of the Gaussian noise added to every training input (pixels are in [0, 1]). In trials
#: on the F3 bases, 0.1 raised held-out accuracy in only 5 of 12 pairs, 0.2 in 7 of 9, 0.3 in 7 of 8 (one tie):
#: the augmentation must help generalization here for its pairs to test the paper's claim.
NOISE_STD = 0.3


def build_network(config: ModelConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """The untrained network of ``config``: flatten, ``depth`` hidden layers, logits. The seed sets the initial
    weights, so models that differ only in activation, labels, augmentation or batch size start alike."""
    torch.manual_seed(config.seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(config.depth):
        layers += [nn.Linear(width, config.width), ACTIVATIONS[config.activation]()]
        width = config.width
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def training_labels(y: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """The labels a model learns: a seeded ``fraction`` of them replaced by uniformly random classes."""
    if fraction <= 0:
        return y
    generator = torch.Generator().manual_seed(seed + 1)
    flip = torch.rand(len(y), generator=generator) < fraction
    return torch.where(flip, torch.randint(0, num_classes, y.shape, generator=generator), y)


@dataclass(frozen=True)
class FitResult:
    """How a model's training ended.

    Args:
        epochs: the epochs trained (the diverging one included).
        accuracy: the final training accuracy in eval mode (NaN for a diverged model).
        diverged_epoch: the epoch in which the training loss or a weight became NaN or infinite, else ``None``.
    """

    epochs: int
    accuracy: float
    diverged_epoch: int | None = None

    @property
    def diverged(self) -> bool:
        """Whether training stopped on a non-finite loss or weight."""
        return self.diverged_epoch is not None


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: ModelConfig,
    writer: Any = None,
    penalty: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> FitResult:
    """Train ``model`` on ``(x, y)`` until it classifies all of them in eval mode, ``config.max_epochs`` pass, or
    its loss or weights become NaN or infinite (checked at every step and after every epoch). Batch order and
    noise come from a generator seeded by ``config.seed``. ``penalty(model, inputs)``, when given, is added to each
    batch's loss (the causal experiment's regularizers, ``examples.paper.causal``).

    Example:
        >>> from examples.paper.grid import ModelConfig
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> config = ModelConfig(8, 1, "relu", "sgd", 1e12, 16, "none", 0.0, 0, 5)
        >>> result = fit(build_network(config, 4, 3), x, y, config)
        >>> result.diverged, result.epochs == result.diverged_epoch
        (True, True)
    """
    generator = torch.Generator().manual_seed(config.seed + 2)
    if config.optimizer == "adam":
        # The fused kernel: one call per parameter tensor, which matters for networks this small.
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    batch = config.batch_size or len(x)
    accuracy = 0.0
    epoch = 0
    while epoch < config.max_epochs and accuracy < 1.0:
        inputs = x + NOISE_STD * torch.randn(x.shape, generator=generator) if config.augment == "noise" else x
        order = torch.randperm(len(x), generator=generator)
        model.train()
        total = 0.0
        epoch += 1
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(inputs[index]), y[index])
            if penalty is not None:
                loss = loss + penalty(model, inputs[index])
            value = loss.item()
            if not math.isfinite(value):
                return FitResult(epoch, math.nan, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * len(index)
        # A step can make a weight infinite while the loss before it was finite.
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return FitResult(epoch, math.nan, epoch)
        _, accuracy = loss_and_accuracy(model, x, y)
        if writer is not None:
            writer.add_scalar("train_loss_epoch", total / len(x), epoch)
            writer.add_scalar("train_accuracy_eval", accuracy, epoch)
    return FitResult(epoch, accuracy)
