"""Speed and accuracy of ``jacobian_norm``, printed side by side with the references it must beat.

    python -m benchmarks.jacobian            # full run (minutes: resnet18 at C = 1000 dominates)
    python -m benchmarks.jacobian --quick    # the same tables at small sizes

(The monitors' overhead on a training run is ``benchmarks/overhead.py``.)

Every figure is measured in this run, on this machine: ratios compare timings taken interleaved, as the
median of repeats, so that load from other processes affects both sides alike.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import functools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._timing import timed
from lightning_sensitivity.functional import jacobian_norm


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def reference_vmap_jacrev(model: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """``torch.func.vmap(jacrev(f))``, the functional reference; with ``chunk_size``, that many rows of every
    point's Jacobian are pulled back at once."""

    def probabilities(point: Tensor) -> Tensor:
        return model(point[None]).softmax(-1)[0]

    jacobian = torch.func.vmap(torch.func.jacrev(probabilities, chunk_size=chunk_size))(x)
    return jacobian.flatten(1).norm(dim=1)


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
        for k in sorted({4, max(4, math.isqrt(num_classes - 1) + 1), num_classes // 4}):
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


class PeakMemory:
    """Peak resident memory of the process during a block, in MiB above its level at the start (freed memory is
    first handed back to the system), sampled every millisecond. ``None`` where ``/proc`` is not available."""

    _libc = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
    _page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self) -> None:
        self.mib: float | None = None

    @classmethod
    def _resident(cls) -> int | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * cls._page
        except OSError:
            return None

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._resident() or 0)
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        self._base = self._resident()
        self._peak = self._base or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._base is not None:
            self._thread.join()
            self._peak = max(self._peak, self._resident() or 0)
            self.mib = (self._peak - self._base) / 2**20


def timed_with_memory(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True, once: frozenset[str] = frozenset()
) -> tuple[dict[str, float], dict[str, float], dict[str, float | None], dict[str, Any]]:
    """Median wall and CPU seconds, peak memory (MiB) and the last result of each function, calls interleaved; the
    functions named in ``once`` run in the first round only (a reference too slow to repeat)."""
    if warmup:
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    peak: dict[str, float | None] = {name: None for name in fns}
    results: dict[str, Any] = {}
    for round_ in range(repeats):
        for name, fn in fns.items():
            if round_ > 0 and name in once:
                continue
            with PeakMemory() as memory:
                start, start_cpu = time.perf_counter(), time.process_time()
                results[name] = fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            if memory.mib is not None:
                peak[name] = max(peak[name] or 0.0, memory.mib)
    return _medians(wall), _medians(cpu), peak, results


