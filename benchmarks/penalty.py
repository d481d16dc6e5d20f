"""The cost of training against the Jacobian norm: one training step with ``jacobian_penalty`` against one without,
and against JacobianReg's algorithm (Hoffman, Roberts and Yaida 2019) re-implemented here as the reference.

    python -m benchmarks.penalty            # digits MLP, a small CNN, resnet18 at 3 x 32 x 32 (minutes)
    python -m benchmarks.penalty --quick    # the same tables at small sizes

Every step is a whole SGD step (zero the gradients, forward, loss, backward, update) on the same model, batch and
number of projections K, the penalty on the logits (JacobianReg's quantity) at strength 0.01. The sides:

- ``plain``: the cross-entropy alone;
- ``ours``: the documented line, ``cross_entropy(model(x), y) + 0.01 * jacobian_penalty(model, x, ...)`` (the penalty
  runs its own forward pass in eval mode);
- ``ours, one pass``: ``jacobian_penalty(..., return_logits=True)`` and the cross-entropy of its logits (one forward
  pass: for models without dropout or batch norm, not resnet18);
- ``JacobianReg``: the reference's algorithm, the training forward pass reused (``x.requires_grad_()``), then K
  vector-Jacobian products with ``create_graph=True``, one per independent direction uniform on the sphere (drawn
  from the global stream), each its own backward pass; at K = C its unit vectors (the exact value).

Beside the times, the variance of each estimate of the penalty on the step's batch (over draws of the
directions): at equal K the cost is about equal, and the variances say which estimate is worth more; the product
time x variance compares the two at equal variance (lower is better; exact values have none).

Timings are interleaved (median of repeats) so that load from other processes affects every side alike; on a
shared machine they still move by 10 to 20% between runs: take the figures of a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._timing import timed
from benchmarks.jacobian import digits_cnn, digits_mlp
from lightning_sensitivity.functional import jacobian_penalty

STRENGTH = 0.01


def jacobian_reg(x: Tensor, z: Tensor, num_projections: int | None) -> Tensor:
    """JacobianReg's estimate of the mean squared Frobenius norm of ``dz/dx`` over the batch, written from the
    published algorithm: ``C * ||v^T J||^2`` averaged over ``num_projections`` directions ``v`` uniform on the unit
    sphere of each point (independent draws from the global stream), one ``autograd.grad`` with
    ``create_graph=True`` each; ``None``: the C unit vectors, the exact value. (The reference returns half of it;
    the factor changes no time.)"""
    batch, classes = z.shape
    exact = num_projections is None
    count = classes if exact else num_projections
    total = z.new_zeros(())
    for k in range(count):
        if exact:
            v = torch.zeros(batch, classes, device=z.device)
            v[:, k] = 1.0
        else:
            v = torch.randn(batch, classes, device=z.device)
            v = v / v.norm(dim=1, keepdim=True)
        (jv,) = torch.autograd.grad(z, x, grad_outputs=v, retain_graph=True, create_graph=True)
        total = total + classes * jv.pow(2).sum() / (count * batch)
    return total


Step = Callable[[], Any]


def steps(model: nn.Module, x: Tensor, y: Tensor, k: int | None, one_pass: bool) -> dict[str, Step]:
    """One training step per side, each on its own copy of ``model`` (so that no side trains another's weights).
    ``k=None``: the exact value on every side."""
    method = "exact" if k is None else "projection"
    copies = {name: copy.deepcopy(model).train() for name in ("plain", "ours", "ours, one pass", "JacobianReg")}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in copies.items()}
    generator = torch.Generator().manual_seed(0)

    def run(name: str) -> None:
        net, optimizer = copies[name], optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        if name == "plain":
            loss = F.cross_entropy(net(x), y)
        elif name == "ours":
            penalty = jacobian_penalty(
                net, x, output="logits", method=method, num_projections=k or 1, generator=generator
            )
            loss = F.cross_entropy(net(x), y) + STRENGTH * penalty
        elif name == "ours, one pass":
            penalty, logits = jacobian_penalty(
                net, x, output="logits", method=method, num_projections=k or 1, generator=generator,
                return_logits=True,
            )
            loss = F.cross_entropy(logits, y) + STRENGTH * penalty
        else:
            leaf = x.clone().requires_grad_(True)
            z = net(leaf)
            loss = F.cross_entropy(z, y) + STRENGTH * jacobian_reg(leaf, z, k)
        loss.backward()
        optimizer.step()

    names = [n for n in copies if one_pass or n != "ours, one pass"]
    return {name: functools.partial(run, name) for name in names}


def variances(model: nn.Module, x: Tensor, k: int, draws: int) -> tuple[float, float, float]:
    """The exact penalty on the batch (the model in eval mode, as both estimates see it here), and the variance of
    each estimate of it over ``draws`` draws of the directions: ours, JacobianReg's."""
    net = copy.deepcopy(model).eval()
    exact = float(jacobian_penalty(net, x, output="logits", method="exact").detach())
    generator = torch.Generator().manual_seed(1)
    ours = [
        float(jacobian_penalty(net, x, output="logits", num_projections=k, generator=generator).detach())
        for _ in range(draws)
    ]
    leaf = x.clone().requires_grad_(True)
    z = net(leaf)
    reference = [float(jacobian_reg(leaf, z, k).detach()) for _ in range(draws)]
    return exact, statistics.variance(ours), statistics.variance(reference)


def resnet18_32() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def small_cnn() -> nn.Module:
    """The digits CNN of ``benchmarks/jacobian.py``, on 8 x 8 images."""
    return digits_cnn()


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    # name: (model, input shape, whether the one-pass form applies: no dropout, no batch norm)
    "digits MLP 64-64-64-10": (digits_mlp, (64,), True),
    "small CNN (2 conv + linear)": (small_cnn, (64,), True),
    "resnet18, 3x32x32, C=10": (resnet18_32, (3, 32, 32), False),
}


