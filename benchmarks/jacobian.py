"""Speed and accuracy of ``jacobian_norm``, printed side by side with the references it must beat.

    python -m benchmarks.jacobian            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.jacobian --quick    # smaller batches, fewer repeats

(The monitors' overhead on a training run is ``benchmarks/overhead.py``.)

Every figure is measured in this run, on this machine: ratios compare timings taken interleaved, as the
median of repeats, so that load from other processes affects both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from torch import Tensor, nn

from benchmarks._timing import timed
from lightning_sensitivity.functional import jacobian_norm


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def reference_vmap_jacrev(model: nn.Module, x: Tensor) -> Tensor:
    """``torch.func.vmap(jacrev(f))``: the functional reference."""

    def probabilities(point: Tensor) -> Tensor:
        return model(point[None]).softmax(-1)[0]

    return torch.func.vmap(torch.func.jacrev(probabilities))(x).flatten(1).norm(dim=1)


def reference_loop(model: nn.Module, x: Tensor) -> Tensor:
    """The per-class ``autograd.grad(p[:, c].sum(), x)`` loop found in public code."""
    x = x.clone().requires_grad_(True)
    p = model(x).softmax(-1)
    squared = torch.zeros(x.shape[0])
    for c in range(p.shape[1]):
        (g,) = torch.autograd.grad(p[:, c].sum(), x, retain_graph=True)
        squared += g.flatten(1).pow(2).sum(1)
    return squared.sqrt()


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def exact_speed(repeats: int, scale: float) -> None:
    print("\n== exact jacobian_norm against the references (softmax output, median seconds) ==")
    print(
        f"{'model':28s} {'batch':>5s} {'vmap(jacrev)':>12s} {'grad loop':>10s} {'ours':>8s} {'ours/faster ref':>16s}"
    )
    for sizes, batch in [([784, 500, 500, 500, 10], 256), ([3072, 500, 500, 500, 100], 128)]:
        batch = max(8, int(batch * scale))
        torch.manual_seed(0)
        model, x = mlp(sizes), torch.randn(batch, sizes[0])
        ours = jacobian_norm(model, x)
        assert torch.allclose(ours, reference_vmap_jacrev(model, x), rtol=1e-4)
        t = _medians(
            timed(
                {
                    "vmap": functools.partial(reference_vmap_jacrev, model, x),
                    "loop": functools.partial(reference_loop, model, x),
                    "ours": functools.partial(jacobian_norm, model, x),
                },
                repeats,
            )
        )
        best = min(t["vmap"], t["loop"])
        name = "-".join(map(str, sizes))
        print(
            f"{name:28s} {batch:5d} {t['vmap']:12.4f} {t['loop']:10.4f} {t['ours']:8.4f} {t['ours'] / best:16.2f}"
        )


def _blobs(num_classes: int, dim: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centers[y] + 1.5 * torch.randn(n, dim, generator=g), y


def _fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            optimizer.step()
    return model.eval()


def projection_accuracy(repeats: int, quick: bool) -> None:
    print("\n== projection estimator: validation-set mean against exact (5 seeds), and time ratio ==")
    from examples.digits import DigitsDataModule, train

    digits = DigitsDataModule()
    cases: list[tuple[str, nn.Module, Tensor]] = []
    _, trained_digits = train(max_epochs=5 if quick else 30)
    cases.append(("digits MLP, trained (C=10)", trained_digits.eval(), digits.x_val))
    torch.manual_seed(0)
    x, y = _blobs(100, 784, 2000 if quick else 8000, seed=0)
    x_val, _ = _blobs(100, 784, 500 if quick else 1000, seed=1)
    wide = mlp([784, 500, 500, 500, 100])
    cases.append(("784-500x3-100, untrained (C=100)", mlp([784, 500, 500, 500, 100]), x_val))
    cases.append(("784-500x3-100, trained (C=100)", _fit(wide, x, y, 3 if quick else 10), x_val))
    print(f"{'model':34s} {'K':>3s} {'mean rel. error (max |.|)':>26s} {'time proj/exact':>16s}")
    for name, model, points in cases:
        num_classes = model(points[:1]).shape[1]
        exact = jacobian_norm(model, points).mean()
        for k in sorted({4, max(4, -(-num_classes // 8)), num_classes // 4}):
            errors = [
                (
                    jacobian_norm(
                        model,
                        points,
                        method="projection",
                        num_projections=k,
                        generator=torch.Generator().manual_seed(s),
                    ).mean()
                    / exact
                    - 1
                ).item()
                for s in range(5)
            ]
            t = _medians(
                timed(
                    {
                        "exact": functools.partial(jacobian_norm, model, points),
                        "proj": functools.partial(
                            jacobian_norm, model, points, method="projection", num_projections=k
                        ),
                    },
                    repeats,
                )
            )
            mean_error = statistics.mean(errors)
            worst = max(abs(e) for e in errors)
            print(f"{name:34s} {k:3d} {mean_error:+13.4%} ({worst:8.4%}) {t['proj'] / t['exact']:16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    repeats = 3 if args.quick else 7
    exact_speed(repeats=repeats, scale=0.25 if args.quick else 1.0)
    projection_accuracy(repeats=repeats, quick=args.quick)


if __name__ == "__main__":
    main()
