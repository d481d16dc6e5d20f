"""Max-pooling as maxima of strided views (on the CPU, outside autograd): ATen's values and winners, and where the
measurements take it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import _pooling, activation_codes, jacobian_norm, measuring
from lightning_sensitivity.functional._pooling import _Pool, _strided_max

_ATEN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_SHAPES = {1: (3, 4, 17), 2: (3, 4, 11, 9), 3: (2, 3, 7, 6, 5)}


def _inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Inputs with and without ties: after a ReLU, rounded, all zeros, signed zeros among the ties."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    zeros = torch.zeros(shape)
    zeros[..., ::3] = -0.0
    return {
        "gaussian": x,
        "relu, rounded": x.relu().round(),
        "three levels": torch.rand(shape, generator=generator).mul(3).floor(),
        "zeros": zeros,
    }


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_values_and_winners_are_aten_s_at_every_geometry_and_at_ties(dims):
    checked = 0
    for k, s, p, d in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (1, 2)):
        if 2 * p > k:
            continue
        geometry = ((k,) * dims, (s,) * dims, (p,) * dims, (d,) * dims)
        for name, x in _inputs(_SHAPES[dims]).items():
            values, winners = _ATEN[dims](x, k, s, p, d, return_indices=True)
            plane = math.prod(x.shape[2:])
            for dtype in [torch.uint8, torch.int16, torch.int64] if plane <= 256 else [torch.int16, torch.int64]:
                out, found = _strided_max(x, *geometry, dtype)
                assert torch.equal(out, values), (geometry, name)
                assert found is not None and found.dtype == dtype
                assert torch.equal(found.long(), winners), (geometry, name, dtype)
                assert out.is_contiguous() and found.is_contiguous()
            assert torch.equal(_strided_max(x, *geometry)[0], values)
            checked += 1
    assert checked > 100


def test_rectangular_windows():
    x = torch.randn(2, 3, 13, 10).relu()
    for geometry in [((2, 3), (1, 2), (1, 0), (2, 1)), ((3, 2), (2, 3), (1, 1), (1, 2))]:
        values, winners = F.max_pool2d_with_indices(x, *geometry)
        out, found = _strided_max(x, *geometry, torch.int16)
        assert torch.equal(out, values)
        assert torch.equal(found.long(), winners)


def test_non_finite_values_leave_the_winners_to_aten():
    x = torch.randn(64, 4, 16, 16)
    x[3, 1, 5, 7] = math.nan
    x[9, 2, 0, 0] = math.inf
    out, found = _strided_max(x, (2, 2), (2, 2), (0, 0), (1, 1), torch.int16)
    assert found is None
    assert torch.equal(out.nan_to_num(), F.max_pool2d(x, 2).nan_to_num())  # NaN propagates, as in ATen's
    pool = _Pool(x, 2, (2, 2), (2, 2), (0, 0), (1, 1), False, False)
    assert pool._fast(x, winners=True)
    values, winners = pool.winners()
    aten_values, aten_winners = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(winners.long(), aten_winners) and winners.dtype == torch.uint8  # a plane of 256
    assert torch.equal(values.nan_to_num(), aten_values.nan_to_num())


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


def test_a_model_given_the_winners_gets_aten_s(monkeypatch):
    class Gathering(nn.Module):
        """Reads the input back at the winners, and the winners themselves."""

        def __init__(self) -> None:
            super().__init__()
            self.pool, self.head = nn.MaxPool2d(2, return_indices=True), nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            _, winners = self.pool(x)
            gathered = x.flatten(2).gather(2, winners.flatten(2))
            return self.head(torch.cat([gathered, winners.flatten(2).float() / 256], dim=2).flatten(1))

    model, x = Gathering(), torch.randn(300, 1, 16, 16).relu().round()
    with torch.no_grad():
        expected = model(x)
    calls = _Calls(monkeypatch)
    with measuring(model, "cpu") as net:
        out = net(x)
    assert calls.count == 1
    assert torch.equal(out, expected)


def test_activation_codes_are_those_of_aten_s_kernel(monkeypatch):
    model = _cnn()
    x = torch.randn(96, 1, 16, 16)
    x[:32] = 0.0  # every window a tie
    x[32:64] = x[32:64].round()
    codes = activation_codes(model, x)
    monkeypatch.setattr(_Pool, "_fast", lambda self, u, winners: False)
    reference = activation_codes(model, x)
    assert torch.equal(codes.winners, reference.winners)
    assert torch.equal(codes.sides, reference.sides)
    assert codes.winners.dtype == reference.winners.dtype == torch.uint8


def test_the_jacobian_keeps_aten_s_pooling(monkeypatch):
    model, x = _cnn(), torch.randn(64, 1, 16, 16)
    calls = _Calls(monkeypatch)
    jacobian_norm(model, x)
    assert calls.count == 0


def test_small_or_unsupported_calls_run_aten_s_kernel(monkeypatch):
    calls = _Calls(monkeypatch)
    with measuring(nn.Identity(), "cpu"):
        F.max_pool2d(torch.randn(2, 3, 8, 8), 2)  # below the size where the views pay
        F.max_pool2d(torch.randn(64, 8, 16, 16), 2, ceil_mode=True)
        F.max_pool2d(torch.randn(64, 8, 16, 16).to(memory_format=torch.channels_last), 2)
        F.max_pool2d(torch.randn(64, 8, 16, 16), 3, stride=2, return_indices=True)  # 9 positions: ATen is faster
    assert calls.count == 0
    with measuring(nn.Identity(), "cpu"):
        F.max_pool2d(torch.randn(64, 8, 16, 16), 2)
    assert calls.count == 1


def test_under_torch_func_transforms_the_kernel_runs(monkeypatch):
    """An ensemble evaluated with ``torch.func.vmap`` inside ``measuring``: the views' buffers are not batched, so
    the transform's own rules (ATen's kernel) run, with the same outputs."""
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
