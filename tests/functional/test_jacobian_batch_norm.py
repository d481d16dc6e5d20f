"""Eval-mode batch norm: ``jacobian_norm`` pulls its rows back through the per-channel scale it applies (a cheaper
backward than autograd's general one); the values and the logits must be those of the model as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sensitivity.functional import jacobian_norm
from tests.functional._operators import OperatorRecorder
from tests.functional.test_jacobian import reference


def _with_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.3, 3.0, generator=generator)
            if module.weight is not None:
                module.weight.data.normal_(1.0, 0.5, generator=generator)
                module.bias.data.normal_(generator=generator)
    return model.eval()


def _conv(affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6, affine=affine),
        nn.ReLU(inplace=True),  # in place on the batch norm's output, as in torchvision's networks
        nn.Conv2d(6, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    "build",
    [lambda: _conv(affine=True), lambda: _conv(affine=False), _mlp],
    ids=["conv-affine", "conv-no-affine", "mlp-batchnorm1d"],
)
@pytest.mark.parametrize("method", ["exact", "projection"])
def test_values_equal_the_reference_through_autograds_batch_norm(build, method):
    torch.manual_seed(0)
    model = _with_statistics(build())
    x = torch.randn(7, 2, 8, 8) if isinstance(model[0], nn.Conv2d) else torch.randn(7, 10)
    norms, logits = jacobian_norm(model, x, method=method, num_projections=5, return_logits=True)
    if method == "exact":
        torch.testing.assert_close(norms.double(), reference(model, x), rtol=1e-5, atol=0)
    else:  # five of five classes (four for the MLP): the projection is exact at K = C
        if logits.shape[1] <= 5:
            torch.testing.assert_close(norms.double(), reference(model, x), rtol=1e-4, atol=0)
    with torch.no_grad():
        assert torch.equal(logits, model(x)), "the measurement's forward pass must be the model's own"


class _BatchStatistics(nn.Module):
    """What ``BatchNorm1d(track_running_stats=False, affine=False)`` computes, written with plain operations."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = h.mean(dim=0, keepdim=True)
        var = h.var(dim=0, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5)


def test_batch_statistics_are_not_replaced():
    # ``track_running_stats=False``: batch norm normalizes with the batch's statistics even in eval mode, so it is
    # not a per-channel scale; the measurement must differentiate it as it is, like the same normalization written
    # with plain operations.
    torch.manual_seed(0)
    first, last = nn.Linear(6, 8), nn.Linear(8, 3)
    norm = nn.BatchNorm1d(8, track_running_stats=False, affine=False)
    x = torch.randn(5, 6)
    with_batch_norm = jacobian_norm(nn.Sequential(first, norm, nn.ReLU(), last), x)
    written_out = jacobian_norm(nn.Sequential(first, _BatchStatistics(), nn.ReLU(), last), x)
    torch.testing.assert_close(with_batch_norm, written_out, rtol=1e-5, atol=1e-7)


def test_no_batch_norm_backward_runs_in_eval_mode():
    # The point of the per-channel scale: autograd's batch-norm backward (and, under vmap, its copies of the inputs
    # once per row) never runs; the reference ``vmap(jacrev)`` does run it.
    torch.manual_seed(0)
    model = _with_statistics(_conv(affine=True))
    x = torch.randn(3, 2, 8, 8)
    with OperatorRecorder() as ours:
        jacobian_norm(model, x)
    with OperatorRecorder() as autograds:
        torch.autograd.grad(model(x.requires_grad_(True)).sum(), x)
    assert any("batch_norm_backward" in name for name in autograds.names)
    assert not any("batch_norm_backward" in name for name in ours.names)