def vjp_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one vector-Jacobian product of the logits with respect to the input, for the whole batch."""
    leaf = x.clone().requires_grad_(True)
    z = model(leaf)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(z, leaf, torch.ones_like(z))
    return counter.get_total_flops()


def convolution_throughput(model: nn.Module, x: Tensor, repeats: int) -> float:
    """FLOP/s of the model's forward pass at a large batch (no graph), the faster of the two memory formats: the
    rate this machine runs these convolutions at when they are given enough work."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    best = 0.0
    for memory_format in (torch.contiguous_format, torch.channels_last):
        points = x.contiguous(memory_format=memory_format)
        with torch.no_grad():
            model(points)
            seconds = statistics.median(_seconds(functools.partial(model, points)) for _ in range(repeats))
        best = max(best, counter.get_total_flops() / seconds)
    return best


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def resnet_speed(
    quick: bool, classes: tuple[int, ...] | None = None, repeats: int | None = None
) -> tuple[nn.Module, Tensor, Tensor, float]:
    """torchvision ``resnet18``: exact against ``vmap(jacrev)`` and the loop at C = 10, 100, 1000 (quick: 10, 50,
    200 at 3x16x16, batch 4), with peak memory and the compute floor. Returns the largest C's model, its points,
    exact norms and median seconds."""
    from torchvision.models import resnet18

    size, batch, default = (16, 4, (10, 50, 200)) if quick else (32, 32, (10, 100, 1000))
    classes = classes or default
    entries = 3 * size * size
    # jacobian_norm pulls back at most 2**24 / (points x input entries) rows at once (its documented bound);
    # vmap(jacrev) gets the same number of rows of every point at once.
    rows_at_once = max(1, 2**24 // (batch * entries))
    print(
        f"\n== resnet18 (torchvision) at 3x{size}x{size}, batch {batch}: exact jacobian_norm against the references "
        "(softmax output, median seconds, peak MiB above the start) =="
    )
    print(
        f"{'C':>5s} {'vmap(jacrev)':>12s} {'MiB':>6s} {'grad loop':>10s} {'MiB':>6s} {'ours':>8s} {'MiB':>6s}"
        f" {'ours/faster ref':>16s} {'(CPU time)':>10s} {'GFLOP/s':>8s} {'floor':>8s} {'ours/floor':>10s}"
        f" {'rows':>5s} {'ours/own floor':>14s}"
    )
    last: tuple[nn.Module, Tensor, Tensor, float] | None = None
    for num_classes in classes:
        torch.manual_seed(0)
        model = resnet18(num_classes=num_classes).eval()
        x = torch.randn(batch, 3, size, size)
        # vmap(jacrev) holds about twice the memory per row in flight (at C = 100: 3350 MiB against 1949): half
        # the rows at once fits about the same memory (and at C = 1000 a full chunk ran out of memory here).
        chunk = min(num_classes, max(1, rows_at_once // 2))
        big = num_classes == classes[-1]
        methods = {
            "vmap": functools.partial(reference_vmap_jacrev, model, x, chunk),
            "loop": functools.partial(reference_loop, model, x),
            "ours": functools.partial(jacobian_norm, model, x),
        }
        if num_classes > 100 and not quick:
            # vmap(jacrev) grew past 23 GB here at C = 1000 (chunk_size 85 and 170) and was killed for memory.
            del methods["vmap"]
        wall, cpu, peak, results = timed_with_memory(
            methods,
            repeats=repeats or (3 if big else (2 if quick else 5)),
            warmup=not big,  # a warm-up round of the largest C would cost as much as a repeat
            # the loop at C = 1000 is C backward passes (minutes): once, in the first round
            once=frozenset({"loop"}) if num_classes > 100 and not quick else frozenset(),
        )
        assert torch.allclose(results["ours"], results["loop"], rtol=1e-3), "disagrees with the loop"
        faster = min(seconds for name, seconds in wall.items() if name != "ours")
        cpu_ratio = cpu["ours"] / min(seconds for name, seconds in cpu.items() if name != "ours")
        vmap_column = (
            f"{wall['vmap']:12.3f} {_mib(peak['vmap']):>6s}"
            if "vmap" in wall
            else f"{'(no memory)':>12s} {'':>6s}"
        )
        # The throughput is taken again for every row, right after it: load from other processes changes it.
        throughput = convolution_throughput(resnet18(num_classes=10).eval(), torch.randn(256, 3, size, size), 3)
        floor = (num_classes - 1) * vjp_flops(model, x) / throughput
        # The products jacobian_norm takes per point: C - 1, or the 512 features before the last layer when fewer.
        rows = min(num_classes - 1, model.fc.in_features)
        print(
            f"{num_classes:5d} {vmap_column} {wall['loop']:10.3f}"
            f" {_mib(peak['loop']):>6s} {wall['ours']:8.3f} {_mib(peak['ours']):>6s} {wall['ours'] / faster:16.2f}"
            f" {cpu_ratio:10.2f} {throughput / 1e9:8.1f} {floor:8.3f} {wall['ours'] / floor:10.2f}"
            f" {rows:5d} {wall['ours'] / (floor * rows / (num_classes - 1)):14.2f}"
        )
        last = (model, x, results["ours"], wall["ours"])
    print(
        f"(vmap(jacrev) chunk_size = min(C, {max(1, rows_at_once // 2)}), half the rows jacobian_norm pulls back at"
        " once; GFLOP/s: resnet18's forward pass at batch 256, the faster memory format, measured after the row;"
        " floor: the C - 1 vector-Jacobian products' FLOPs over it; own floor: the same for the rows products"
        " jacobian_norm takes per point; at C > 100 the loop runs once)"
    )
    assert last is not None
    return last


def resnet_projection(model: nn.Module, x: Tensor, exact: Tensor, exact_seconds: float, quick: bool) -> None:
    num_classes = model(x[:1]).shape[1]
    seeds = 3 if quick else 5
    print(
        f"\n== projection estimator on resnet18, C = {num_classes}, {len(x)} points: mean against exact ({seeds}"
        " seeds), time against exact =="
    )
    print(f"{'K':>4s} {'mean rel. error':>16s} {'max |error|':>12s} {'time proj/exact':>16s}")
    exact_mean = exact.mean()
    for k in sorted({16, 32, 64, 128, max(4, math.isqrt(num_classes - 1) + 1)}):
        errors, seconds = [], []
        for seed in range(seeds):
            start = time.perf_counter()
            estimate = jacobian_norm(
                model,
                x,
                method="projection",
                num_projections=k,
                generator=torch.Generator().manual_seed(seed),
            )
            seconds.append(time.perf_counter() - start)
            errors.append((estimate.mean() / exact_mean - 1).item())
        print(
            f"{k:4d} {statistics.mean(errors):+16.3%} {max(abs(e) for e in errors):12.3%}"
            f" {statistics.median(seconds) / exact_seconds:16.3f}"
        )


def accurate_reference(model: nn.Module, x: Tensor) -> Tensor:
    """Per-point softmax Jacobian norms in float64: the logits' Jacobian (``vmap(jacrev)``) times the softmax factor
    ``diag(p) - p p^T`` formed analytically, its confident diagonal entry ``p_m (1 - p_m)`` with ``1 - p_m`` the sum
    of the others (a one-logit model is the softmax of ``(0, z)``). The precision tests use it too."""
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    jz = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x).flatten(2)  # [B, C, D]
    with torch.no_grad():
        z = model(x)
    if z.shape[1] == 1:
        z = torch.cat([torch.zeros_like(z), z], dim=1)
        jz = torch.cat([torch.zeros_like(jz), jz], dim=1)
    p = z.softmax(dim=1)
    factor = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    top, rows = p.argmax(dim=1), torch.arange(len(x))
    factor[rows, top, top] = p[rows, top] * p.scatter(1, top[:, None], 0.0).sum(dim=1)
    return (factor @ jz).flatten(1).norm(dim=1)


def precision() -> None:
    print(
        "\n== per-point accuracy at confident points: worst relative error against an accurate float64 reference =="
    )
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    print(
        f"{'model (digits, 300 held-out points)':40s} {'median margin':>13s} {'min norm':>9s} {'ours':>9s} {'f32 vmap(jacrev)':>17s}"
    )
    for name, make in [("MLP 64-64-64-10", digits_mlp), ("CNN 2 conv + linear", digits_cnn)]:
        for margin in (None, 10.0, 25.0):
            torch.manual_seed(0)
            model = fit_full_batch(make(), x[:1200], y[:1200], steps=300 if margin is None else 100)
            if margin is not None:  # scale the last layer to the wanted median logit margin
                last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
                with torch.no_grad():
                    top2 = model(x[:1200]).topk(2, dim=1).values
                    factor = margin / (top2[:, 0] - top2[:, 1]).median()
                    last.weight.mul_(factor)
                    last.bias.mul_(factor)
            points = x[1200:1500]
            reference = accurate_reference(model, points)
            ours = jacobian_norm(model, points).double()
            naive = reference_vmap_jacrev(model, points).double()
            with torch.no_grad():
                top2 = model(points).topk(2, dim=1).values
            label = f"{name}, {'trained' if margin is None else f'margin {margin:.0f}'}"
            print(
                f"{label:40s} {(top2[:, 0] - top2[:, 1]).median():13.1f} {reference.min():9.1e}"
                f" {((ours - reference).abs() / reference).max():9.1e}"
                f" {((naive - reference).abs() / reference).max():17.1e}"
            )


def digits_mlp() -> nn.Module:
    """The digits MLP 64-64-64-10 of the accuracy table (and of the precision tests)."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_cnn() -> nn.Module:
    """The digits CNN (two convolutions and a linear head) of the accuracy table (and of the precision tests)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def fit_full_batch(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> nn.Module:
    """``steps`` full-batch Adam steps on the cross-entropy; the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--classes", type=int, nargs="+", help="resnet18's numbers of classes (default 10 100 1000)"
    )
    parser.add_argument(
        "--repeats", type=int, help="resnet18 repeats per method (default 5, and 3 at the largest C)"
    )
    parser.add_argument("--resnet-only", action="store_true", help="only the resnet18 tables")
    args = parser.parse_args()
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    repeats = 3 if args.quick else 7
    if not args.resnet_only:
        precision()
        exact_speed(repeats=repeats, scale=0.25 if args.quick else 1.0)
    classes = tuple(args.classes) if args.classes else None
    model, x, exact, exact_seconds = resnet_speed(quick=args.quick, classes=classes, repeats=args.repeats)
    resnet_projection(model, x, exact, exact_seconds, quick=args.quick)
    if not args.resnet_only:
        projection_accuracy(repeats=repeats, quick=args.quick)


if __name__ == "__main__":
    main()
