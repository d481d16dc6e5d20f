"""Speed of the transition counts, printed (the monitor's overhead is ``benchmarks/overhead.py``).

    python -m benchmarks.transitions            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.transitions --quick    # fewer points and repeats
    python -m benchmarks.transitions --resolution [--data-file F.npz]   # the count's resolution against the
                                                # points per curve (benchmarks/transition_resolution.py)

Every figure is measured in this run, on this machine. Ratios compare timings taken interleaved, as the median
of repeats, so that load from other processes affects both sides alike. ``--threads`` (default 1) sets torch's
intra-op threads for the whole run: on a small shared machine, the thread pool's synchronization dominates the
many small operations of digits-sized models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks._timing import timed
from examples.digits import DigitsDataModule, train
from lightning_sensitivity.functional import Trajectory, count_transitions, ellipse_through


def forward_in_chunks(model: nn.Module, points: Tensor | Trajectory, chunk_size: int) -> None:
    """The baseline: a plain forward pass over the same points, in the same chunks (points of a Trajectory are
    generated chunk by chunk, as the count does)."""
    k = points.num_points if isinstance(points, Trajectory) else len(points)
    times = points.times if isinstance(points, Trajectory) else None
    with torch.no_grad():
        for start in range(0, k, chunk_size):
            if isinstance(points, Trajectory):
                model(points.at(times[start : start + chunk_size]))
            else:
                model(points[start : start + chunk_size])


def small_cnn(channels: int, side: int, widths: tuple[int, int]) -> nn.Module:
    """Two 3x3 convolutions with ReLU and 2x2 max-pooling, then a linear layer to 10 classes (untrained), on
    ``channels x side x side`` inputs."""
    return nn.Sequential(
        nn.Conv2d(channels, widths[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(widths[1] * (side // 4) ** 2, 10),
    ).eval()  # fmt: skip


def mnist_mlp() -> nn.Module:
    """The paper's fully connected network on MNIST-sized inputs, 784-500-500-500-10 (untrained)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in in (784, 500, 500):
        layers += [nn.Linear(width_in, 500), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(500, 10)).eval()


Case = tuple[str, nn.Module, "Tensor | Trajectory", int]


def throughput(cases: list[Case], repeats: int) -> None:
    print("\n1. Sampled count against a plain forward pass over the same points, in the same chunks")
    print(
        "   model                               input        points  chunk   forward [ms]   sampled count [ms]"
        "   ratio   (target <= 1.5x)"
    )
    for name, model, points, chunk_size in cases:
        samples = timed(
            {
                "forward": lambda m=model, p=points, c=chunk_size: forward_in_chunks(m, p, c),
                "sampled": lambda m=model, p=points, c=chunk_size: count_transitions(m, p, chunk_size=c),
            },
            repeats,
        )
        forward, sampled = statistics.median(samples["forward"]), statistics.median(samples["sampled"])
        kind, k = (
            ("Trajectory", points.num_points) if isinstance(points, Trajectory) else ("tensor", len(points))
        )
        print(
            f"   {name:35s} {kind:10s} {k:8d} {chunk_size:6d}   {forward * 1e3:12.1f}   {sampled * 1e3:18.1f}   "
            f"{sampled / forward:5.2f}x"
        )


def exact_against_sampled(model: nn.Module, curves: list[Any], repeats: int) -> None:
    print("\n2. Time to the exact count along on-manifold ellipses of the trained digits MLP")
    print(
        "   trajectory  transitions  regions  exact [s]   first k that matches  sampled at that k [s]  k..2k agree"
    )
    for i, curve in enumerate(curves):
        exact = count_transitions(model, curve, method="exact")
        k = 8
        while int(count_transitions(model, curve, num_points=k)) != exact.transitions:
            k *= 2
        samples = timed(
            {
                "exact": lambda curve=curve: count_transitions(model, curve, method="exact"),
                "sampled": lambda curve=curve, k=k: count_transitions(model, curve, num_points=k),
            },
            repeats,
        )
        at_2k = count_transitions(model, curve, num_points=2 * k).transitions == exact.transitions
        print(
            f"   {i:10d}  {exact.transitions:11d}  {exact.regions:7d}  {statistics.median(samples['exact']):9.3f}"
            f"   {k:20d}  {statistics.median(samples['sampled']):21.3f}  {at_2k}"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--resolution" in argv:
        from benchmarks.transition_resolution import main as resolution  # it imports this module

        resolution(argv)
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)")

    _, model = train([], max_epochs=20)
    model.eval()
    x = DigitsDataModule().x_train
    anchors = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:9]].view(3, 3, 1, 8, 8)
    curves = [ellipse_through(*a, num_points=512) for a in anchors]

    k = 16_384 if args.quick else 65_536
    digits_curve = ellipse_through(*anchors[0], num_points=k)
    points = digits_curve.points
    generator = torch.Generator().manual_seed(1)
    mnist = ellipse_through(*torch.rand(3, 1, 28, 28, generator=generator), num_points=k // 8)
    cifar = ellipse_through(*torch.rand(3, 3, 32, 32, generator=generator), num_points=k // 64)
    cases: list[Case] = [
        ("digits MLP 64-128-128-10 (trained)", model, points, 1024),
        ("digits MLP 64-128-128-10 (trained)", model, points, 4096),
        ("digits MLP 64-128-128-10 (trained)", model, points, 16_384),
        ("digits MLP 64-128-128-10 (trained)", model, digits_curve, 1024),
        ("digits CNN", small_cnn(1, 8, (16, 32)), points, 1024),
        ("digits CNN", small_cnn(1, 8, (16, 32)), points, 4096),
        ("MNIST MLP 784-500-500-500-10", mnist_mlp(), mnist.points, 1024),
        ("MNIST MLP 784-500-500-500-10", mnist_mlp(), mnist, 1024),
        ("CIFAR CNN 32-64 channels", small_cnn(3, 32, (32, 64)), cifar.points, 256),
    ]
    throughput(cases, repeats)
    exact_against_sampled(model, curves, repeats)


if __name__ == "__main__":
    main()
