"""``count_transitions``: a hand-computed case, exact against dense sampling, streaming, convergence, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sensitivity.functional import (
    NonFiniteOutputError,
    activation_codes,
    count_transitions,
    ellipse_through,
    sampled_transitions,
    trajectory_through,
)


def unit_circle(num_points, radius=1.0):
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    return ellipse_through(
        *(radius * torch.stack([angles.cos(), angles.sin()], dim=1)), num_points=num_points
    )


def lines_network(distances):
    """One hidden ReLU layer on 2-D inputs: unit i is the line at distance ``distances[i]`` from the origin."""
    angles = torch.linspace(0.3, 5.0, len(distances))
    layer = nn.Linear(2, len(distances))
    with torch.no_grad():
        layer.weight.copy_(torch.stack([angles.cos(), angles.sin()], dim=1) * 2.0)
        layer.bias.copy_(-2.0 * torch.tensor(distances))
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(len(distances), 3))


def test_hand_computed_circle():
    # A line at distance d < 1 from the centre cuts the unit circle twice, a farther one never: 3 * 2 crossings.
    model = lines_network([0.0, 0.5, -0.9, 1.2, 3.0])
    circle = unit_circle(600)
    exact = count_transitions(model, circle, method="exact")
    sampled = count_transitions(model, circle)
    assert int(exact) == int(sampled) == 6
    assert exact.regions == 7  # one region per crossing, plus the return to the start
    assert sampled.converged and sampled.transitions_half == 6
    assert sampled.density == pytest.approx(6 / (600 * 2 * math.sin(math.pi / 600)))
    assert exact.density == pytest.approx(sampled.density)


@pytest.mark.parametrize(
    "relu", [F.relu, lambda h: F.relu(h, inplace=True), lambda h: h.clamp(min=0), torch.relu_], ids=str
)
def test_the_same_network_with_functional_relu_counts_the_same(relu):
    class Functional(nn.Module):
        def __init__(self, reference):
            super().__init__()
            self.first, self.last = reference[0], reference[2]

        def forward(self, x):
            return self.last(relu(self.first(x)))

    model = lines_network([0.1, 0.7, 2.0])
    for method in ("exact", "sampled"):
        assert int(count_transitions(Functional(model), unit_circle(600), method=method)) == 4


def test_three_piece_jump_counts_two_and_the_half_count_is_the_evidence():
    points = torch.tensor([[-1.0], [7.0]]).repeat(3, 1)  # ReLU6: pieces 0, 2, 0, 2, 0, 2
    result = count_transitions(nn.ReLU6(), points)
    assert int(result) == 12
    assert result.transitions_half == 0  # every other point: always piece 0
    assert not result.converged and result.resolution == 1.0


def test_the_resolution_is_the_share_of_the_count_that_every_other_point_misses():
    # Along the unit circle z(t) = (cos t, sin t), at 2k = 16 points (every 22.5 degrees) and k = 8 (every 45):
    # unit A is on only within 10 degrees of its normal at 22.5 degrees, an odd point, so it flips on and off
    # between two of the 8 points (missed) and around one of the 16 (found, 2 transitions); unit B's line passes
    # through the centre, crossed at 10 and 190 degrees, found at both.
    normals, distances = torch.tensor([22.5, 100.0]).deg2rad(), torch.tensor([math.cos(math.radians(10)), 0.0])
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([normals.cos(), normals.sin()], dim=1))
        layer.bias.copy_(-distances)
    model = nn.Sequential(layer, nn.ReLU())
    fine = count_transitions(model, unit_circle(16))
    coarse = count_transitions(model, unit_circle(8))
    exact = count_transitions(model, unit_circle(16), method="exact")
    assert (fine.transitions, fine.transitions_half, coarse.transitions) == (4, 2, 2)
    assert fine.resolution == (4 - 2) / 4  # (T_k - T_{k/2}) / T_k
    assert coarse.resolution == 0.0 and coarse.converged  # A is missed at 8 and at 4 alike: no evidence of it
    assert int(exact) == 4 and exact.resolution == 0.0
    # no transition at all: 0, not a division by zero
    assert count_transitions(nn.ReLU(), torch.ones(6, 1)).resolution == 0.0


def random_mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 24), nn.ReLU(),
        nn.Linear(24, 24), nn.ReLU6(),
        nn.Linear(24, 16), nn.LeakyReLU(0.1),
        nn.Linear(16, 16), nn.Hardsigmoid(),
        nn.Linear(16, 4),
    )  # fmt: skip


class RandomCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 2)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        h = nn.functional.hardtanh(self.conv2(h), -0.5, 0.5)
        h = F.max_pool2d(h, 2, stride=1, padding=1, ceil_mode=True)
        return self.fc(h.flatten(1)[:, :24])


@pytest.mark.parametrize("make, shape", [(random_mlp, (3, 4)), (RandomCNN, (1, 6, 6))])
def test_exact_equals_dense_sampling(make, shape):
    model = make()
    if isinstance(model, RandomCNN):
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    curve = ellipse_through(*torch.randn(3, *shape), num_points=600)
    exact = count_transitions(model, curve, method="exact")
    assert exact.transitions > 20
    dense = count_transitions(model, curve, num_points=60_000, chunk_size=8192)
    assert dense.converged
    assert int(dense) == int(exact)
    coarse = count_transitions(model, curve, num_points=60)
    assert coarse.transitions <= exact.transitions  # coarse sampling misses crossings, never invents them


def test_streaming_does_not_change_the_count_and_segments_add_up():
    model, curve = random_mlp(), ellipse_through(*torch.randn(3, 3, 4), num_points=2000)
    whole = count_transitions(model, curve, chunk_size=4096, return_segments=True)
    chunked = count_transitions(model, curve, chunk_size=37, return_segments=True)  # odd: rounded up to even
    on_points = count_transitions(model, curve.points, chunk_size=100)
    assert int(whole) == int(chunked) == int(on_points)
    assert whole.transitions_half == chunked.transitions_half == on_points.transitions_half
    assert chunked.arc_length == pytest.approx(whole.arc_length) and on_points.arc_length == pytest.approx(
        whole.arc_length
    )
    assert torch.equal(whole.segments, chunked.segments)
    assert whole.segments.shape == (2000,) and int(whole.segments.sum()) == int(whole)


def test_the_model_and_the_global_random_state_are_untouched():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = ellipse_through(*torch.randn(3, 3), num_points=100)
    state = torch.get_rng_state()
    counts = {int(count_transitions(model, curve, method=m)) for m in ("exact", "sampled")}
    assert len(counts) == 1  # dropout is off: both methods see the same network
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_outputs_that_are_not_a_classifiers_are_fine():
    model = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Unflatten(1, (5, 1)))  # output [B, 5, 1]
    assert int(count_transitions(model, unit_circle(100), method="exact")) >= 0


def test_bad_input():
    circle = unit_circle(100)
    with pytest.raises(ValueError, match="tanh"):
        count_transitions(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), circle)
    with pytest.raises(ValueError, match="tanh"):
        count_transitions(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), circle, method="exact")
    with pytest.raises(ValueError, match="not affine"):
        count_transitions(
            nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU()), circle, method="exact"
        )
    with pytest.raises(ValueError, match="even number of at least 6"):
        count_transitions(nn.ReLU(), circle, num_points=7)
    with pytest.raises(ValueError, match="even number of at least 6"):
        count_transitions(nn.ReLU(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="pass a Trajectory"):
        count_transitions(nn.ReLU(), circle.points, method="exact")
    with pytest.raises(ValueError, match="ellipses"):
        count_transitions(nn.ReLU(), trajectory_through(torch.randn(4, 2), 100), method="exact")
    with pytest.raises(ValueError, match="method"):
        count_transitions(nn.ReLU(), circle, method="dense")


def test_inside_an_autocast_region_the_count_is_the_full_precision_one():
    model, curve = random_mlp(), ellipse_through(*torch.randn(3, 3, 4) * 3, num_points=512)
    outside = count_transitions(model, curve)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = count_transitions(model, curve)
        inside_exact = count_transitions(model, curve, method="exact")
    assert int(inside) == int(outside) == int(inside_exact)
    assert inside.density == pytest.approx(outside.density, rel=1e-6)


@pytest.mark.parametrize("method", ["sampled", "exact"])
def test_nan_weights_raise_instead_of_counting_zero(method):
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    curve = ellipse_through(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0]), 64)
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite"):
        count_transitions(model, curve, method=method)


def naive_counts(model, points):
    """T_k, T_{k/2} and the per-segment counts from the codes of all points at once, compared unit by unit."""
    codes = activation_codes(model, points)
    pieces, winners = codes.pieces.long(), codes.winners.long()
    following = torch.roll(torch.arange(len(points)), -1)

    def steps(index, after):
        return (pieces[index] - pieces[after]).abs().sum(1) + (winners[index] != winners[after]).sum(1)

    segments = steps(torch.arange(len(points)), following)
    even = torch.arange(0, len(points), 2)
    return int(segments.sum()), int(steps(even, torch.roll(even, -1)).sum()), segments


@pytest.mark.parametrize("make, shape", [(random_mlp, (3, 4)), (RandomCNN, (1, 6, 6))])
@pytest.mark.parametrize("compare_bytes", [1, 1 << 20])
@pytest.mark.parametrize("chunk_size", [6, 64, 5000])
def test_streamed_count_equals_a_naive_count_on_all_points(
    monkeypatch, make, shape, compare_bytes, chunk_size
):
    # A tiny comparison buffer forces a comparison (and a move of the last two rows) after every chunk.
    monkeypatch.setattr(sampled_transitions, "_COMPARE_BYTES", compare_bytes)
    torch.manual_seed(1)
    model = make().eval()
    curve = ellipse_through(*torch.randn(3, *shape), num_points=1000)
    total, half, segments = naive_counts(model, curve.points)
    result = count_transitions(model, curve, chunk_size=chunk_size, return_segments=True)
    assert (result.transitions, result.transitions_half) == (total, half)
    assert total > 20
    assert torch.equal(result.segments.long(), segments)


@pytest.mark.parametrize("num_points", [998, 1024])
@pytest.mark.parametrize("length_bytes", [1, 1 << 22])
def test_arc_length_of_points_equals_the_trajectory_formula(monkeypatch, length_bytes, num_points):
    # A tiny block size measures the points' length in blocks of one chunk (998 = 15 * 64 + 38: a short last block;
    # 1024 = 16 * 64: the closing segment in a block of its own size).
    monkeypatch.setattr(sampled_transitions, "_LENGTH_BYTES", length_bytes)
    curve = trajectory_through(torch.randn(5, 3, 4, dtype=torch.float64), num_points=num_points)
    on_points = count_transitions(random_mlp().double(), curve.points, chunk_size=64)
    on_curve = count_transitions(random_mlp().double(), curve, chunk_size=64)
    points = curve.points.flatten(1)
    polygon = float((torch.roll(points, -1, 0) - points).norm(dim=1).sum())
    assert on_points.arc_length == pytest.approx(polygon, rel=1e-12)
    assert on_curve.arc_length == pytest.approx(polygon, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_single_infinite_output_is_caught_and_large_finite_ones_are_not(dtype):
    huge = torch.finfo(dtype).max / 2
    points = torch.randn(64, 2, dtype=torch.float32)

    def model(x, bad=None):
        out = (F.relu(x) + 1).reciprocal().to(dtype) * huge  # in (huge / 2, huge]: finite, their sum is not
        if bad is not None:
            out[len(x) // 2, 0] = bad
        return out

    assert torch.isinf(model(points).sum())
    assert count_transitions(model, points, chunk_size=16).transitions > 0
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(NonFiniteOutputError):
            count_transitions(lambda x, bad=bad: model(x, bad), points, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [64, 100, 250, 10_000])
def test_counting_curves_together_equals_counting_each(chunk_size):
    # The monitor counts its curves together, several per forward pass (one by one when a curve exceeds a chunk).
    torch.manual_seed(2)
    model = RandomCNN().eval()
    curves = [ellipse_through(*torch.randn(3, 1, 6, 6), num_points=96) for _ in range(5)]
    together = count_transitions(model, curves, chunk_size=chunk_size, return_segments=True)
    for curve, result in zip(curves, together, strict=True):
        alone = count_transitions(model, curve, return_segments=True)
        assert (result.transitions, result.transitions_half) == (alone.transitions, alone.transitions_half)
        assert torch.equal(result.segments, alone.segments) and result.arc_length == alone.arc_length
    assert sum(result.transitions for result in together) > 20


def test_a_sequence_of_curves_with_different_lengths_or_exact_is_counted_one_by_one():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    curves = [ellipse_through(*torch.randn(3, 2), num_points=n) for n in (64, 128)]
    for method in ("sampled", "exact"):
        results = count_transitions(model, curves, method=method)
        assert [int(r) for r in results] == [int(count_transitions(model, c, method=method)) for c in curves]
        assert all(r.segments is None for r in results)
    with pytest.raises(TypeError, match="Trajectory"):
        count_transitions(model, [curves[0].points])


def test_on_the_cpu_a_pass_holds_as_many_points_as_its_largest_unit_layer_allows():
    """A unit layer of 64 x 32 x 32 entries takes 256 KiB a point: after the first pass, a pass holds at most 64
    points (16 MiB), whatever ``chunk_size`` allows, and the counts are those of small chunks."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    curves = [ellipse_through(*torch.randn(3, 1, 32, 32), num_points=32) for _ in range(6)]
    long_curve = ellipse_through(*torch.randn(3, 1, 32, 32), num_points=400)

    together = count_transitions(model, curves, chunk_size=1024)
    assert sizes == [32, 64, 64, 32]  # one curve, then two curves a pass
    sizes.clear()
    streamed = count_transitions(model, long_curve, chunk_size=256, return_segments=True)
    assert sizes == [256, 64, 64, 16]
    sizes.clear()
    reference = count_transitions(model, long_curve, chunk_size=16, return_segments=True)
    assert torch.equal(streamed.segments, reference.segments) and streamed.transitions > 0
    for curve, result in zip(curves, together, strict=True):
        assert result.transitions == count_transitions(model, curve, chunk_size=32).transitions
    sizes.clear()
    longer = [ellipse_through(*torch.randn(3, 1, 32, 32), num_points=96) for _ in range(3)]
    counts = count_transitions(model, longer, chunk_size=1024)  # a curve is more than a pass holds: one a pass
    assert sizes == [96, 96, 96] and len(counts) == 3
