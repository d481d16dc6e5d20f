"""The public context of every measurement (``measuring``) and its reading of a model's output (``class_logits``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import class_logits, logits_from_probabilities, measuring


def test_class_logits_passes_multiclass_logits_through():
    z = torch.randn(5, 3)
    assert class_logits(z, 5) is z


def test_a_single_logit_is_read_as_two_classes_whose_softmax_is_the_sigmoid():
    z = torch.randn(6, 1, dtype=torch.float64)
    classes = class_logits(z)
    assert classes.shape == (6, 2)
    torch.testing.assert_close(classes.softmax(dim=1)[:, 1], torch.sigmoid(z[:, 0]))
    torch.testing.assert_close(classes.argmax(dim=1), (z[:, 0] > 0).long())
    t = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(
        F.cross_entropy(classes, torch.stack([1 - t, t], dim=1)),
        F.binary_cross_entropy_with_logits(z[:, 0], t),
    )


def test_probabilities_are_read_as_the_logits_whose_softmax_they_are():
    """Softmax rows: log p, whose softmax is p, argmax that of p, cross-entropy the NLL of p. One column (the
    probability of class 1): logit p, read as (1 - p, p), its cross-entropy the binary cross-entropy of p."""
    p = torch.randn(6, 4, dtype=torch.float64).softmax(dim=1)
    y = torch.randint(0, 4, (6,))
    logits = logits_from_probabilities(p)
    torch.testing.assert_close(class_logits(logits).softmax(dim=1), p)
    torch.testing.assert_close(F.cross_entropy(logits, y), F.nll_loss(p.log(), y))
    q = torch.rand(6, 1, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64)
    binary = logits_from_probabilities(q)
    assert binary.shape == (6, 1)
    torch.testing.assert_close(class_logits(binary).softmax(dim=1)[:, 1], q[:, 0])
    torch.testing.assert_close(
        F.binary_cross_entropy_with_logits(binary[:, 0], t), F.binary_cross_entropy(q[:, 0], t)
    )


@pytest.mark.parametrize(
    ("output", "batch_size", "piece"),
    [
        ({"logits": torch.zeros(2, 3)}, None, "got a dict"),
        (torch.zeros(2, 3, 4), None, "= [B, C], got (2, 3, 4)"),
        (torch.zeros(3, 4), 2, "= [2, C], got (3, 4)"),
        (torch.zeros(2), 2, "got (2,)"),
    ],
)
def test_class_logits_rejects_what_is_not_logits(output, batch_size, piece):
    with pytest.raises(ValueError, match=piece.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        class_logits(output, batch_size)


class _Inspect(nn.Module):
    """Records, when called, whether it was in training mode, whether autograd and autocast were on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: dict[str, bool] = {}

    def forward(self, x):
        self.seen = {
            "training": self.training,
            "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
        }
        return self.linear(x)


@pytest.mark.parametrize("grad", [False, True])
def test_measuring_runs_in_eval_mode_without_autocast_and_restores_each_mode(grad):
    model = _Inspect().train()
    model.linear.eval()  # a part frozen in eval mode on purpose stays so
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), measuring(model, "cpu", grad=grad) as net:
        out = net(torch.ones(3, 4))
    assert model.seen == {"training": False, "grad": grad, "autocast": False}
    assert out.dtype == torch.float32 and out.requires_grad == grad
    assert model.training and not model.linear.training


def test_measuring_runs_a_compiled_module_through_its_eager_original():
    model = _Inspect()
    compiled = torch.compile(model)
    with measuring(compiled, torch.device("cpu")) as net:
        assert net is model
        out = net(torch.ones(2, 4))
    torch.testing.assert_close(out, model.linear(torch.ones(2, 4)).detach())


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)
    )


@pytest.mark.parametrize("grad", [False, True])
def test_measuring_sets_nothing_on_the_users_modules_but_their_mode(grad, tmp_path):
    """Inside the block every module keeps its own attributes (no ``forward`` put in its place, as a speed trick
    would): a copy or a ``torch.save`` made there is the model as built, and computes what it computes outside."""
    model = _cnn()
    x = torch.randn(256, 1, 16, 16)  # a pooled input large enough for any size-gated fast path
    before = {name: set(vars(module)) for name, module in model.named_modules()}
    with torch.no_grad():
        expected = model(x)
    with measuring(model, "cpu", grad=grad) as net:
        inside = {name: set(vars(module)) for name, module in model.named_modules()}
        own_forward = all(type(module).forward is module.forward.__func__ for module in model.modules())
        out = net(x)
        torch.save(model, tmp_path / "model.pt")
        copied = copy.deepcopy(model)
    assert inside == before and own_forward
    assert torch.equal(out.detach(), expected)
    for saved in (torch.load(tmp_path / "model.pt", weights_only=False), copied):
        assert {name: set(vars(module)) for name, module in saved.named_modules()} == before
        with torch.no_grad():
            assert torch.equal(saved.eval()(x), expected)
