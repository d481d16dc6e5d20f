"""Max-pooling on the CPU: PyTorch's kernel against the strided views the measurements use without autograd.

    python -m benchmarks.pooling            # 15 interleaved repeats per case
    python -m benchmarks.pooling --quick    # 3

For each case: the median time of ``F.max_pool2d`` against ``_strided_max``, the pooling that
``measuring(model, device)`` gives a model's ``nn.MaxPool2d`` modules on the CPU without autograd, checked equal
before they are timed. The shapes are the two pools of the overhead benchmark's CNN at the gap measurement's batch
of 256 and at the training batch of 64, a torchvision ResNet stem pool (3 x 3, stride 2, padding 1), and a batch
too small for the views to pay (where the measurements keep PyTorch's kernel). PyTorch's kernel branches on every
element, so its time depends on the values: each shape is timed on Gaussian inputs after a ReLU (half of them
zero) and on the ReLU activations of the digits CNN's first layer at points of the digits (two thirds zero).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._timing import timed
from examples.digits import DigitsDataModule
from lightning_sensitivity.functional._pooling import _FAST_MIN_ELEMENTS, _Pool, _strided_max

SHAPES = [
    ("CNN pool 1, 256 points", (256, 16, 28, 28), 2, 2, 0),
    ("CNN pool 2, 256 points", (256, 32, 14, 14), 2, 2, 0),
    ("CNN pool 1, batch 64", (64, 16, 28, 28), 2, 2, 0),
    ("ResNet stem pool, batch 32 at 64 x 64", (32, 64, 32, 32), 3, 2, 1),
    ("a small batch: 4 x 16 x 8 x 8", (4, 16, 8, 8), 2, 2, 0),
]


def _digits_activations(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """ReLU activations of a 3 x 3 convolution (random weights, a small positive bias) over digits, upscaled to
    the shape's plane, with as many channels as the shape."""
    n, channels, height, width = shape
    digits = DigitsDataModule().x_train
    x = digits[torch.randint(len(digits), (n,), generator=generator)].view(n, 1, 8, 8)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    conv = nn.Conv2d(1, channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / 3)
        conv.bias.fill_(-0.1)
        return conv(x).relu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 15
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} repeats; median ms")
    print(f"{'shape':38s} {'inputs':8s} {'zeros':>6s} {'kernel':>8s} {'views':>8s} {'ratio':>6s}   taken")
    generator = torch.Generator().manual_seed(0)
    for name, shape, k, s, p in SHAPES:
        geometry = ((k, k), (s, s), (p, p), (1, 1))
        taken = _Pool(torch.empty(shape), 2, *geometry, False, False)._fast()
        for kind, x in (
            ("gaussian", torch.randn(shape, generator=generator).relu()),
            ("digits", _digits_activations(shape, generator)),
        ):
            assert torch.equal(_strided_max(x, *geometry), F.max_pool2d(x, k, s, p)), name
            samples = timed(
                {"kernel": partial(F.max_pool2d, x, k, s, p), "views": partial(_strided_max, x, *geometry)},
                repeats,
                shuffle_seed=0,
            )
            ms = {key: 1e3 * statistics.median(times) for key, times in samples.items()}
            zeros = (x == 0).float().mean().item()
            print(
                f"{name:38s} {kind:8s} {zeros:6.0%} {ms['kernel']:8.3f} {ms['views']:8.3f} "
                f"{ms['kernel'] / ms['views']:5.1f}x   {'views' if taken else 'kernel'}"
            )
    print(f"(the views are taken from {_FAST_MIN_ELEMENTS:,} input elements)")


if __name__ == "__main__":
    main()
