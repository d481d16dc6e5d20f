"""Max-pooling on the CPU: PyTorch's kernel against the strided views the measurements use without autograd.

    python -m benchmarks.pooling            # 15 interleaved repeats per shape
    python -m benchmarks.pooling --quick    # 3

For each shape: the median time of ``F.max_pool2d`` (the values) and ``F.max_pool2d(..., return_indices=True)``
(values and winners) against ``_strided_max``, the pooling that ``measuring(model, device)`` takes on the CPU
without autograd and that the activation codes take for their winners. Each pair is checked equal before it is
timed (values, and winners as indices into the pooled plane). The shapes are the two pools of the overhead
benchmark's CNN at the measurements' pass of 256 points, the same at the training batch of 64, a torchvision
ResNet stem pool (3 x 3, stride 2, padding 1) and a batch too small for the views to pay (where the measurements
keep PyTorch's kernel).
"""

from __future__ import annotations

import argparse
import math
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks._timing import timed
from lightning_sensitivity.functional._pooling import _FAST_MIN_ELEMENTS, _Pool, _strided_max

SHAPES = [
    ("CNN pool 1, 256 points", (256, 16, 28, 28), 2, 2, 0),
    ("CNN pool 2, 256 points", (256, 32, 14, 14), 2, 2, 0),
    ("CNN pool 1, batch 64", (64, 16, 28, 28), 2, 2, 0),
    ("ResNet stem pool, batch 32 at 64 x 64", (32, 64, 32, 32), 3, 2, 1),
    ("a small batch: 4 x 16 x 8 x 8", (4, 16, 8, 8), 2, 2, 0),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 15
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} repeats; median ms")
    print(
        f"{'shape':38s} {'values: kernel':>15s} {'views':>8s} {'ratio':>6s}   "
        f"{'winners: kernel':>15s} {'views':>8s} {'ratio':>6s}   taken by the measurements"
    )
    generator = torch.Generator().manual_seed(0)
    for name, shape, k, s, p in SHAPES:
        x = torch.randn(shape, generator=generator).relu()  # as after a ReLU: half the inputs tie at zero
        geometry = ((k, k), (s, s), (p, p), (1, 1))
        plane = math.prod(shape[2:])
        dtype = torch.uint8 if plane <= 256 else torch.int16 if plane <= 2**15 else torch.int32
        values, winners = F.max_pool2d(x, k, s, p, return_indices=True)
        mine, found = _strided_max(x, *geometry, dtype)
        assert torch.equal(mine, values) and found is not None and torch.equal(found.long(), winners), name
        samples = timed(
            {
                "kernel": partial(F.max_pool2d, x, k, s, p),
                "views": partial(_strided_max, x, *geometry),
                "kernel, winners": partial(F.max_pool2d, x, k, s, p, return_indices=True),
                "views, winners": partial(_strided_max, x, *geometry, dtype),
            },
            repeats,
            shuffle_seed=0,
        )
        ms = {key: 1e3 * statistics.median(times) for key, times in samples.items()}
        pool = _Pool(x, 2, *geometry, False, False)
        taken = [kind for kind, winners_too in (("values", False), ("winners", True)) if pool._fast(x, winners_too)]
        print(
            f"{name:38s} {ms['kernel']:15.3f} {ms['views']:8.3f} {ms['kernel'] / ms['views']:5.1f}x   "
            f"{ms['kernel, winners']:15.3f} {ms['views, winners']:8.3f} "
            f"{ms['kernel, winners'] / ms['views, winners']:5.1f}x   {', '.join(taken) or 'neither'}"
        )
    print(f"(the views are taken from {_FAST_MIN_ELEMENTS:,} input elements, and for the winners up to 4 positions)")


if __name__ == "__main__":
    main()
