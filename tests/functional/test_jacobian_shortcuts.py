"""The Jacobian's backward shortcuts as one table: where each applies, that each gives the operator's own values and
input gradient also under ``torch.func`` transforms, and that none is taken where the graph is recomputed
(activation checkpointing) or the device is not the one they were measured on."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_sensitivity.functional import _backwards, jacobian_norm
from lightning_sensitivity.functional._backwards import _SHORTCUTS, _eval_batch_norm, _input_conv2d
from tests.functional._operators import OperatorRecorder
from tests.functional.test_jacobian import reference


def _batch_norm(channels: int = 3) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels)
    generator = torch.Generator().manual_seed(1)
    norm.running_mean.normal_(generator=generator)
    norm.running_var.uniform_(0.3, 3.0, generator=generator)
    norm.weight.data.normal_(1.0, 0.5, generator=generator)
    norm.bias.data.normal_(generator=generator)
    return norm.eval()


def _pairs() -> dict[str, tuple]:
    """Each shortcut beside the call it stands in for, as functions of the input (float64)."""
    torch.manual_seed(0)
    norm = _batch_norm().double()
    conv = nn.Conv2d(3, 4, 2, stride=2).double()  # non-overlapping patches: the fold is taken
    stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.1, norm.eps)
    return {
        "batch_norm": (
            lambda v: _eval_batch_norm((v, *stats), {}, lambda t: False),
            lambda v: F.batch_norm(v, *stats),
        ),
        "conv2d": (
            lambda v: _input_conv2d((v, conv.weight, conv.bias, 2, 0), {}, lambda t: True),
            lambda v: F.conv2d(v, conv.weight, conv.bias, 2, 0),
        ),
    }


def test_the_table_holds_one_shortcut_per_function():
    assert _SHORTCUTS == {F.batch_norm: _eval_batch_norm, F.conv2d: _input_conv2d}


@pytest.mark.parametrize("name", ["batch_norm", "conv2d"])
def test_each_shortcut_composes_with_torch_func_transforms(name):
    """``vmap`` over the points and ``jacrev`` (a ``vmap`` of ``vjp``) of a shortcut give the operator's values and
    input Jacobian. The shortcuts' former combined-``ctx`` form raised here (torch.func needs ``setup_context``)."""
    shortcut, own = _pairs()[name]
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = own(x)
    per_point = torch.func.vmap(lambda v: shortcut(v[None])[0])(x)
    torch.testing.assert_close(per_point.detach(), expected, rtol=1e-12, atol=1e-12)
    jacobian = torch.func.jacrev(shortcut)(x[:2])
    torch.testing.assert_close(jacobian, torch.func.jacrev(own)(x[:2]), rtol=1e-12, atol=1e-12)


def _ensemble_member() -> nn.Module:
    member = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), _batch_norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    return member.eval()


class _VmappedEnsemble(nn.Module):
    """Three members evaluated at once with ``torch.func.vmap`` inside ``forward``: the batch norms are called
    under a transform, and so are their shortcuts."""

    def __init__(self) -> None:
        super().__init__()
        members = [_ensemble_member() for _ in range(3)]
        self.params, self.stacked_buffers = torch.func.stack_module_state(members)
        self.base = copy.deepcopy(members[0]).to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def member(params: dict, buffers: dict) -> torch.Tensor:
            return torch.func.functional_call(self.base, (params, buffers), (x,))

        return torch.func.vmap(member)(self.params, self.stacked_buffers).mean(0)


def test_a_model_that_vmaps_its_members_is_measured_through_the_shortcut():
    torch.manual_seed(0)
    model = _VmappedEnsemble()
    x = torch.randn(4, 2, 6, 6)
    with OperatorRecorder() as recorder:
        norms = jacobian_norm(model, x)
    assert not any("batch_norm_backward" in name for name in recorder.names)  # the shortcut's backward ran
    expected = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None]).softmax(-1)[0]))(x)
    torch.testing.assert_close(norms, expected.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)


def test_a_builder_that_does_not_apply_leaves_the_call_as_it_is(monkeypatch):
    """The table is what the watched forward pass consults: an entry for ``F.linear`` that declines every call
    is asked for each linear layer, and the values are the model's own."""
    asked = []

    def declining(args, kwargs, measured):
        asked.append(args[0].shape)
        return None

    monkeypatch.setitem(_SHORTCUTS, F.linear, declining)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(5, 6)
    norms = jacobian_norm(model, x)
    assert len(asked) == 3
    torch.testing.assert_close(norms.double(), reference(model, x), rtol=1e-5, atol=0)


def test_the_batch_norm_shortcut_is_taken_on_the_cpu_only():
    """It was measured on the CPU; on any other device (here the meta device) the call keeps its own backward."""
    norm = _batch_norm()
    stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
    assert _eval_batch_norm((torch.randn(2, 3, 4, 4), *stats), {}, lambda t: False) is not None
    on_meta = [t.to("meta") for t in stats]
    assert _eval_batch_norm((torch.randn(2, 3, 4, 4, device="meta"), *on_meta), {}, lambda t: False) is None


