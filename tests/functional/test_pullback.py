"""The vectorized backward pass of ``jacobian_norm`` and its one fallback: rows pulled back one by one, with one
warning, only where an operator's backward cannot be batched; every other error, out-of-memory first, propagates."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_sensitivity.functional import _pullback, jacobian_norm
from lightning_sensitivity.functional._pullback import _no_batching_rule
from tests.functional.test_jacobian import reference


class _Twice(torch.autograd.Function):
    """``2 x``, with the backward of each subclass, whose calls it counts."""

    calls = 0

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        pass


class _Doubled(_Twice):
    """A backward that reads a number off the gradient with ``.item()``: fine one row at a time, and with no
    batching rule under ``vmap`` (as a user's custom operator may have none)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _Doubled.calls += 1
        return grad * (2.0 + 0.0 * grad.abs().max().item())


class _Raising(_Twice):
    """A backward that raises the error it is given (``_Raising.error``)."""

    error: BaseException = RuntimeError()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _Raising.calls += 1
        raise _Raising.error


class _Net(nn.Module):
    """A convolutional model (its rows pulled back with ``torch.func.vmap``) or an MLP (``is_grads_batched``),
    with ``twice`` applied after its first layer: a custom function, or the plain product (the reference)."""

    def __init__(self, convolutional: bool, twice=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        torch.manual_seed(0)
        if convolutional:
            self.first = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten())
            features = 4 * 4 * 4
        else:
            self.first = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 16))
            features = 16
        self.rest = nn.Sequential(nn.ReLU(), nn.Linear(features, 6))
        self.twice = twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.rest(self.twice(h) if self.twice is not None else 2 * h)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback warns once per cause and process: start from none warned."""
    monkeypatch.setattr(_pullback, "_WARNED_PER_ROW", set())


@pytest.mark.parametrize("convolutional", [True, False], ids=["vmap", "is_grads_batched"])
def test_a_backward_that_cannot_be_batched_is_pulled_back_row_by_row_with_one_warning(convolutional, fresh_warnings):
    x = torch.randn(7, 2, 6, 6)
    model = _Net(convolutional, _Doubled.apply)
    _Doubled.calls = 0
    with pytest.warns(UserWarning, match="pulled back one at a time") as warned:
        norms = jacobian_norm(model, x, chunk_size=3)  # three chunks: the first one decides for the others
    assert len([w for w in warned if "pulled back one at a time" in str(w.message)]) == 1
    assert _Doubled.calls == 1 + 5 * 3  # one vectorized try, then the 5 softmax rows of each of the three chunks
    torch.testing.assert_close(norms.double(), reference(_Net(convolutional), x), rtol=1e-5, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: measuring the model again is silent
        jacobian_norm(model, x)


@pytest.mark.parametrize("convolutional", [True, False], ids=["vmap", "is_grads_batched"])
def test_an_out_of_memory_error_propagates_and_nothing_falls_back(convolutional, fresh_warnings, monkeypatch):
    x = torch.randn(4, 2, 6, 6)
    model = _Net(convolutional)
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch.autograd, "grad", out_of_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            jacobian_norm(model, x)
    assert calls == [not convolutional]  # the one vectorized pass: neither another nor one per row


@pytest.mark.parametrize("convolutional", [True, False], ids=["vmap", "is_grads_batched"])
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("vmap: CUDA out of memory while batching"),
        RuntimeError("the model's own error"),
        ValueError("Batching rule not implemented, says the model"),
    ],
    ids=["out-of-memory", "runtime-error", "value-error"],
)
def test_every_other_error_of_a_backward_propagates_as_it_is(convolutional, error, fresh_warnings):
    _Raising.error, _Raising.calls = error, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error)) as raised:
            jacobian_norm(_Net(convolutional, _Raising.apply), torch.randn(4, 2, 6, 6))
    assert raised.value is error
    assert _Raising.calls == 1


@pytest.mark.parametrize(
    ("error", "is_batching"),
    [
        # torch 2.14's messages, from a backward with ``.item()`` and one writing into an unbatched buffer
        (RuntimeError("vmap: It looks like you're calling .item() on a Tensor. We don't support vmap over ..."), True),
        (RuntimeError("Batching rule not implemented for aten::item. We could not generate a fallback."), True),
        (RuntimeError("vmap: inplace arithmetic(self, *extra_args) is not possible because there exists ..."), True),
        (RuntimeError("vmap: aten::copy_(self, *extra_args) is not possible because there exists a Tensor ..."), True),
        (torch.OutOfMemoryError("vmap: CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
        (torch.utils.checkpoint.CheckpointError("vmap: recomputed values differ"), False),
    ],
)
def test_only_a_missing_batching_rule_is_recognized(error, is_batching):
    assert _no_batching_rule(error) is is_batching
