"""A convolution of the measured input into one channel, or over patches that do not overlap: on the CPU
``jacobian_norm`` pulls its rows back to the input as a matrix product with the kernel and a ``fold`` (faster there
than the transposed convolution, which is the faster one for several channels under overlapping windows); values and
logits must be those of the model as it is, for every geometry the shortcut takes and those it leaves alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import jacobian_norm
from tests.functional._operators import OperatorRecorder
from tests.functional.test_jacobian import reference


class _Net(nn.Module):
    def __init__(self, first: nn.Conv2d, size: int, skip: bool = False) -> None:
        super().__init__()
        self.first = first
        self.skip = skip
        with torch.no_grad():
            features = first(torch.zeros(1, first.in_channels, size, size)).numel()
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(features, 6))
        self.extra = nn.Linear(first.in_channels * size * size, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.first(x))
        # a second use of the input: its gradient adds to the convolution's
        return z + self.extra(x.flatten(1)) if self.skip else z


def _ran(recorder: OperatorRecorder, operator: str) -> bool:
    return any(name.split(".")[0] == operator for name in recorder.names)


CASES = {
    "3x3-pad-1": (nn.Conv2d(1, 8, 3, padding=1), 12, False),
    "one-channel-7x7-stride-2": (nn.Conv2d(1, 8, 7, stride=2, padding=3), 15, False),
    "patches-stride-2-odd-size": (nn.Conv2d(2, 4, 2, stride=2), 9, False),
    "patch-embedding-4x4": (nn.Conv2d(3, 6, 4, stride=4), 12, False),
    "one-channel-dilation-2-no-bias": (nn.Conv2d(1, 5, 3, dilation=2, padding=(2, 1), bias=False), 11, False),
    "dilated-patches-no-overlap": (nn.Conv2d(2, 4, 2, stride=3, dilation=2), 11, False),
    "rectangular-patches": (nn.Conv2d(2, 4, (3, 2), stride=(3, 2)), 10, False),
    "skip-on-input": (nn.Conv2d(1, 4, 3, padding=1), 8, True),
}
UNCHANGED = {
    "groups-2": (nn.Conv2d(2, 4, 3, groups=2), 8, False),
    "padding-same": (nn.Conv2d(2, 4, 3, padding="same"), 8, False),
    "padding-reflect": (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), 8, False),
    # several channels under overlapping windows: the transposed convolution is the faster one
    "resnet-stem-7x7-stride-2": (nn.Conv2d(3, 8, 7, stride=2, padding=3), 15, False),
    "rgb-3x3-pad-1": (nn.Conv2d(3, 8, 3, padding=1), 12, False),
    "dilated-windows-overlap": (nn.Conv2d(2, 4, 2, stride=2, dilation=2), 11, False),
    "rectangular-overlapping-rows": (nn.Conv2d(2, 4, (3, 2), stride=(2, 2)), 10, False),
}


@pytest.mark.parametrize("case", [*CASES, *UNCHANGED])
def test_values_and_logits_are_the_models(case):
    torch.manual_seed(0)
    first, size, skip = {**CASES, **UNCHANGED}[case]
    model = _Net(first, size, skip).eval()
    x = torch.randn(5, first.in_channels, size, size)
    norms, logits = jacobian_norm(model, x, return_logits=True)
    torch.testing.assert_close(norms.double(), reference(model, x), rtol=2e-5, atol=0)
    with torch.no_grad():
        assert torch.equal(logits, model(x))
    logit_norms = jacobian_norm(model, x, output="logits")
    torch.testing.assert_close(logit_norms.double(), reference(model, x, "logits"), rtol=2e-5, atol=0)


@pytest.mark.parametrize(("case", "folded"), [*[(c, True) for c in CASES], *[(c, False) for c in UNCHANGED]])
def test_the_fold_runs_where_it_applies(case, folded):
    torch.manual_seed(0)
    first, size, skip = {**CASES, **UNCHANGED}[case]
    model = _Net(first, size, skip).eval()
    with OperatorRecorder() as recorder:
        jacobian_norm(model, torch.randn(3, first.in_channels, size, size))
    assert _ran(recorder, "col2im") == folded
    # the convolution's own backward then never runs
    assert _ran(recorder, "convolution_backward") != folded


def test_a_deeper_convolution_keeps_its_own_backward():
    # Only a convolution of the input itself is rewritten: the second one takes the operator's backward.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(4, 1, 10, 10)
    with OperatorRecorder() as recorder:
        norms = jacobian_norm(model, x)
    assert sum(name.startswith("col2im") for name in recorder.names) == 1
    assert _ran(recorder, "convolution_backward")
    torch.testing.assert_close(norms.double(), reference(model, x), rtol=2e-5, atol=0)


def test_a_functional_call_with_keyword_geometry():
    torch.manual_seed(0)
    weight = torch.randn(4, 2, 3, 3)

    def model(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight=weight, stride=2, padding=1).relu().flatten(1)[:, :5]

    x = torch.randn(3, 2, 7, 7)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None]).softmax(-1)[0]))(x)
    torch.testing.assert_close(jacobian_norm(model, x), jac.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)


class _InputDependentKernel(nn.Module):
    """A convolution whose kernel and bias are computed from the input (a hypernetwork), before a batch norm
    whose scale is also computed from it: the input's gradient flows through the kernel and the scale as well."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Linear(2 * 6 * 6, 4 * 2 * 3 * 3)
        self.norm = nn.BatchNorm2d(4).eval()
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.kernel(x.flatten(1)).mean(0).view(4, 2, 3, 3)
        h = F.conv2d(x, weight, weight.sum() * torch.ones(4))
        scale = 1 + x.mean() * torch.ones(4)
        h = F.batch_norm(h, self.norm.running_mean, self.norm.running_var, scale, None, False)
        return self.head(h.relu().flatten(1))


def test_a_kernel_computed_from_the_input_keeps_its_gradient():
    # Both shortcuts give no gradient through the kernel or the scale: where those are computed in the graph
    # (not parameters), the operators' own backwards run, and the values equal autograd's.
    torch.manual_seed(0)
    model = _InputDependentKernel()
    x = torch.randn(3, 2, 6, 6)
    # One point per chunk: the kernel is then a function of that point alone, and the reference is its own Jacobian.
    norms = jacobian_norm(model, x, chunk_size=1)
    reference = []
    for point in x:
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None]).softmax(-1)[0], point)
        reference.append(jac.flatten().norm())
    torch.testing.assert_close(norms, torch.stack(reference), rtol=1e-4, atol=1e-7)
