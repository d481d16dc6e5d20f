"""A ``MetricTester``-style harness, after torchmetrics' own: every metric of the package, given as a ``Spec`` (how to
build it, the batches of its updates, and a direct computation of what it should give), goes through the same checks
in ``test_metric_tester.py``: update then compute, forward against update, the state dict, pickling, input dtypes,
results without a graph, ``torch.jit.script``, ``plot`` and two gloo processes (``_ddp_harness.py``).

The references are computed here in float64 from the batches themselves, without the package's code."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sensitivity.metrics import (
    ClassificationLossAccuracy,
    JacobianNorm,
    PointRecords,
    TransitionDensity,
)

Batch = tuple[Any, ...]


@dataclass
class Spec:
    """A metric under test: ``make()`` builds it (a module-level function, so that it pickles into other processes),
    ``batches`` are the arguments of its updates, ``reference(batches)`` is what ``compute()`` must return after them,
    and ``floating`` the positions of the floating-point inputs (cast for the dtype check, given gradients for the
    graph check). ``rtol`` is the tolerance in float32; ``scalar_plot``: ``plot`` draws values over steps (every
    metric but ``PointRecords``, which scatters its rows)."""

    make: Callable[[], Metric]
    batches: Sequence[Batch]
    reference: Callable[[Sequence[Batch]], Any]
    floating: tuple[int, ...]
    rtol: float = 1e-6
    scalar_plot: bool = True


def assert_close(actual: Any, expected: Any, rtol: float, atol: float = 1e-7) -> None:
    """Tensors or dicts of tensors equal to the tolerance (NaN equal to NaN), compared in float64."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
        for key in expected:
            assert_close(actual[key], expected[key], rtol, atol)
        return
    torch.testing.assert_close(
        torch.as_tensor(actual).double().cpu(),
        torch.as_tensor(expected).double().cpu(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
    )


def cast(batches: Sequence[Batch], positions: tuple[int, ...], dtype: torch.dtype) -> list[Batch]:
    """The batches with their floating inputs at ``positions`` in ``dtype``."""
    return [tuple(v.to(dtype) if i in positions else v for i, v in enumerate(batch)) for batch in batches]


# --- the references ------------------------------------------------------------------------------------------------


def _cat(batches: Sequence[Batch], i: int) -> Tensor:
    return torch.cat([batch[i] for batch in batches])


def _mean_of_finite(batches: Sequence[Batch]) -> Tensor:
    values = _cat(batches, 0).double()
    values = values[torch.isfinite(values)]
    return values.mean() if len(values) else torch.tensor(float("nan"))


def _mean_density(batches: Sequence[Batch]) -> Tensor:
    transitions, lengths = _cat(batches, 0).double(), _cat(batches, 1).double()
    return (transitions / lengths).mean() if len(lengths) else torch.tensor(float("nan"))


def _log_probabilities(logits: Tensor) -> Tensor:
    """``log softmax`` in float64, written out."""
    logits = logits.double()
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _loss_and_accuracy(batches: Sequence[Batch], probabilities: bool = False) -> dict[str, Tensor]:
    outputs, labels = _cat(batches, 0).double(), _cat(batches, 1)
    log_p = outputs.log() if probabilities else _log_probabilities(outputs)
    picked = log_p[torch.arange(len(labels)), labels]
    return {"loss": -picked.mean(), "accuracy": (outputs.argmax(dim=1) == labels).double().mean()}


def _rows(batches: Sequence[Batch]) -> dict[str, Tensor]:
    index, norms, logits, labels = (_cat(batches, i) for i in range(4))
    order = index.argsort()
    loss = -_log_probabilities(logits)[torch.arange(len(labels)), labels]
    rows = {
        "index": index,
        "label": labels,
        "prediction": logits.argmax(dim=1),
        "loss": loss,
        "jacobian_norm": norms,
    }
    return {name: value[order].double() for name, value in rows.items()}


# --- the specs -----------------------------------------------------------------------------------------------------


def _probabilities_metric() -> ClassificationLossAccuracy:
    return ClassificationLossAccuracy(output="probabilities")


def specs() -> dict[str, Spec]:
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(30, generator=g) * 3
    norms[[4, 21]] = float("nan")
    norms[11] = float("inf")
    transitions, lengths = torch.randint(0, 60, (13,), generator=g), torch.rand(13, generator=g) + 0.5
    logits, labels = torch.randn(36, 5, generator=g) * 3, torch.randint(0, 5, (36,), generator=g)
    index = torch.randperm(36, generator=g)
    sizes = [9, 0, 12, 15]  # an empty batch among them
    return {
        "JacobianNorm": Spec(JacobianNorm, [(part,) for part in norms.split([7, 0, 11, 12])], _mean_of_finite, (0,)),
        "TransitionDensity": Spec(
            TransitionDensity,
            [(t, length) for t, length in zip(transitions.split([4, 5, 4]), lengths.split([4, 5, 4]), strict=True)],
            _mean_density,
            (1,),
        ),
        "ClassificationLossAccuracy": Spec(
            ClassificationLossAccuracy,
            [(z, y) for z, y in zip(logits.split(sizes), labels.split(sizes), strict=True) if len(z)],
            _loss_and_accuracy,
            (0,),
            rtol=1e-5,
        ),
        "ClassificationLossAccuracy(output='probabilities')": Spec(
            _probabilities_metric,
            [(z.softmax(dim=1), y) for z, y in zip(logits.split(sizes), labels.split(sizes), strict=True) if len(z)],
            functools.partial(_loss_and_accuracy, probabilities=True),
            (0,),
            rtol=1e-5,
        ),
        "PointRecords": Spec(
            PointRecords,
            [
                (i, n, z, y)
                for i, n, z, y in zip(
                    index.split(sizes), torch.rand(36, generator=g).split(sizes), logits.split(sizes),
                    labels.split(sizes), strict=True,
                )
            ],
            _rows,
            (1, 2),
            rtol=1e-5,
            scalar_plot=False,
        ),
    }
