"""``jacobian_penalty``: its value and its gradient with respect to the parameters, against independent references.

The references differentiate twice through ``torch.func`` (``grad`` of the mean of ``vmap(jacrev)``'s squared
entries, the model called by ``functional_call``): nothing of the package is in them. At confident points the
reference is the accurate one of the precision tests (the logits' Jacobian times the softmax factor formed
analytically in float64), differentiated the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from benchmarks.jacobian import digits_mlp, fit_full_batch
from lightning_sensitivity.functional import jacobian_norm, jacobian_penalty
from tests._compiled import GraphCalls


def mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def mlp_first_layer_narrower() -> nn.Module:
    """The input meets a linear layer with fewer outputs than inputs: the products stop there (a Gram matrix)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))


def cnn_batch_norm() -> nn.Module:
    """Convolution, batch norm (measured on perturbed running statistics), max pooling, GELU."""
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 2.0)
    return net


def binary() -> nn.Module:
    """One logit: the binary classifier whose softmax is that of the logits (0, z)."""
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def inputs_for(name: str, dtype: torch.dtype) -> Tensor:
    shapes = {"mlp_tanh": (5, 6), "mlp_first_layer_narrower": (5, 3, 4), "cnn_batch_norm": (5, 1, 6, 6), "binary": (5, 6)}
    return torch.randn(*shapes[name], dtype=dtype)


MODELS: dict[str, Callable[[], nn.Module]] = {
    f.__name__: f for f in (mlp_tanh, mlp_first_layer_narrower, cnn_batch_norm, binary)
}


