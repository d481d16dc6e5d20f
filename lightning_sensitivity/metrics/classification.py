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
as :func:`~lightning_sensitivity.functional.jacobian_norm`'s. A model that returns probabilities is read through
:func:`~lightning_sensitivity.functional.logits_from_probabilities` (``output="probabilities"``): its loss is the
negative log-likelihood of those probabilities, never the cross-entropy of a second softmax.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_sensitivity.functional import class_logits, logits_from_probabilities

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
    logits: Tensor, target: Tensor, loss_fn: LossFn | None = None, probabilities: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """The summed loss, the number of correct predictions (NaN when a logit is not finite: the argmax of a broken
    model is no score) and the number of points of one batch. With ``probabilities``, ``logits`` is the model's
    output of class probabilities, read as the logits :func:`logits_from_probabilities` gives (``loss_fn`` still
    gets the output as it is)."""
    count = logits.shape[0]
    classes = class_logits(logits_from_probabilities(logits) if probabilities else logits)
    targets = _class_targets(target, logits)
    if loss_fn is None:
        loss_sum = F.cross_entropy(classes.float(), targets, reduction="sum")
    else:
        loss = loss_fn(logits, target)
        loss_sum = loss.sum() if loss.ndim > 0 else loss * count
    labels = targets.argmax(-1) if targets.ndim == classes.ndim else targets
    correct = (classes.argmax(-1) == labels.to(classes.device)).sum().double()
    if not torch.isfinite(logits).all():  # for probabilities, a NaN or infinite output (a zero is a -inf logit)
        correct = torch.full_like(correct, float("nan"))
    return loss_sum.detach().double(), correct, torch.tensor(count, device=logits.device)


def _loss_accuracy_compute(loss_sum: Tensor, correct: Tensor, count: Tensor) -> dict[str, Tensor]:
    """The mean loss and the accuracy (NaN for no point)."""
    return {"loss": (loss_sum / count).float(), "accuracy": (correct / count).float()}


class ClassificationLossAccuracy(Metric):
    r"""Mean loss and top-1 accuracy of a classifier.

    ``update(logits, target)`` takes logits ``[B, C]`` (or ``[B, 1]`` for a binary classifier) and labels ``[B]``
    (or class probabilities ``[B, C]``; float targets ``[B]`` or ``[B, 1]`` for a one-logit classifier).
    ``compute()`` returns ``{"loss": L, "accuracy": A}``; the state ``count`` is the number of points. The inputs are
    detached: the results carry no graph (``is_differentiable = False``).

    The class is scriptable with ``torch.jit.script`` (as torchmetrics checks its own); ``update`` runs in Python.

    Args:
        loss_fn: ``loss_fn(logits, target)`` returning the batch mean or one loss per point; default: the
            cross-entropy of the class logits (the binary cross-entropy for one logit).
        output: ``"logits"`` (or log-probabilities, whose softmax is the probabilities), or ``"probabilities"``: the
            model returns the classes' probabilities (``[B, C]``, or ``[B, 1]`` for class 1), whose default loss is
            then their negative log-likelihood (not the cross-entropy of their softmax). ``loss_fn`` gets the output
            as it is either way.
        kwargs: passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``loss_fn`` is not callable, or ``output`` is neither choice.

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
        >>> probabilities = ClassificationLossAccuracy(output="probabilities")
        >>> probabilities.update(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
        >>> round(float(probabilities.compute()["loss"]), 4)  # (-log 0.5 - log 0.75) / 2
        0.4904
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0

    loss_sum: Tensor
    correct: Tensor
    count: Tensor

    def __init__(
        self, loss_fn: LossFn | None = None, output: Literal["logits", "probabilities"] = "logits", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable or None, got {type(loss_fn).__name__}.")
        if output not in ("logits", "probabilities"):
            raise ValueError(f"`output` must be 'logits' or 'probabilities', got {output!r}.")
        self.loss_fn = loss_fn
        self.output = output
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch of logits (or probabilities) and their targets."""
        logits, target = logits.detach(), target.detach()
        loss_sum, correct, count = _loss_accuracy_update(
            logits, target, self.loss_fn, self.output == "probabilities"
        )
        self.loss_sum += loss_sum.to(self.loss_sum.device)
        self.correct += correct.to(self.correct.device)
        self.count += count.to(self.count.device)

    def compute(self) -> dict[str, Tensor]:
        """``{"loss": ..., "accuracy": ...}``."""
        return _loss_accuracy_compute(self.loss_sum, self.correct, self.count)

    def plot(
        self, val: dict[str, Tensor] | Sequence[dict[str, Tensor]] | None = None, ax: Any = None
    ) -> tuple[Any, Any]:
        """Plot the loss and the accuracy (``val``: a result of ``compute`` or ``forward``, default ``compute()``),
        or their course over a sequence of results, with matplotlib (torchmetrics' own plot; ``ax``: the matplotlib
        axes to draw in, default a new figure).

        Returns:
            The matplotlib figure and axes.

        Raises:
            ModuleNotFoundError: if matplotlib is not installed.

        Example:
            >>> import torch
            >>> from lightning_sensitivity.metrics import ClassificationLossAccuracy
            >>> metric = ClassificationLossAccuracy()
            >>> values = [metric(torch.randn(8, 3), torch.randint(0, 3, (8,))) for _ in range(4)]
            >>> fig, ax = metric.plot(values)
        """
        return self._plot(val, ax)