def run_case(name: str, batch: int, repeats: int, draws: int, ks: tuple[int | None, ...]) -> None:
    make, shape, one_pass = CASES[name]
    torch.manual_seed(0)
    model = make()
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    for k in ks:
        fns = steps(model, x, y, k, one_pass)
        seconds = {n: statistics.median(v) for n, v in timed(fns, repeats, shuffle_seed=0).items()}
        label = "exact" if k is None else f"K={k}"
        ratios = f"ours/plain {seconds['ours'] / seconds['plain']:5.2f}  ours/JacobianReg {seconds['ours'] / seconds['JacobianReg']:5.2f}"
        if one_pass:
            ratios += f"  one pass/JacobianReg {seconds['ours, one pass'] / seconds['JacobianReg']:5.2f}"
        times = "  ".join(f"{n} {s * 1e3:8.2f} ms" for n, s in seconds.items())
        line = f"{name:30s} {batch:4d} {label:6s} {times}\n{'':42s}{ratios}"
        if k is not None:
            exact, var_ours, var_ref = variances(model, x, k, draws)
            efficiency = (seconds["ours"] * var_ours) / (seconds["JacobianReg"] * var_ref)
            line += (
                f"\n{'':42s}penalty {exact:.4g}: variance ours {var_ours:.3g}, JacobianReg {var_ref:.3g}"
                f" (ratio {var_ours / var_ref:.2f}); time x variance, ours/JacobianReg {efficiency:.2f}"
            )
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 15, quick 3)")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    repeats = args.repeats or (3 if args.quick else 15)
    draws = 20 if args.quick else 200
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {repeats} interleaved steps")
    print("== one SGD step: cross-entropy alone, with the logits' Jacobian penalty (ours), with JacobianReg's ==")
    for name in CASES:
        big = name.startswith("resnet18")
        batch = (8 if big else 32) if args.quick else (32 if big else 128)
        ks: tuple[int | None, ...] = (1, 3, None)
        run_case(name, batch, max(2, repeats // 3) if big else repeats, max(5, draws // 10) if big else draws, ks)


if __name__ == "__main__":
    main()
