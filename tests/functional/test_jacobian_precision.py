"""``jacobian_norm`` at confident points, per point, against an accurate float64 reference.

At a confident point ``p_c = 1 - eps`` the softmax Jacobian ``(diag(p) - p p^T) J_z`` is of the size of ``eps``;
a backward pass through the softmax forms ``p_c (1 - p_c)`` and loses ``1 - p_c`` (in float32, and below about
1e-13 in float64 too). The reference here is therefore not ``jacrev`` through the softmax: it is the float64
Jacobian of the logits, times the softmax factor formed analytically with ``1 - p_c`` as the sum of the other
probabilities.
"""

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from benchmarks.jacobian import accurate_reference, digits_cnn, digits_mlp, fit_full_batch
from lightning_sensitivity.functional import jacobian_norm
from tests.functional._operators import rows_pulled_back_to_the_input


def naive_float32(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vmap(jacrev)`` through the softmax in float32: what the accurate path must do better than."""
    model = copy.deepcopy(model).eval()
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None]).softmax(-1)[0]))(x)
    return jac.flatten(1).norm(dim=1)


def margins(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        top2 = model.eval()(x).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    torch.manual_seed(0)
    return fit_full_batch(model, x, y, steps)


def _with_median_margin(model: nn.Module, x: torch.Tensor, target: float) -> nn.Module:
    """A copy of ``model`` whose last layer is scaled so that the median logit margin on ``x`` is ``target``."""
    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        factor = target / margins(model, x).median()
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return model


def _relative_errors(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    ours = jacobian_norm(model, x, **kwargs).double()
    ref = accurate_reference(model, x)
    return (ours - ref).abs() / ref, ref


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return digits_mlp()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return digits_cnn()


@pytest.mark.parametrize("make", [mlp, cnn])
def test_trained_model_every_point_within_1e_4(make, digits):
    x, y = digits
    model = _train(make(), x[:1200], y[:1200], steps=300)
    points = x[1200:1500]
    errors, ref = _relative_errors(model, points)
    assert margins(model, points).median() > 8  # confident: most probabilities within 1e-3 of one
    assert errors.max() < 1e-4, f"worst {errors.max():.2e} at a norm of {ref[errors.argmax()]:.2e}"
    # The reference tells the difference: float32 arithmetic through the softmax is far off somewhere.
    naive = (naive_float32(model, points).double() - ref).abs() / ref
    assert naive.max() > 1e-2


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize(("margin", "tolerance"), [(10.0, 1e-4), (25.0, 1e-3)])
def test_confident_model_every_point(make, margin, tolerance, digits):
    x, y = digits
    model = _train(make(), x[:1200], y[:1200], steps=100)
    confident = _with_median_margin(model, x[:1200], margin)
    points = x[1200:1400]
    errors, ref = _relative_errors(confident, points)
    if margin > 20:
        assert ref.min() < 1e-10  # the regime of the paper's log-scaled plots
    assert errors.max() < tolerance, f"worst {errors.max():.2e} at a norm of {ref[errors.argmax()]:.2e}"


def test_projection_rows_are_formed_as_accurately(digits):
    """With as many directions as classes the estimator is exact: it must then match per point too."""
    x, y = digits
    model = _train(mlp(), x[:1200], y[:1200], steps=100)
    confident = _with_median_margin(model, x[:1200], 10.0)
    errors, _ = _relative_errors(confident, x[1200:1400], method="projection", num_projections=10)
    assert errors.max() < 1e-4


def test_single_logit_confident_binary_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 5)
    with torch.no_grad():
        scale = 12.0 / model(x).abs().median()  # the logits (0, z) have the margin |z|
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    errors, _ = _relative_errors(model, x)
    assert errors.max() < 1e-4


def test_many_classes_through_a_narrow_last_layer():
    """More classes than features before the last layer: the rows stop at the features, still per point right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 60))
    x = torch.randn(40, 12)
    model = _with_median_margin(model, x, 10.0)
    model64 = copy.deepcopy(model).double()
    logits_jacobian = torch.func.vmap(torch.func.jacrev(lambda v: model64(v[None])[0]))(x.double())
    for output in ("softmax", "logits"):
        ours = jacobian_norm(model, x, output=output).double()
        # One backward pass pulls back H = 16 rows from the last layer's features, not C - 1 = 59 or C = 60.
        assert rows_pulled_back_to_the_input(model, x, output=output) == 16
        ref = accurate_reference(model, x) if output == "softmax" else logits_jacobian.flatten(1).norm(dim=1)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)
    for chunk_size in (1, 7):
        torch.testing.assert_close(
            jacobian_norm(model, x, chunk_size=chunk_size).double(),
            accurate_reference(model, x),
            rtol=1e-4,
            atol=0,
        )


@pytest.mark.parametrize("method", ["exact", "projection"])
def test_probabilities_below_float64_range(method):
    """Where the other classes' probabilities underflow to zero even in float64 (logit margins past 745), the
    softmax Jacobian is zero: the norm is zero, not NaN; the points of ordinary margins stay right beside them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 4)
    huge = copy.deepcopy(model)
    with torch.no_grad():
        huge[2].weight.mul_(1e4)
        huge[2].bias.mul_(1e4)
    assert (margins(huge, x) > 800).sum() >= 8
    points = torch.cat([x, x])  # the first half through the huge model, the second through the ordinary one

    class Both(nn.Module):
        def forward(self, v):
            return torch.cat([huge(v[:16]), model(v[16:])])

    ours = jacobian_norm(Both(), points, method=method, num_projections=3).double()
    assert torch.isfinite(ours).all()
    far = margins(huge, x) > 800
    assert (ours[:16][far] == 0).all()
    torch.testing.assert_close(ours[16:], accurate_reference(model, x), rtol=1e-4, atol=0)


def test_the_cpu_bound_at_a_cut_counts_the_gradients_after_it(monkeypatch):
    """Products that stop at the first linear layer form no gradient at the input: the bound on a pass's rows is
    the largest activation after the cut (64 features), not the input (3,072). The 39 softmax rows of a 40-class
    model go in one pass per chunk of points; sized by the input they were three passes of 13."""
    from lightning_sensitivity.functional import jacobian as jacobian_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3072, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40))
    x = torch.randn(170, 3072)  # two default chunks of 85 points (1 MiB of input each)
    passes: list[int] = []
    pullback = jacobian_module._pullback

    def recorded(out, wrt, cotangents, batching):
        passes.append(cotangents.shape[0])
        assert wrt.shape[1:] == (64,)  # the cut
        return pullback(out, wrt, cotangents, batching)

    monkeypatch.setattr(jacobian_module, "_pullback", recorded)
    norms = jacobian_norm(model, x)
    assert passes == [39, 39]
    torch.testing.assert_close(norms.double(), accurate_reference(model, x), rtol=1e-4, atol=0)


def test_rows_split_over_passes_on_the_cpu():
    """On the CPU a pass holds only as many rows as keep the gradient of the largest activation (32 channels of
    16 x 16 at 128 points: 4 MiB a row) within 16 MiB: the nine softmax rows go in three passes of three, and the
    row left out is summed across them, still per point right."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10)
    )
    x = torch.randn(128, 1, 16, 16)
    model = _with_median_margin(model, x, 10.0)
    assert rows_pulled_back_to_the_input(model, x) == 3
    assert rows_pulled_back_to_the_input(model, x[:32]) == 9  # 1 MiB a row: one pass
    torch.testing.assert_close(jacobian_norm(model, x).double(), accurate_reference(model, x), rtol=1e-4, atol=0)
