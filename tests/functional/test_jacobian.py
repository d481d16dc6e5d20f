"""``jacobian_norm`` against independent references: ``torch.func.vmap(jacrev)`` in float64, and hand math."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import jacobian_norm
from tests.functional._operators import rows_pulled_back_to_the_input


def reference(model: nn.Module, x: torch.Tensor, output: str = "softmax") -> torch.Tensor:
    """Per-point ||d out / d x||_F from the full Jacobian, float64, model in eval mode."""
    model = copy.deepcopy(model).double().eval()

    def f(point):
        z = model(point[None])[0]
        return z.softmax(-1) if output == "softmax" else z

    jac = torch.func.vmap(torch.func.jacrev(f))(x.double())
    return jac.flatten(1).norm(dim=1)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(48, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 16),
        nn.Tanh(),
        nn.Linear(16, 7),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


class SkipNet(nn.Module):
    """The input is used twice (a linear layer and a skip connection): the linear shortcut must not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(x))) + x[:, :3]


def _trained_batchnorm(model: nn.Module) -> nn.Module:
    # Non-trivial running statistics, so that eval mode matters.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 4, 4) * 2 + 1)
    return model


@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize(
    ("make", "shape", "num_classes", "shortcut"),
    [(mlp, (9, 3, 4, 4), 7, True), (cnn, (9, 3, 4, 4), 5, False), (SkipNet, (9, 12), 3, False)],
)
def test_exact_matches_vmap_jacrev(make, shape, num_classes, shortcut, output):
    model = make()
    if make is cnn:
        model = _trained_batchnorm(model)
    model.train()
    x = torch.randn(*shape)
    ours = jacobian_norm(model, x, output=output)
    ref = reference(model, x, output)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    # The first-linear-layer shortcut stops the products before the input; otherwise one backward pass pulls
    # back C - 1 rows (softmax) or C (logits) to it.
    rows = rows_pulled_back_to_the_input(model, x, output=output)
    assert rows == (0 if shortcut else num_classes - (output == "softmax"))
    assert model.training  # mode restored


def test_shortcut_and_general_path_agree():
    model = mlp().eval()
    x = torch.randn(6, 3, 4, 4)

    def general(v):  # the same function, but the input is also read by an elementwise op: no shortcut
        return model(v) + 0.0 * v.flatten(1)[:, :1]

    torch.testing.assert_close(jacobian_norm(general, x), jacobian_norm(model, x), rtol=1e-5, atol=1e-7)
    assert rows_pulled_back_to_the_input(general, x) == 7 - 1  # the general path: every row reaches the input
    assert rows_pulled_back_to_the_input(model, x) == 0  # the shortcut: none does


def test_shortcut_sees_weight_updates():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 10)
    before = jacobian_norm(model, x)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    after = jacobian_norm(model, x)
    torch.testing.assert_close(after.double(), reference(model, x), rtol=1e-5, atol=0)
    assert not torch.allclose(before, after)


def test_chunking_and_many_classes():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 1000))
    x = torch.randn(5, 20)
    ref = reference(model, x, "logits")
    for chunk_size in (None, 1, 2):
        torch.testing.assert_close(
            jacobian_norm(model, x, output="logits", chunk_size=chunk_size).double(), ref, rtol=1e-5, atol=0
        )


def test_single_logit_is_a_binary_softmax():
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 6)
    two_class = nn.Sequential(model, nn.Identity())
    z = model(x)[:, 0]
    sigma = torch.sigmoid(z)
    grad = reference(model, x, "logits")  # ||dz/dx||
    expected = 2**0.5 * sigma * (1 - sigma) * grad.float()
    torch.testing.assert_close(jacobian_norm(two_class, x), expected.detach(), rtol=1e-5, atol=1e-8)


class _Ending(nn.Module):
    """An MLP whose ``forward`` ends in ``ending`` (``nn.Softmax``, ``nn.LogSoftmax``, ``nn.Sigmoid``)."""

    def __init__(self, ending: nn.Module, num_outputs: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_outputs))
        self.ending = ending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ending(self.net(x))


