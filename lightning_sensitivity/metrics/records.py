r"""``PointRecords``: one row per measured point (its position, label, prediction, loss and Jacobian norm), the data
of finding F4 (at individual test points the Jacobian norm predicts the loss), as a torchmetrics ``Metric``.

The columns are ``cat`` states: DDP ranks, which may hold different numbers of points, combine into the rows of one
process, sorted by position.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_sensitivity.functional import class_logits

__all__ = ["PointRecords"]

_COLUMNS = ("index", "label", "prediction", "loss", "jacobian_norm")


def _point_records_update(
    index: Tensor, norms: Tensor, logits: Tensor, target: Tensor | None
) -> dict[str, Tensor]:
    """The rows of a batch: the prediction and the cross-entropy loss come from the logits (one-logit classifiers
    read as the logits ``(0, z)``). Without labels, the label is -1 and the loss NaN."""
    labels = target if target is not None else index
    if not (
        index.ndim == norms.ndim == labels.ndim == 1
        and logits.ndim == 2
        and len(index) == len(norms) == len(labels) == len(logits)
    ):
        raise ValueError(
            "`PointRecords.update` expects positions, norms and labels of shape [B], and logits [B, C]; got "
            f"{tuple(index.shape)}, {tuple(norms.shape)}, {tuple(labels.shape)} and {tuple(logits.shape)}."
        )
    classes = class_logits(logits).float()
    if target is None:
        label = torch.full((len(index),), -1, device=classes.device)
        loss = torch.full((len(index),), float("nan"), device=classes.device)
    else:
        label = target.to(classes.device).long()
        loss = F.cross_entropy(classes, label, reduction="none")
    rows = {
        "index": index,
        "label": label,
        "prediction": classes.argmax(dim=1),
        "loss": loss,
        "jacobian_norm": norms,
    }
    return {name: value.detach().float() for name, value in rows.items()}


def _point_records_compute(columns: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rows sorted by position."""
    order = columns["index"].argsort()
    return {name: value[order] for name, value in columns.items()}


class PointRecords(Metric):
    r"""Per-point rows of a measurement: ``index`` (the point's position in the evaluation order), ``label``,
    ``prediction``, ``loss`` (cross-entropy) and ``jacobian_norm``.

    ``update(index, norms, logits, target)`` takes the positions ``[B]``, the Jacobian norms ``[B]``, the logits
    ``[B, C]`` (or ``[B, 1]``) and the labels ``[B]`` of a batch; ``target=None`` (points without labels, as at
    prediction time) records the label as -1 and the loss as NaN. ``compute()`` returns the columns as float
    tensors, sorted by ``index`` and gathered from every process.

    The inputs are detached in ``update``: the rows carry no graph (``is_differentiable = False``). The class is
    scriptable with ``torch.jit.script`` (as torchmetrics checks its own); ``update`` runs in Python.

    Args:
        kwargs: passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``update`` gets positions, norms or labels that are not 1-D of one length.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.metrics import PointRecords
        >>> records = PointRecords()
        >>> records.update(torch.tensor([1, 0]), torch.tensor([0.5, 0.1]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]),
        ...                torch.tensor([1, 1]))
        >>> rows = records.compute()
        >>> rows["index"].tolist(), rows["prediction"].tolist(), rows["jacobian_norm"].tolist()
        ([0.0, 1.0], [0.0, 1.0], [0.10000000149011612, 0.5])
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in _COLUMNS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, norms: Tensor, logits: Tensor, target: Tensor | None = None) -> None:
        """Add the rows of one batch."""
        target = None if target is None else target.detach()
        rows = _point_records_update(index.detach(), norms.detach(), logits.detach(), target)
        for name, value in rows.items():
            getattr(self, name).append(value)

    def compute(self) -> dict[str, Tensor]:
        """The rows, sorted by position (empty columns before any update)."""
        columns = {}
        for name in _COLUMNS:
            value = getattr(self, name)
            columns[name] = dim_zero_cat(value) if isinstance(value, Tensor) or value else torch.zeros(0)
        return _point_records_compute(columns)

    def plot(
        self, val: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | None = None, ax: Any = None
    ) -> tuple[Any, Any]:
        """Scatter each point's loss against its Jacobian norm, both on log axes (finding F4: the norm predicts the
        loss). ``val``: rows as ``compute`` returns them (default ``compute()``), or a sequence of them (one series
        each, as over the epochs of a run); rows without a loss (NaN, no label) are left out. ``ax``: the matplotlib
        axes to draw in, default a new figure.

        Returns:
            The matplotlib figure (``None`` when ``ax`` is given, as torchmetrics returns it) and axes.

        Raises:
            ModuleNotFoundError: if matplotlib is not installed.

        Example:
            >>> import torch
            >>> from lightning_sensitivity.metrics import PointRecords
            >>> records = PointRecords()
            >>> records.update(torch.arange(4), torch.tensor([0.1, 0.2, 0.4, 0.8]), torch.randn(4, 3),
            ...                torch.tensor([0, 1, 2, 0]))
            >>> fig, ax = records.plot()
            >>> ax.get_xlabel()
            'Jacobian norm'
        """
        try:
            import matplotlib.pyplot as plt
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "`PointRecords.plot` needs matplotlib: `pip install matplotlib`."
            ) from error
        series = [self.compute() if val is None else val] if val is None or isinstance(val, Mapping) else list(val)
        fig, ax = plt.subplots() if ax is None else (None, ax)
        for i, rows in enumerate(series):
            norms, loss = rows["jacobian_norm"].detach().cpu(), rows["loss"].detach().cpu()
            shown = torch.isfinite(norms) & torch.isfinite(loss) & (norms > 0) & (loss > 0)
            ax.scatter(norms[shown], loss[shown], s=12, label=str(i) if len(series) > 1 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Jacobian norm")
        ax.set_ylabel("loss")
        ax.set_title(type(self).__name__)
        if len(series) > 1:
            ax.legend(title="step")
        return fig, ax
