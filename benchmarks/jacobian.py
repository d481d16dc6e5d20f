"""Speed and accuracy of ``jacobian_norm``, printed side by side with the references it must beat.

    python -m benchmarks.jacobian            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.jacobian --quick    # smaller batches, fewer repeats

Every figure is measured in this run, on this machine: ratios compare timings taken interleaved, as the
median of repeats, so that load from other processes affects both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

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


def timed(fns: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, calls interleaved round-robin."""
    for fn in fns.values():
        fn()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def exact_speed(repeats: int, scale: float) -> None:
    print("\n== exact jacobian_norm against the references (softmax output, median seconds) ==")
    print(f"{'model':28s} {'batch':>5s} {'vmap(jacrev)':>12s} {'grad loop':>10s} {'ours':>8s} {'ours/faster ref':>16s}")
    for sizes, batch in [([784, 500, 500, 500, 10], 256), ([3072, 500, 500, 500, 100], 128)]:
        batch = max(8, int(batch * scale))
        torch.manual_seed(0)
        model, x = mlp(sizes), torch.randn(batch, sizes[0])
        ours = jacobian_norm(model, x)
        assert torch.allclose(ours, reference_vmap_jacrev(model, x), rtol=1e-4)
        t = timed(
            {
                "vmap": functools.partial(reference_vmap_jacrev, model, x),
                "loop": functools.partial(reference_loop, model, x),
                "ours": functools.partial(jacobian_norm, model, x),
            },
            repeats,
        )
        best = min(t["vmap"], t["loop"])
        name = "-".join(map(str, sizes))
        print(f"{name:28s} {batch:5d} {t['vmap']:12.4f} {t['loop']:10.4f} {t['ours']:8.4f} {t['ours'] / best:16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    exact_speed(repeats=3 if args.quick else 7, scale=0.25 if args.quick else 1.0)


if __name__ == "__main__":
    main()