def test_probabilities_out_are_measured_as_probabilities_and_log_probabilities_by_the_default():
    """A ``forward`` ending in ``nn.Softmax``: ``output="probabilities"`` is the norm of dp/dx, which is the default's
    value on the same network returning logits; the default on the probabilities is that of a second softmax (far
    smaller). Ending in ``nn.LogSoftmax``: softmax(log p) = p, so the default is already dp/dx."""
    x = torch.randn(7, 8)
    probabilities = _Ending(nn.Softmax(dim=1))
    expected = reference(probabilities, x, "logits")  # ||dp/dx|| of the output itself, float64
    measured = {
        "probabilities": jacobian_norm(probabilities, x, output="probabilities"),
        "logits, the default": jacobian_norm(_Ending(nn.Identity()), x),
        "log-probabilities, the default": jacobian_norm(_Ending(nn.LogSoftmax(dim=1)), x),
    }
    for name, norms in measured.items():
        torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0, msg=name)
    second_softmax = jacobian_norm(probabilities, x)
    assert (second_softmax < 0.5 * expected.float()).all()
    projected = jacobian_norm(probabilities, x, output="probabilities", method="projection", num_projections=6)
    torch.testing.assert_close(projected.double(), expected, rtol=1e-5, atol=0)  # all directions: exact


def test_one_probability_out_is_read_as_two_classes():
    """A ``forward`` ending in ``nn.Sigmoid`` with one column: the classes' probabilities (1 - p, p), whose Jacobian
    norm is sqrt(2) ||dp/dx||, the default's value on the same network returning its logit."""
    x = torch.randn(5, 8)
    sigmoid = _Ending(nn.Sigmoid(), num_outputs=1)
    expected = 2**0.5 * reference(sigmoid, x, "logits")
    norms = jacobian_norm(sigmoid, x, output="probabilities")
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        jacobian_norm(_Ending(nn.Identity(), num_outputs=1), x).double(), expected, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_works_when_autograd_is_off(context):
    model = mlp().eval()
    with torch.inference_mode():
        x_inference = torch.randn(4, 3, 4, 4)
    assert x_inference.is_inference()
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        values = jacobian_norm(model, x_inference)
    assert (values > 0).all()
    torch.testing.assert_close(values.double(), reference(model, x_inference.clone()), rtol=1e-5, atol=0)


def test_touches_no_state():
    model = _trained_batchnorm(cnn())
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 4, 4)
    rng = torch.get_rng_state()
    for method in ("exact", "projection"):
        jacobian_norm(model, x, method=method)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("0."))
    assert model.training and all(m.training for m in model.modules())


def test_partial_eval_modes_are_restored():
    model = mlp()
    model[3].eval()  # a user froze one submodule
    jacobian_norm(model, torch.randn(2, 3, 4, 4))
    assert model.training and not model[3].training


def test_autocast_region_measures_in_full_precision():
    model = mlp()
    x = torch.randn(4, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = jacobian_norm(model, x)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, jacobian_norm(model, x))


def test_projection_is_exact_with_all_directions_and_close_with_few():
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 12))
    x = torch.randn(400, 20)
    exact = jacobian_norm(model, x)
    full = jacobian_norm(model, x, method="projection", num_projections=12)
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-7)
    few = jacobian_norm(
        model, x, method="projection", num_projections=3, generator=torch.Generator().manual_seed(1)
    )
    # Unbiased for the squared norm: the mean of squares agrees to sampling error.
    ratio = few.pow(2).mean() / exact.pow(2).mean()
    assert abs(ratio - 1) < 0.1
    assert not torch.allclose(few, exact)


