"""How well the sampled transition count is resolved, against the points per curve, on real-sized networks.

    python -m benchmarks.transitions --resolution --data-file ../shared/data/cifar10-subset.npz
    python -m benchmarks.transitions --resolution --quick       # digits scaled to 32 x 32, fewer points and curves

For an MLP (3072-512-512-512-10), a small CNN (two 3x3 convolutions of 32 and 64 channels with ReLU and 2x2
max-pooling) and torchvision's ``resnet18`` (10 classes), all on 3 x 32 x 32 inputs, each untrained and trained on the
data set: along ``--curves`` ellipses through training points (on the manifold) and as many through Gaussian
anchors with the data's per-feature mean and standard deviation (off the manifold, ``TransitionMonitor``'s default),
the sampled count at k = 64 ... 4096 points and its resolution :math:`(T_k - T_{k/2}) / T_k`
(``TransitionCount.resolution``), the mean and the largest over the curves. The miss of :math:`T_k` is measured
against the exact count where it is affordable (the MLP), and against :math:`T_{4096}` otherwise (a lower bound
of the miss: :math:`T_{4096}` itself can only be below the true count).

The exact count is timed whole on the MLP. On the CNN and on ``resnet18`` (eval-mode batch norm, max-pooling,
residual sums) it is checked against a float64 sampled count on a short ellipse, and timed over its first
``--exact-regions`` regions of an on-manifold ellipse; the time of the whole ellipse is extrapolated from the
regions it would visit (about :math:`T_{4096}`).

``--data-file``: an ``.npz`` with ``train_images`` ``[N, 3, 32, 32]`` (``uint8``, or floats in [0, 1]) and
``train_labels`` ``[N]``, like the CIFAR-10 subset; without it, scikit-learn's digits, each pixel repeated 4 x 4 in 3
channels. Every input is standardized per channel. Timings are of this run, on this machine (indicative on a shared
one).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from benchmarks.transitions import small_cnn
from examples.digits import load_digits_tensors
from lightning_sensitivity.functional import Trajectory, count_transitions, ellipse_through, gaussian_anchors

KS = (64, 128, 256, 512, 1024, 2048, 4096)


def load_images(path: str | None) -> tuple[Tensor, Tensor, str]:
    """Training images ``[N, 3, 32, 32]`` standardized per channel, their labels, and a name for the data."""
    if path is None:
        x, y, _, _ = load_digits_tensors()
        x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(-1, 3, -1, -1)
        name = "digits scaled to 3 x 32 x 32"
    else:
        data = np.load(path)
        x = torch.as_tensor(data["train_images"])
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        y = torch.as_tensor(data["train_labels"]).long()
        name = f"{path} ({len(x)} training images)"
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    return ((x - mean) / std).contiguous(), y, name


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in in (3072, 512, 512):
        layers += [nn.Linear(width_in, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP 3072-512-512-512-10": mlp,
    "small CNN 32-64 channels": lambda: small_cnn(3, 32, (32, 64)),
    "resnet18 (torchvision)": lambda: torchvision.models.resnet18(num_classes=10),
}
#: Training epochs (Adam, learning rate 1e-3, batches of 128): enough to fit most of the training set.
EPOCHS = {"MLP 3072-512-512-512-10": 20, "small CNN 32-64 channels": 15, "resnet18 (torchvision)": 10}


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in x.split(512)]).eq(y).float().mean())


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    """Adam on cross-entropy, shuffled batches of 128; in train mode (batch norm on batch statistics)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@dataclass
class Row:
    model: str
    state: str
    kind: str
    counts: dict[int, list[int]]  # k -> T_k of every curve
    resolutions: dict[int, list[float]]  # k -> resolution of every curve
    seconds: dict[int, float]  # k -> the median time of one curve's count
    exact: list[int] | None = None  # the exact count of every curve, where measured
    exact_seconds: float | None = None  # the median time of one curve's exact count


def measure(model: nn.Module, name: str, state: str, curves: dict[str, list], ks: tuple[int, ...], exact: bool) -> list[Row]:
    rows = []
    for kind, kind_curves in curves.items():
        row = Row(name, state, kind, {}, {}, {})
        for k in ks:
            results, seconds = [], []
            for curve in kind_curves:
                start = time.perf_counter()
                results.append(count_transitions(model, curve, num_points=k))
                seconds.append(time.perf_counter() - start)
            row.counts[k] = [r.transitions for r in results]
            row.resolutions[k] = [r.resolution for r in results]
            row.seconds[k] = statistics.median(seconds)
        if exact:
            row.exact, seconds = [], []
            for curve in kind_curves:
                start = time.perf_counter()
                row.exact.append(count_transitions(model, curve, method="exact").transitions)
                seconds.append(time.perf_counter() - start)
            row.exact_seconds = statistics.median(seconds)
        rows.append(row)
        print(f"   measured {name}, {state}, {kind}", flush=True)
    return rows


