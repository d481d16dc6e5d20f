"""What one ``JacobianNormMonitor`` measurement costs, against the number of classes and the model's size.

For a small CNN and torchvision's ``resnet18`` at 3x32x32, each at C = 10, 100 and 1000 classes, it prints:

- the exact ``jacobian_norm``'s seconds a measured point (``--points`` points in one call, the median of the calls);
- the same for ``method="projection"`` at its default K, and the relative error of its mean against the exact mean
  (mean and largest over three seeds);
- training's seconds a point: one SGD step (forward, backward, update, train mode) at batch 64, median of the steps;
- what a measurement at the monitor's default (256 points) is worth in epochs of training on 5,000 and 50,000
  points: ``256 * jacobian seconds a point / (training seconds a point * N)``, and the same for the projection.

    python -m benchmarks.monitor_cost            # about 5 minutes on 2 quiet CPU threads
    python -m benchmarks.monitor_cost --quick    # 16 x 16 inputs, C = 10 and 100, 4 points: a smoke run

Timings depend on the machine and its load: read them as orders of magnitude unless the machine was quiet.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sensitivity.functional import jacobian_norm

#: Points a default JacobianNormMonitor measurement takes (per validation dataloader).
MONITOR_POINTS = 256
TRAINING_SETS = (5_000, 50_000)


def small_cnn(num_classes: int) -> nn.Module:
    """Two convolutions with batch norm and max pooling, and a linear head (about 0.1M parameters at C = 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, num_classes),
    )


def resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18 as build

    return build(num_classes=num_classes)


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def training_seconds_per_point(model: nn.Module, size: int, num_classes: int, steps: int) -> float:
    """One SGD step at batch 64 in train mode, median over ``steps`` (after one warm-up step), per point."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, size, size), torch.randint(0, num_classes, (64,))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    return _median_seconds(step, steps) / len(x)


def measurement(model: nn.Module, x: Tensor, repeats: int) -> tuple[float, Tensor]:
    """The exact ``jacobian_norm``'s median seconds a point, and its norms."""
    norms = jacobian_norm(model, x)
    return _median_seconds(lambda: jacobian_norm(model, x), repeats) / len(x), norms


def projection(model: nn.Module, x: Tensor, exact: Tensor) -> tuple[float, float, float]:
    """``method="projection"`` at its default K over three seeds: median seconds a point, the mean and the largest
    relative error of the mean against the exact mean."""
    seconds, errors = [], []
    for seed in range(3):
        start = time.perf_counter()
        norms = jacobian_norm(model, x, method="projection", generator=torch.Generator().manual_seed(seed))
        seconds.append(time.perf_counter() - start)
        errors.append((norms.mean() / exact.mean() - 1).item())
    return statistics.median(seconds) / len(x), statistics.mean(errors), max(abs(e) for e in errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 x 16 inputs, C = 10 and 100, 4 points")
    parser.add_argument("--points", type=int, help="points measured in one call (default 32; 4 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, classes = (16, (10, 100)) if args.quick else (32, (10, 100, 1000))
    points = args.points or (4 if args.quick else 32)
    repeats, steps = (1, 2) if args.quick else (3, 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; inputs 3x{size}x{size}")
    print(
        f"\n== one JacobianNormMonitor measurement against classes and model size ({points} points a call; "
        f"epochs: a {MONITOR_POINTS}-point measurement over an epoch of N training points) =="
    )
    header = (
        f"{'model':>9s} {'params':>7s} {'C':>5s} {'exact s/pt':>11s} {'train s/pt':>11s} {'ratio':>7s}"
        + "".join(f" {'epochs N=' + str(n):>14s}" for n in TRAINING_SETS)
        + f" {'K':>4s} {'proj s/pt':>10s} {'proj error (max)':>17s}"
        + "".join(f" {'proj N=' + str(n):>12s}" for n in TRAINING_SETS)
    )
    print(header)
    for name, build in (("small CNN", small_cnn), ("resnet18", resnet18)):
        for num_classes in classes:
            torch.manual_seed(0)
            model = build(num_classes)
            params = sum(p.numel() for p in model.parameters())
            train = training_seconds_per_point(model, size, num_classes, steps)
            model.eval()
            x = torch.randn(points, 3, size, size)
            exact, norms = measurement(model, x, repeats)
            proj, error, worst = projection(model, x, norms)
            k = min(num_classes, max(4, math.isqrt(num_classes - 1) + 1))
            epochs = [MONITOR_POINTS * exact / (train * n) for n in TRAINING_SETS]
            proj_epochs = [MONITOR_POINTS * proj / (train * n) for n in TRAINING_SETS]
            print(
                f"{name:>9s} {params / 1e6:6.2f}M {num_classes:5d} {exact:11.4f} {train:11.5f} {exact / train:7.0f}"
                + "".join(f" {e:14.3f}" for e in epochs)
                + f" {k:4d} {proj:10.4f} {error:+8.2%} ({worst:.2%})"
                + "".join(f" {e:12.3f}" for e in proj_epochs)
            )
    print(
        "(ratio: a measured point costs as many training points; epochs: one default measurement in epochs of "
        "training on N points; proj: method='projection' at its default K = max(4, ceil(sqrt(C))))"
    )


if __name__ == "__main__":
    main()