def test_projection_uses_the_given_generator():
    model = nn.Sequential(nn.Linear(8, 9))
    x = torch.randn(10, 8)
    a = jacobian_norm(
        model, x, method="projection", num_projections=2, generator=torch.Generator().manual_seed(3)
    )
    b = jacobian_norm(
        model, x, method="projection", num_projections=2, generator=torch.Generator().manual_seed(3)
    )
    c = jacobian_norm(
        model, x, method="projection", num_projections=2, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_generator_per_point_gives_each_point_its_own_directions():
    """With a generator per point, a point's estimate does not depend on the points measured with it nor on the
    chunks: each point's value is the one it gets measured alone with its generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(6, 8)

    def seeded(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    alone = torch.cat(
        [jacobian_norm(model, x[i : i + 1], method="projection", num_projections=2, generator=seeded([i])) for i in range(6)]
    )
    together = jacobian_norm(model, x, method="projection", num_projections=2, generator=seeded(range(6)))
    chunked = jacobian_norm(model, x, method="projection", num_projections=2, generator=seeded(range(6)), chunk_size=4)
    some = jacobian_norm(model, x[2:5], method="projection", num_projections=2, generator=seeded(range(2, 5)))
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked, alone, rtol=1e-6, atol=0)
    torch.testing.assert_close(some, alone[2:5], rtol=1e-6, atol=0)
    # one shared generator instead: the points' directions follow one another, and differ from these
    shared = jacobian_norm(model, x, method="projection", num_projections=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(shared, together)
    with pytest.raises(ValueError, match="holds 5 generators for 6 points"):
        jacobian_norm(model, x, method="projection", generator=seeded(range(5)))


def test_callable_and_empty_batch():
    model = mlp()
    values = jacobian_norm(lambda v: model.eval()(v), torch.randn(3, 3, 4, 4))
    assert values.shape == (3,)
    assert jacobian_norm(model, torch.randn(0, 3, 4, 4)).shape == (0,)


def test_errors():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="continuous inputs.*embeddings"):
        jacobian_norm(nn.Embedding(10, 3), torch.tensor([[1, 2]]))
    with pytest.raises(
        ValueError, match=r"logits of shape \[batch, num_classes\].*got \(\d+, 3, 1\).*picks them out"
    ):
        jacobian_norm(lambda v: model(v)[..., None], torch.randn(2, 4))
    with pytest.raises(ValueError, match="`output`"):
        jacobian_norm(model, torch.randn(2, 4), output="probs")
    with pytest.raises(ValueError, match="`method`"):
        jacobian_norm(model, torch.randn(2, 4), method="approx")
    with pytest.raises(ValueError, match="`chunk_size`"):
        jacobian_norm(model, torch.randn(2, 4), chunk_size=0)
    with pytest.raises(ValueError, match="`num_projections`"):
        jacobian_norm(model, torch.randn(2, 4), method="projection", num_projections=0)


def test_projection_is_unbiased_for_the_squared_norm_at_one_point():
    """Many independent estimates at one point average to the exact squared norm (softmax and logits)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12))
    x = torch.randn(1, 6).expand(4000, 6)
    for output in ("softmax", "logits"):
        exact = jacobian_norm(model, x[:1], output=output)[0]
        estimates = jacobian_norm(model, x, output=output, method="projection", num_projections=3)
        assert estimates.std() > 0  # really random
        assert estimates.pow(2).mean().item() == pytest.approx(exact.pow(2).item(), rel=0.05)


def test_return_logits_gives_the_measurement_forward_pass_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(6, 4)
    norms, logits = jacobian_norm(model, x, return_logits=True)
    torch.testing.assert_close(norms, jacobian_norm(model, x))
    torch.testing.assert_close(logits, model(x).detach())


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_one_forward_pass_per_chunk_and_no_probe(make):
    model = _Counting(make())
    x = torch.randn(6, 3, 4, 4)
    jacobian_norm(model, x)
    assert model.calls == 1
    jacobian_norm(model, x, chunk_size=2)
    assert model.calls == 1 + 3


def test_a_failed_input_cut_is_not_tried_again_on_the_same_model():
    model = _Counting(SkipNet())
    x = torch.randn(5, 12)
    first = jacobian_norm(model, x)
    assert model.calls == 2  # cut at the first linear layer, then the skip connection: the whole graph again
    second = jacobian_norm(model, x)
    assert model.calls == 3
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(second.double(), reference(model, x), rtol=1e-5, atol=0)
