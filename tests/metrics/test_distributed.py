"""Every metric of the package, split over two gloo processes, gives every process the one-process result: the
states reduce with ``sum`` or ``cat`` (see ``_ddp_harness.py``)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from lightning_sensitivity.metrics import (
    ClassificationLossAccuracy,
    JacobianNorm,
    PointRecords,
    TransitionDensity,
)
from tests.metrics._ddp_harness import Case, assert_like_one_process, distributed_results

pytestmark = [pytest.mark.multiprocess, pytest.mark.filterwarnings("ignore::UserWarning")]


def _compute(metric):
    return metric.compute()


def _per_point(metric):
    return metric.per_point()


def _mean_transitions(metric):
    return metric.mean_transitions()


def _cases() -> dict[str, Case]:
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(31, generator=g)
    norms[[3, 17]] = float("nan")
    transitions, lengths = torch.randint(0, 50, (9,), generator=g), torch.rand(9, generator=g) + 0.5
    logits, labels = torch.randn(40, 5, generator=g), torch.randint(0, 5, (40,), generator=g)
    index, values = torch.randperm(30, generator=g), torch.rand(30, generator=g)
    per_point_loss = functools.partial(F.cross_entropy, reduction="none")
    batches = range(0, 40, 7)
    return {
        # three updates: one process holds two, the other one
        "jacobian norm": Case(JacobianNorm, [(chunk,) for chunk in norms.split(11)], {"mean": _compute}),
        # per-point values are gathered from every process (in rank order: the monitor sorts them itself)
        "jacobian per point": Case(JacobianNorm, [(norms[:20],), (norms[20:],)], {"values": _per_point}),
        "transition density": Case(
            TransitionDensity,
            [(transitions[i : i + 2], lengths[i : i + 2]) for i in range(0, 9, 2)],
            {"density": _compute, "mean count": _mean_transitions},
        ),
        # more processes than updates: one process has no trajectory at all
        "transition density, one process empty": Case(
            TransitionDensity, [(transitions[:3], lengths[:3])], {"density": _compute, "mean count": _mean_transitions}
        ),
        "loss and accuracy": Case(
            ClassificationLossAccuracy, [(logits[i : i + 7], labels[i : i + 7]) for i in batches], {"values": _compute}
        ),
        "loss and accuracy, per-point loss_fn": Case(
            functools.partial(ClassificationLossAccuracy, loss_fn=per_point_loss),
            [(logits[i : i + 7], labels[i : i + 7]) for i in batches],
            {"values": _compute},
        ),
        "point records": Case(
            PointRecords,
            [(index[i : i + 4], values[i : i + 4], logits[:30][i : i + 4, :3], labels[:30][i : i + 4] % 3) for i in range(0, 30, 4)],
            {"rows": _compute},
        ),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def results():
    return distributed_results(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_result(name, results):
    assert_like_one_process(CASES[name], [rank[name] for rank in results])