def reference(model: nn.Module, x: Tensor, output: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The penalty and its gradient by ``torch.func``: ``grad`` of the mean squared entries of the per-point
    Jacobians ``vmap(jacrev)``, the model in eval mode (as the penalty runs it)."""
    model = copy.deepcopy(model).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def penalty(p: dict[str, Tensor]) -> Tensor:
        def out(point: Tensor) -> Tensor:
            z = torch.func.functional_call(model, (p, buffers), (point[None],))[0]
            if z.shape[0] == 1:
                z = torch.cat([torch.zeros_like(z), z])
            return z.softmax(-1) if output == "softmax" else z

        return torch.func.vmap(torch.func.jacrev(out))(x).pow(2).sum() / x.shape[0]

    return penalty(params), torch.func.grad(penalty)(params)


def gradients(model: nn.Module, penalty: Tensor) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(penalty, list(named.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(named, grads, strict=True))


def relative(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "name, output", [(name, output) for name in MODELS for output in ("softmax", "logits") if name != "binary"]
    + [("binary", "softmax")],
)
def test_exact_penalty_and_its_parameter_gradient_equal_double_backward_through_torch_func(name, output, dtype):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    x = inputs_for(name, dtype)
    expected, expected_grads = reference(model, x, output)

    penalty = jacobian_penalty(model, x, output=output, method="exact")
    grads = gradients(model, penalty)

    assert penalty.dtype == dtype and penalty.requires_grad
    assert float(penalty.detach()) == pytest.approx(float(expected), rel=1e-5)
    for key, grad in grads.items():
        if expected_grads[key].abs().max() == 0:  # the logits' last bias does not enter their Jacobian
            assert grad.abs().max() == 0, key
        else:
            assert relative(grad, expected_grads[key]) < 1e-5, key


def test_the_gradient_reaches_the_first_layer_through_its_gram_matrix_and_its_bias():
    """The products stop at the first linear layer; its weight still gets the gradient of ``W W^T`` and of the
    activations it feeds (and its bias the latter: zero for ReLU nets, not for tanh)."""
    torch.manual_seed(0)
    model = mlp_first_layer_narrower().double()
    x = inputs_for("mlp_first_layer_narrower", torch.float64)
    _, expected = reference(model, x, "softmax")
    grads = gradients(model, jacobian_penalty(model, x, method="exact"))
    assert expected["1.bias"].abs().max() > 1e-5
    assert relative(grads["1.weight"], expected["1.weight"]) < 1e-10
    assert relative(grads["1.bias"], expected["1.bias"]) < 1e-10


@pytest.fixture(scope="module")
def confident_mlp() -> tuple[nn.Module, Tensor]:
    """The digits MLP trained, its last layer scaled to a median logit margin of 10 on its training points, and
    its six most confident held-out points (squared norms about 1e-16 to 1e-13)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = fit_full_batch(digits_mlp(), x[:1200], y[:1200], steps=100)
    with torch.no_grad():
        top2 = model(x[:1200]).topk(2, dim=1).values
        factor = 10.0 / (top2[:, 0] - top2[:, 1]).median()
        model[-1].weight.mul_(factor)
        model[-1].bias.mul_(factor)
        top2 = model(x[1200:1500]).topk(2, dim=1).values
    return model, x[1200:1500][(top2[:, 0] - top2[:, 1]).argsort(descending=True)[:6]]


def accurate_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The softmax penalty and its gradient in float64 with the softmax factor ``diag(p) - p p^T`` formed
    analytically (its confident diagonal entry ``p_m (1 - p_m)`` with ``1 - p_m`` the sum of the others), times
    the logits' Jacobian, differentiated by ``torch.func.grad``."""
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def penalty(p: dict[str, Tensor]) -> Tensor:
        jz = torch.func.vmap(torch.func.jacrev(lambda v: torch.func.functional_call(model, p, (v[None],))[0]))(x)
        probs = torch.func.functional_call(model, p, (x,)).softmax(dim=1)
        top = probs.argmax(dim=1)
        others = probs.scatter(1, top[:, None], 0.0).sum(dim=1)
        one_hot = F.one_hot(top, probs.shape[1]).double()
        factor = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        # the top diagonal entry p_m - p_m^2 replaced by p_m * (sum of the others)
        factor = factor + torch.diag_embed(one_hot * (probs * others[:, None] - (probs - probs.square())))
        return (factor @ jz.flatten(2)).pow(2).sum() / x.shape[0]

    return penalty(params), torch.func.grad(penalty)(params)


def through_the_softmax(model: nn.Module, x: Tensor) -> Tensor:
    """The penalty as public code computes it: every class's input gradient of the probabilities, in float32,
    with ``create_graph=True``."""
    x = x.clone().requires_grad_(True)
    p = model(x).softmax(-1)
    rows = [torch.autograd.grad(p[:, c].sum(), x, create_graph=True)[0] for c in range(p.shape[1])]
    return sum(row.pow(2).sum() for row in rows) / x.shape[0]


def test_at_confident_points_each_points_penalty_and_gradient_keep_their_digits(confident_mlp):
    model, points = confident_mlp
    for point in points.split(1):
        expected, expected_grads = accurate_reference(model, point)
        assert 1e-18 < expected < 1e-12
        ours = jacobian_penalty(model, point, method="exact")
        grads = gradients(model, ours)
        assert float(ours.detach()) == pytest.approx(float(expected), rel=2e-5)
        assert all(relative(grads[k], expected_grads[k]) < 2e-5 for k in grads)
        # what the accuracy is for: float32 autograd through the softmax loses 1 - p_m here
        naive_grads = gradients(model, through_the_softmax(model, point))
        assert max(relative(naive_grads[k], expected_grads[k]) for k in grads) > 0.1


def exact_rest_variance(model: nn.Module, x: Tensor, output: str, k: int) -> float:
    """The variance the docstring states, from the exact per-point Jacobians: the rows of the ``floor(K/2)`` most
    probable classes exact (softmax), the other ``n`` through ``m`` orthonormal directions."""
    def out(point: Tensor) -> Tensor:
        z = model(point[None])[0]
        return z.softmax(-1) if output == "softmax" else z

    jac = torch.func.vmap(torch.func.jacrev(out))(x).flatten(2).detach()
    with torch.no_grad():
        order = model(x).argsort(dim=1, descending=True)
    c = jac.shape[1]
    t = min(k // 2, c - 1) if output == "softmax" and k < c else 0
    n, m = c - t, min(k, c) - t
    total = 0.0
    for b in range(len(x)):
        rest = jac[b][order[b, t:]]
        gram = rest @ rest.T
        spread = torch.trace(gram @ gram) - torch.trace(gram) ** 2 / n
        total += float(2 * n * (n - m) / (m * (n - 1) * (n + 2)) * spread)
    return total / len(x) ** 2


@pytest.mark.parametrize("output, k", [("logits", 1), ("logits", 3), ("softmax", 1), ("softmax", 2), ("softmax", 5)])
def test_projection_is_unbiased_with_the_stated_variance_and_its_gradient_is_unbiased(output, k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 7)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = jacobian_penalty(model, x, output=output, method="exact")
    exact_grads = gradients(model, exact)
    variance = exact_rest_variance(model, x, output, k)
    generator = torch.Generator().manual_seed(1)
    draws = 1500
    values, grads = [], []
    for _ in range(draws):
        estimate = jacobian_penalty(model, x, output=output, num_projections=k, generator=generator)
        values.append(estimate.detach())
        grads.append(torch.cat([g.flatten() for g in gradients(model, estimate).values()]))
    values_t, grads_t = torch.stack(values), torch.stack(grads)
    # unbiased: the mean of the draws within 4.5 standard errors of the exact value, for the value and for every
    # entry of the gradient (about 200 entries: a 4.5-sigma band keeps them all by chance with probability 0.999)
    assert abs(float(values_t.mean() - exact.detach())) < 4.5 * math.sqrt(variance / draws)
    expected = torch.cat([g.flatten() for g in exact_grads.values()])
    spread = grads_t.std(dim=0).clamp_min(1e-12)
    assert ((grads_t.mean(dim=0) - expected).abs() / (spread / math.sqrt(draws))).max() < 4.5
    # the stated variance (the sample variance of 1500 draws is within about 10% of it)
    assert float(values_t.var()) == pytest.approx(variance, rel=0.2)


@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_first_layer_narrower"])
def test_projection_with_all_directions_is_exact_in_value_and_gradient(name):
    """At K = C the orthonormal directions span the classes. (With the narrower first layer, K B = 20 rows exceed
    its 5 outputs: the projection stops there too, through W W^T.)"""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x = inputs_for(name, torch.float64)
    for output in ("softmax", "logits"):
        exact = jacobian_penalty(model, x, output=output, method="exact")
        full = jacobian_penalty(model, x, output=output, num_projections=4, generator=torch.Generator().manual_seed(3))
        assert float(full.detach()) == pytest.approx(float(exact.detach()), rel=1e-12)
        expected = gradients(model, exact)
        assert all(relative(g, expected[k]) < 1e-10 for k, g in gradients(model, full).items() if expected[k].any())


def test_generator_draws_reproducibly_and_the_default_stream_moves_on():
    torch.manual_seed(0)
    model, x = mlp_tanh(), torch.randn(8, 6)
    first = jacobian_penalty(model, x, generator=torch.Generator().manual_seed(5))
    again = jacobian_penalty(model, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    # without a generator, each call (each training step) draws new directions
    assert not torch.equal(jacobian_penalty(model, x), jacobian_penalty(model, x))


def test_the_penalty_leaves_grads_modes_buffers_and_the_global_random_stream_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[3].eval()  # a part frozen in eval mode on purpose stays so
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(16, 6)
    state = torch.get_rng_state()
    penalty = jacobian_penalty(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert model.training and not model[3].training
    penalty.backward()  # the user's backward is what fills .grad
    assert all(p.grad is not None for p in model[:2].parameters())


def test_the_penalty_runs_in_eval_mode_as_the_measurement_does():
    """Dropout off and batch norm on its running statistics: equal to the exact squared Jacobian norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model(torch.randn(64, 6))  # running statistics away from their initial values
    x = torch.randn(16, 6)
    penalty, logits = jacobian_penalty(model, x, method="exact", return_logits=True)
    assert float(penalty.detach()) == pytest.approx(float(jacobian_norm(model, x).square().mean()), rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(logits, copy.deepcopy(model).eval()(x), atol=1e-6)
    assert logits.requires_grad  # usable as the loss's logits


def test_inside_autocast_the_penalty_is_the_full_precision_one():
    torch.manual_seed(0)
    model, x = mlp_tanh(), torch.randn(8, 6)
    outside = jacobian_penalty(model, x, method="exact")
    outside_grads = gradients(model, outside)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = jacobian_penalty(model, x, method="exact")
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)
    assert all(torch.equal(g, outside_grads[k]) for k, g in gradients(model, inside).items())


def test_a_compiled_model_is_penalised_through_its_eager_original_with_the_same_parameters():
    torch.manual_seed(0)
    net = cnn_batch_norm()
    backend = GraphCalls()
    compiled = torch.compile(net, backend=backend)
    x = inputs_for("cnn_batch_norm", torch.float32)
    compiled(x)
    calls = backend.calls
    penalty = jacobian_penalty(compiled, x, method="exact")
    assert backend.calls == calls  # the compiled graph did not run
    expected = jacobian_penalty(net, x, method="exact")
    assert torch.equal(penalty, expected)
    assert all(torch.equal(g, e) for g, e in zip(gradients(net, penalty).values(), gradients(net, expected).values(), strict=True))


def test_empty_batch_and_bad_arguments():
    model = mlp_tanh()
    assert float(jacobian_penalty(model, torch.zeros(0, 6)).detach()) == 0.0
    with pytest.raises(TypeError, match="continuous inputs"):
        jacobian_penalty(model, torch.zeros(2, 6, dtype=torch.long))
    for kwargs in ({"output": "probabilities"}, {"method": "sampled"}, {"num_projections": 0}):
        with pytest.raises(ValueError):
            jacobian_penalty(model, torch.zeros(2, 6), **kwargs)
    with pytest.raises(ValueError, match=r"\[batch, num_classes\]"):
        jacobian_penalty(nn.Identity(), torch.zeros(2, 3, 4))


class _Checkpointed(nn.Module):
    """An MLP whose hidden block runs through ``torch.utils.checkpoint`` in every mode."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(6, 8), nn.Linear(8, 3)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.last(checkpoint(self.block, self.first(x), use_reentrant=self.reentrant))


def test_a_non_reentrant_checkpoint_is_penalised_as_the_plain_model_and_a_reentrant_one_fails_saying_what_to_set():
    x = torch.randn(5, 6)
    plain = _Checkpointed(reentrant=False)
    penalty = jacobian_penalty(plain, x, method="exact")
    (grad,) = torch.autograd.grad(penalty, plain.first.weight)
    expected = jacobian_norm(lambda v: plain.last(plain.block(plain.first(v))), x).square().mean()
    assert torch.allclose(penalty, expected.to(penalty.dtype), rtol=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        jacobian_penalty(_Checkpointed(reentrant=True), x)