def test_no_shortcut_under_saved_tensor_hooks(monkeypatch):
    """Saved-tensor hooks (activation checkpointing, off-loading) see what each operation saves, which a shortcut
    changes: under them the operators' own backwards run, with the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), _batch_norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(3, 1, 6, 6)
    with OperatorRecorder() as recorder:  # without hooks both shortcuts run
        jacobian_norm(model, x)
    assert not any("batch_norm_backward" in name for name in recorder.names)
    assert any(name.startswith("col2im") for name in recorder.names)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), OperatorRecorder() as recorder:
        norms = jacobian_norm(model, x)
    assert any("batch_norm_backward" in name for name in recorder.names)
    assert not any(name.startswith("col2im") for name in recorder.names)
    torch.testing.assert_close(norms.double(), reference(model, x), rtol=1e-5, atol=0)
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert _backwards._saved_tensors_hooked()  # where torch does not say, hooks are assumed


class _Checkpointed(nn.Module):
    """A Conv + BatchNorm + ReLU block run through ``torch.utils.checkpoint`` (or directly, ``reentrant=None``)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _batch_norm(6), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 4, 3, stride=2), _batch_norm(4), nn.ReLU(), nn.Flatten())
        self.out = nn.Linear(4 * 3 * 3, 5)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            h = self.block(x)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.out(self.head(h))


def test_activation_checkpointing_is_measured_as_the_model_without_it():
    """Non-reentrant checkpointing recomputes the block in the backward pass and checks that it saves what the
    forward pass saved: the block runs without shortcuts, the rest of the model with them, and the values are those
    of the model without checkpointing (no fallback, no warning)."""
    x = torch.randn(5, 3, 8, 8)
    expected = reference(_Checkpointed(None), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms, logits = jacobian_norm(_Checkpointed(False), x, return_logits=True)
        logit_norms = jacobian_norm(_Checkpointed(False), x, output="logits")
    torch.testing.assert_close(norms.double(), expected, rtol=2e-5, atol=0)
    torch.testing.assert_close(logit_norms.double(), reference(_Checkpointed(None), x, "logits"), rtol=2e-5, atol=0)
    with torch.no_grad():
        assert torch.equal(logits, _Checkpointed(None).eval()(x))


class _CheckpointedMLP(nn.Module):
    """An MLP run whole through a checkpoint (``reentrant=None``: directly): its first layer, where the products could
    stop, is inside."""

    def __init__(self, reentrant: bool | None = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if self.reentrant is None else checkpoint(self.net, x, use_reentrant=True)


class _CheckpointedMiddle(nn.Module):
    """A first linear layer (where the products stop) and a last one with fewer features (8) than rows (29), around a
    reentrant checkpoint: the repeated passes stop at the same places as the first one."""

    def __init__(self, reentrant: bool | None = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(3 * 8 * 8, 16), nn.Linear(8, 30)
        self.middle = nn.Sequential(nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.flatten(1))
        return self.last(self.middle(h) if self.reentrant is None else checkpoint(self.middle, h, use_reentrant=True))


@pytest.mark.parametrize(
    "build",
    [_Checkpointed, _CheckpointedMLP, _CheckpointedMiddle],
    ids=["conv-bn", "mlp", "cut-and-last-linear"],
)
def test_reentrant_checkpointing_is_measured_as_the_model_without_it_and_touches_no_gradient(build):
    """PyTorch's reentrant checkpoint refuses ``torch.autograd.grad``; the measurement runs the forward pass again on
    the points repeated once per row and calls ``backward`` on it, with the parameters not requiring grad meanwhile.
    The values are those of the model without checkpointing; no parameter gets a ``.grad``, no hook on one fires (a
    DDP reducer's), and every parameter requires grad again afterwards (a frozen one stays frozen)."""
    model = build(True)
    fired: list[torch.Tensor] = []
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(fired.append)
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    x = torch.randn(5, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms, logits = jacobian_norm(model, x, return_logits=True)
        logit_norms = jacobian_norm(model, x, output="logits")
    torch.testing.assert_close(norms.double(), reference(build(None), x), rtol=2e-5, atol=0)
    torch.testing.assert_close(logit_norms.double(), reference(build(None), x, "logits"), rtol=2e-5, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, build(None).eval()(x))
    assert fired == []
    assert all(parameter.grad is None for parameter in model.parameters())
    assert [parameter.requires_grad for parameter in model.parameters()] == [
        parameter is not frozen for parameter in model.parameters()
    ]


def test_reentrant_checkpointing_bounds_the_repeated_points(monkeypatch):
    """A repeated pass keeps the activations of all its points: with a bound of 2,000 entries (the conv-bn model has
    528 per point), 5 points take one row a pass, and the values do not change."""
    from lightning_sensitivity.functional import _pullback

    x = torch.randn(5, 3, 8, 8)
    repeated: list[int] = []
    pullback = _pullback._Forwards.repeated_pullback

    def recorded(self, points, cotangents, at_features):
        repeated.append(cotangents.shape[0])
        return pullback(self, points, cotangents, at_features)

    monkeypatch.setattr(_pullback, "_REPEATED_MAX_ENTRIES", 2_000)
    monkeypatch.setattr(_pullback._Forwards, "repeated_pullback", recorded)
    norms = jacobian_norm(_Checkpointed(True), x)
    assert repeated == [1] * 4  # the 4 softmax rows of 5 classes, one a pass
    torch.testing.assert_close(norms.double(), reference(_Checkpointed(None), x), rtol=2e-5, atol=0)
