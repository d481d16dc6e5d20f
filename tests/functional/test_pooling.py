"""Max-pooling as maxima of strided views (the model's pooling modules inside ``measuring``, on the CPU, outside
autograd): ATen's values, and where the measurements take it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import _pooling, activation_codes, jacobian_norm, measuring
from lightning_sensitivity.functional._pooling import _strided_max

_ATEN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_SHAPES = {1: (3, 4, 17), 2: (3, 4, 11, 9), 3: (2, 3, 7, 6, 5)}


def _inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Inputs with and without ties: after a ReLU, rounded, all zeros, and with infinities and NaN."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    special = x.clone().flatten()
    special[::7], special[3::11], special[5::13] = math.inf, -math.inf, math.nan
    return {
        "gaussian": x,
        "relu, rounded": x.relu().round(),
        "three levels": torch.rand(shape, generator=generator).mul(3).floor(),
        "zeros": torch.zeros(shape),
        "inf and nan": special.view(shape),
    }


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_values_are_aten_s_at_every_geometry(dims):
    checked = 0
    for k, s, p, d in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2)):
        if 2 * p > k:
            continue
        for name, x in _inputs(_SHAPES[dims]).items():
            try:
                expected = _ATEN[dims](x, k, s, p, d)
            except RuntimeError:  # a geometry ATen rejects (an empty output): the views are not asked
                continue
            out = _strided_max(x, (k,) * dims, (s,) * dims, (p,) * dims, (d,) * dims)
            assert out.is_contiguous() and out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=f"{k, s, p, d}, {name}")
            checked += 1
    assert checked > 100


def test_rectangular_windows():
    x = torch.randn(2, 3, 13, 10).relu()
    for geometry in [((2, 3), (1, 2), (1, 0), (2, 1)), ((3, 2), (2, 3), (1, 1), (1, 2))]:
        assert torch.equal(_strided_max(x, *geometry), F.max_pool2d(x, *geometry))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


class _Calls:
    """Counts the calls of :func:`_strided_max`, which it still runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = _pooling._strided_max

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(_pooling, "_strided_max", counted)


def test_measuring_on_the_cpu_without_autograd_pools_through_the_views(monkeypatch):
    model, x = _cnn(), torch.randn(128, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    calls = _Calls(monkeypatch)
    with measuring(model, "cpu") as net:
        out = net(x)
    assert calls.count == 2  # both pools: 2 x 2 on 128 x 8 x 16 x 16, and 3 x 3 with padding on 128 x 8 x 8 x 8
    assert torch.equal(out, expected)
    with measuring(model, "cpu", grad=True) as net:
        net(x.requires_grad_())
    assert calls.count == 2  # autograd: ATen's kernel (a maximum's backward splits ties)


def test_the_jacobian_and_the_activation_codes_keep_aten_s_pooling(monkeypatch):
    model, x = _cnn(), torch.randn(128, 1, 16, 16)
    x[:32] = 0.0  # every window a tie
    calls = _Calls(monkeypatch)
    jacobian_norm(model, x)
    codes = activation_codes(model, x)
    assert calls.count == 0
    assert codes.units == ("relu", "max_pool2d", "relu", "max_pool2d")  # the recorder still sees the pooling calls
    _, winners = F.max_pool2d(model[1](model[0](x)), 2, return_indices=True)
    assert torch.equal(codes.winners[:, : winners[0].numel()].long(), winners.flatten(1))


def test_small_or_unsupported_calls_run_aten_s_kernel(monkeypatch):
    calls = _Calls(monkeypatch)
    cases = [
        (nn.MaxPool2d(2), torch.randn(2, 3, 8, 8)),  # below the size where the views pay
        (nn.MaxPool2d(2, ceil_mode=True), torch.randn(64, 8, 16, 16)),
        (nn.MaxPool2d(2), torch.randn(64, 8, 16, 16).to(memory_format=torch.channels_last)),
        (nn.MaxPool2d(2), torch.randn(8, 64, 64)),  # unbatched
    ]
    for pool, x in cases:
        with measuring(pool, "cpu") as net:
            assert torch.equal(net(x), pool(x))
    pool, x = nn.MaxPool2d(2, return_indices=True), torch.randn(64, 8, 16, 16)  # the winners: ATen's
    with measuring(pool, "cpu") as net:
        out, winners = net(x)
    expected, expected_winners = pool(x)
    assert torch.equal(out, expected) and torch.equal(winners, expected_winners)
    assert calls.count == 0
    with measuring(nn.MaxPool2d(2), "cpu") as net:
        net(torch.randn(64, 8, 16, 16))
    assert calls.count == 1


def test_only_pytorch_s_pooling_modules_are_taken_and_only_inside_the_block(monkeypatch):
    """A functional call in a ``forward`` and a subclass with its own ``forward`` keep what they compute; the
    modules' ``forward`` is PyTorch's again after the block, also after an error."""

    class Functional(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2)

    class Halving(nn.MaxPool2d):
        def forward(self, x):
            return super().forward(x) / 2

    x = torch.randn(64, 8, 16, 16)
    calls = _Calls(monkeypatch)
    for model in (Functional(), Halving(2)):
        with measuring(model, "cpu") as net:
            assert torch.equal(net(x), model(x))
    assert calls.count == 0
    pool = nn.MaxPool2d(2)
    with pytest.raises(RuntimeError, match="inside"):
        with measuring(nn.Sequential(pool), "cpu") as net:
            net(x)
            assert "forward" in pool.__dict__
            raise RuntimeError("inside")
    assert "forward" not in pool.__dict__ and calls.count == 1


def test_under_torch_func_transforms_the_kernel_runs(monkeypatch):
    """An ensemble evaluated with ``torch.func.vmap`` inside ``measuring``: the views' ``out=`` buffer is not
    batched, so the transform's own rules (ATen's kernel) run, with the same outputs."""
    models = [_cnn(seed) for seed in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(128, 1, 16, 16)

    def one(p, b):
        return torch.func.functional_call(models[0], (p, b), (x,))

    with torch.no_grad():
        expected = torch.stack([model(x) for model in models])
    calls = _Calls(monkeypatch)
    with measuring(models[0], "cpu"):
        out = torch.func.vmap(one)(params, buffers)
    assert calls.count == 0
    torch.testing.assert_close(out, expected)