def print_tables(rows: list[Row], ks: tuple[int, ...]) -> None:
    header = "   " + f"{'model':26s} {'state':9s} {'curves':12s} {'T':>8s}  " + "  ".join(f"{k:>11d}" for k in ks)
    print("\n1. Resolution (T_k - T_{k/2}) / T_k, in %: mean over the curves [largest]")
    print(header)
    for r in rows:
        cells = [f"{100 * statistics.mean(r.resolutions[k]):5.2f} [{100 * max(r.resolutions[k]):4.2f}]" for k in ks]
        top = statistics.mean(r.exact) if r.exact else statistics.mean(r.counts[ks[-1]])
        print(f"   {r.model:26s} {r.state:9s} {r.kind:12s} {top:8.0f}  " + "  ".join(f"{c:>11s}" for c in cells))
    print(
        "\n2. Miss of T_k, in %: (T_ref - T_k) / T_ref for the mean counts, with T_ref the exact count (exact) or "
        f"T_{ks[-1]} (sampled)"
    )
    print("   " + f"{'model':26s} {'state':9s} {'curves':12s} {'T_ref':>9s}  " + "  ".join(f"{k:>7d}" for k in ks))
    for r in rows:
        reference = statistics.mean(r.exact) if r.exact else statistics.mean(r.counts[ks[-1]])
        label = "exact" if r.exact else "sampled"
        cells = [f"{100 * (reference - statistics.mean(r.counts[k])) / reference:7.2f}" for k in ks]
        print(f"   {r.model:26s} {r.state:9s} {r.kind:12s} {reference:9.0f}  " + "  ".join(cells) + f"  ({label})")
    print("\n3. Seconds per curve of the sampled count, and of the exact count where measured (medians; indicative)")
    print("   " + f"{'model':26s} {'state':9s} {'curves':12s}  " + "  ".join(f"{k:>7d}" for k in ks) + "    exact")
    for r in rows:
        exact = f"  {r.exact_seconds:7.2f}" if r.exact_seconds is not None else ""
        print(f"   {r.model:26s} {r.state:9s} {r.kind:12s}  " + "  ".join(f"{r.seconds[k]:7.3f}" for k in ks) + exact)


def exact_cost(
    model: nn.Module, x: Tensor, curve: Trajectory, regions: int, label: str, sampled_count: float
) -> None:
    """Check the exact count against a float64 sampled count on a short ellipse, then time its first ``regions``
    regions along ``curve`` and extrapolate to the whole ellipse."""
    short = ellipse_through(*(x[0] + 1e-3 * (x[:3] - x[0])).double(), num_points=4096)
    exact = count_transitions(model, short, method="exact")
    # In float64: at this spacing, float32 rounding makes units near a boundary flicker between neighbouring points.
    dense = count_transitions(copy.deepcopy(model).double(), short)
    print(
        f"   {label}: short ellipse (two anchors 1e-3 of the way from the first to training points): exact "
        f"{exact.transitions} in {exact.regions} regions, float64 sampled at 4,096 points {dense.transitions} "
        f"(resolution {dense.resolution:.4f})"
    )
    start = time.perf_counter()
    try:
        count_transitions(model, curve, method="exact", max_regions=regions)
        raise AssertionError("the whole ellipse fitted in the timed regions")
    except RuntimeError:
        seconds = (time.perf_counter() - start) / regions
    start = time.perf_counter()
    count_transitions(model, curve, num_points=4096)
    sampled = time.perf_counter() - start
    print(
        f"   {label}: {seconds:.3f} s per region over the first {regions} regions of an on-manifold ellipse; about "
        f"{sampled_count:,.0f} regions (T_4096) -> about {seconds * sampled_count / 60:,.0f} min for the ellipse, "
        f"against {sampled:.1f} s for the sampled count at 4,096 points"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", action="store_true", help="(the option of benchmarks.transitions)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-file", default=None)
    parser.add_argument("--curves", type=int, default=None, help="curves of each kind (default 4; --quick 2)")
    parser.add_argument("--exact-regions", type=int, default=None, help="regions timed (default 100; --quick 10)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = KS[:4] if args.quick else KS
    num_curves = args.curves or (2 if args.quick else 4)
    regions = args.exact_regions or (10 if args.quick else 100)
    x, y, data_name = load_images(args.data_file)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s); data: {data_name}")

    generator = torch.Generator().manual_seed(args.seed)
    on = x[torch.randperm(len(x), generator=generator)[: 3 * num_curves]]
    off = gaussian_anchors(x.mean(0), x.std(0), 3 * num_curves, generator=generator)
    curves = {
        "on_manifold": [ellipse_through(*a, num_points=ks[-1]) for a in on.view(num_curves, 3, *x.shape[1:])],
        "off_manifold": [ellipse_through(*a, num_points=ks[-1]) for a in off.view(num_curves, 3, *x.shape[1:])],
    }
    rows: list[Row] = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = MODELS[name]().eval()
        for state in ("untrained", "trained"):
            if state == "trained":
                start = time.perf_counter()
                fit(model, x, y, 1 if args.quick else EPOCHS[name], args.seed)
                print(
                    f"   trained {name}: {EPOCHS[name] if not args.quick else 1} epochs in "
                    f"{time.perf_counter() - start:.0f} s, training accuracy {accuracy(model, x, y):.3f}",
                    flush=True,
                )
            new = measure(model, name, state, curves, ks, exact=name.startswith("MLP"))
            rows += new
            if not name.startswith("MLP"):  # the MLP's exact counts are measured whole
                top = statistics.mean(new[0].counts[ks[-1]])
                exact_cost(model, x, curves["on_manifold"][0], regions, f"{name}, {state}", top)
    print_tables(rows, ks)
    print(f"\n(total {math.fsum(r.seconds[k] for r in rows for k in ks) * num_curves:.0f} s of sampled counts)")
