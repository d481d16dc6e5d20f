"""Every Metric of the package through one ``MetricTester``-style harness (``_tester.py``), as torchmetrics runs its
own: update then compute, forward against update, the state dict, pickling, input dtypes, results without a graph,
``torch.jit.script``, ``plot``, and two gloo processes, each against a direct float64 computation."""

from __future__ import annotations

import copy
import pickle
import warnings

import matplotlib
import pytest
import torch

from tests.metrics._ddp_harness import Case, distributed_results
from tests.metrics._tester import Spec, assert_close, cast, specs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPECS = specs()
NAMES = list(SPECS)


def _updated(spec: Spec, batches=None):
    metric = spec.make()
    for batch in spec.batches if batches is None else batches:
        metric.update(*batch)
    return metric


@pytest.mark.parametrize("name", NAMES)
def test_update_then_compute_equals_the_reference(name):
    spec = SPECS[name]
    assert_close(_updated(spec).compute(), spec.reference(spec.batches), spec.rtol)


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_the_batch_value_and_accumulates_as_update(name):
    spec = SPECS[name]
    metric = spec.make()
    for batch in spec.batches:
        assert_close(metric(*batch), spec.reference([batch]), spec.rtol)
    assert_close(metric.compute(), _updated(spec).compute(), 0, 0)


@pytest.mark.parametrize("name", NAMES)
def test_the_state_dict_carries_the_states(name):
    """With persistent states, a metric loaded from another's state dict after half the batches ends where one metric
    over all of them ends; without, the state dict holds no state (torchmetrics' default)."""
    spec = SPECS[name]
    half = len(spec.batches) // 2
    first = _updated(spec, spec.batches[:half])
    assert first.state_dict() == {}
    first.persistent(True)
    second = spec.make()
    second.persistent(True)
    second.load_state_dict(first.state_dict())
    for batch in spec.batches[half:]:
        second.update(*batch)
    assert_close(second.compute(), spec.reference(spec.batches), spec.rtol)


@pytest.mark.parametrize("name", NAMES)
def test_a_pickled_or_copied_metric_goes_on_where_it_was(name):
    spec = SPECS[name]
    half = len(spec.batches) // 2
    metric = _updated(spec, spec.batches[:half])
    for clone in (pickle.loads(pickle.dumps(metric)), copy.deepcopy(metric)):
        for batch in spec.batches[half:]:
            clone.update(*batch)
        assert_close(clone.compute(), spec.reference(spec.batches), spec.rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_inputs_in_every_floating_dtype(name, dtype):
    """Half-precision and float64 inputs give the reference of the same (cast) inputs: the sums are float64 states."""
    spec = SPECS[name]
    batches = cast(spec.batches, spec.floating, dtype)
    rtol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, spec.rtol)
    assert_close(_updated(spec, batches).compute(), spec.reference(batches), rtol, atol=1e-5)


def _requires_grad(value) -> bool:
    values = value.values() if isinstance(value, dict) else [value]
    return any(v.requires_grad or v.grad_fn is not None for v in values)


@pytest.mark.parametrize("name", NAMES)
def test_results_carry_no_graph(name):
    """``is_differentiable = False``: inputs that require grad are detached in ``update``, so neither ``forward``
    (which torchmetrics runs with gradients on) nor ``compute`` returns a graph."""
    spec = SPECS[name]
    metric = spec.make()
    assert metric.is_differentiable is False
    for batch in spec.batches:
        batch = tuple(
            v.clone().requires_grad_(True) if i in spec.floating else v for i, v in enumerate(batch)
        )
        assert not _requires_grad(metric(*batch))
    assert not _requires_grad(metric.compute())


@pytest.mark.parametrize("name", NAMES)
def test_scriptable(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, torchmetrics still checks
        torch.jit.script(SPECS[name].make())


@pytest.mark.parametrize("name", NAMES)
def test_plot_one_value_and_a_sequence(name):
    spec = SPECS[name]
    metric = spec.make()
    values = [metric(*batch) for batch in spec.batches]
    try:
        fig, ax = metric.plot()
        assert fig is not None and ax.figure is fig
        fig, ax = metric.plot(values)
        assert fig is not None
        if spec.scalar_plot:  # one line per series (the dict's keys), a point per step
            assert all(len(line.get_xdata()) == len(values) for line in ax.get_lines())
        else:  # one scatter per step
            assert len(ax.collections) == len(values)
        _, given = plt.subplots()
        assert metric.plot(ax=given) == (None, given)
    finally:
        plt.close("all")


def _compute(metric):
    return metric.compute()


@pytest.fixture(scope="module")
def distributed():
    cases = {name: Case(spec.make, spec.batches, {"value": _compute}) for name, spec in SPECS.items()}
    return distributed_results(cases)


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_give_the_reference(name, distributed):
    """The batches split over two gloo processes (round-robin): every process computes the reference of all."""
    spec = SPECS[name]
    for rank in distributed:
        assert_close(rank[name]["value"], spec.reference(spec.batches), spec.rtol)
