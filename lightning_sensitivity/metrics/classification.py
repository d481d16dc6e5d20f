r"""``ClassificationLossAccuracy``: a classifier's mean loss and top-1 accuracy, the two sides of the generalization
gap, as a torchmetrics ``Metric``.

Over :math:`N` points with logits :math:`z_n` and labels :math:`y_n`,

.. math::

    L = \frac{1}{N} \sum_{n=1}^{N} \ell(z_n, y_n), \qquad
    A = \frac{1}{N} \sum_{n=1}^{N} [\arg\max_c z_{n,c} = y_n],

with cross-entropy :math:`\ell` by default. The states are sums, so DDP ranks combine into the one-process result.

A classifier with one logit per point (``[B, 1]``, trained with binary cross-entropy) is read as the two-class
classifier with logits :math:`(0, z)`: its probabilities are :math:`(1 - \sigma(z), \sigma(z))`, its prediction is
the sign of :math:`z`, and the cross-entropy of those logits is the binary cross-entropy. This is the same reading
as :func:`~lightning_sensitivity.functional.jacobian_norm`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_sensitivity.functional import class_logits

__all__ = ["ClassificationLossAccuracy", "LossFn"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(logits, target)``: the mean loss over the batch (as ``F.cross_entropy`` returns it) or one loss per
point."""


def _class_targets(target: Tensor, logits: Tensor) -> Tensor:
    """Labels ``[B]`` or class probabilities ``[B, C]`` for the classes of
    :func:`~lightning_sensitivity.functional.class_logits`; a one-logit classifier's float targets ``[B]`` or ``[B, 1]`` (BCE's) become the probabilities ``(1 - t, t)``."""
    if logits.ndim == 2 and logits.shape[1] == 1 and torch.is_floating_point(target):
        t = target.reshape(-1).to(logits.dtype)
        return torch.stack([1 - t, t], dim=1)
    if not torch.is_floating_point(target):
        return target.reshape(-1) if target.ndim == 2 and target.shape[1] == 1 else target
    return target


def _loss_accuracy_update(
    logits: Tensor, target: Tensor, loss_fn: LossFn | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The summed loss, the number of correct predictions (NaN when a logit is not finite: the argmax of a broken
    model is no score) and the number of points of one batch."""
    count = logits.shape[0]
    classes = class_logits(logits)
    targets = _class_targets(target, logits)
    if loss_fn is None:
        loss_sum = F.cross_entropy(classes.float(), targets, reduction="sum")
    else:
        loss = loss_fn(logits, target)
        loss_sum = loss.sum() if loss.ndim > 0 else loss * count
    labels = targets.argmax(-1) if targets.ndim == classes.ndim else targets
    correct = (classes.argmax(-1) == labels.to(classes.device)).sum().double()
    if not torch.isfinite(logits).all():
        correct = torch.full_like(correct, float("nan"))
    return loss_sum.detach().double(), correct, torch.tensor(count, device=logits.device)


def _loss_accuracy_compute(loss_sum: Tensor, correct: Tensor, count: Tensor) -> dict[str, Tensor]:
    """The mean loss and the accuracy (NaN for no point)."""
    return {"loss": (loss_sum / count).float(), "accuracy": (correct / count).float()}


class ClassificationLossAccuracy(Metric):
    r"""Mean loss and top-1 accuracy of a classifier.

    ``update(logits, target)`` takes logits ``[B, C]`` (or ``[B, 1]`` for a binary classifier) and labels ``[B]``
    (or class probabilities ``[B, C]``; float targets ``[B]`` or ``[B, 1]`` for a one-logit classifier).
    ``compute()`` returns ``{"loss": L, "accuracy": A}``; the state ``count`` is the number of points.

    Args:
        loss_fn: ``loss_fn(logits, target)`` returning the batch mean or one loss per point; default: the
            cross-entropy of the class logits (the binary cross-entropy for one logit).
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.metrics import ClassificationLossAccuracy
        >>> metric = ClassificationLossAccuracy()
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'loss': 0.7201, 'accuracy': 0.5}
        >>> binary = ClassificationLossAccuracy()
        >>> binary.update(torch.tensor([[3.0], [-1.0]]), torch.tensor([1.0, 1.0]))
        >>> float(binary.compute()["accuracy"])
        0.5
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    loss_sum: Tensor
    correct: Tensor
    count: Tensor

    def __init__(self, loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable or None, got {type(loss_fn).__name__}.")
        self.loss_fn = loss_fn
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of logits and their targets."""
        loss_sum, correct, count = _loss_accuracy_update(logits, target, self.loss_fn)
        self.loss_sum += loss_sum.to(self.loss_sum.device)
        self.correct += correct.to(self.correct.device)
        self.count += count.to(self.count.device)

    def compute(self) -> dict[str, Tensor]:
        """``{"loss": ..., "accuracy": ...}``."""
        return _loss_accuracy_compute(self.loss_sum, self.correct, self.count)
