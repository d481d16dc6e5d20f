"""Overhead of the monitors on a training run: wall time with a monitor / wall time without, printed.

    python -m benchmarks.overhead            # 30-epoch digits training, 9 interleaved repeats
    python -m benchmarks.overhead --quick    # 3 repeats

The training is ``examples.digits.train`` (the MLP 64-128-128-10 on scikit-learn's digits, 1,258 training and 539
validation points, batch 64) with a ``TensorBoardLogger``, the setting of the README. It is a small run (about a
second on one CPU core), so every fixed cost of a monitor shows: on a real model the same measurement is a far
smaller share. Ratios are medians of per-repeat ratios, runs interleaved.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks._timing import timed
from examples.digits import train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

CONFIGURATIONS: dict[str, Callable[[], list[Callback]]] = {
    "an empty Callback()": lambda: [Callback()],
    "JacobianNormMonitor()": lambda: [JacobianNormMonitor()],
    "JacobianNormMonitor(every_n_epochs=1)": lambda: [JacobianNormMonitor(every_n_epochs=1)],
    "TransitionMonitor()": lambda: [TransitionMonitor()],
    "TransitionMonitor(log_figure=False)": lambda: [TransitionMonitor(log_figure=False)],
    "GeneralizationGapMonitor()": lambda: [GeneralizationGapMonitor()],
    "all three, defaults": lambda: [JacobianNormMonitor(), TransitionMonitor(), GeneralizationGapMonitor()],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    repeats = 3 if args.quick else 9
    root = tempfile.mkdtemp()

    def run(make: Callable[[], list[Callback]]) -> Any:
        return lambda: train(make(), max_epochs=args.epochs, logger=TensorBoardLogger(root))

    print(
        f"torch {torch.__version__}, {args.threads} thread(s); examples.digits.train(max_epochs={args.epochs})"
    )
    samples = timed(
        {"without": run(list), **{name: run(make) for name, make in CONFIGURATIONS.items()}}, repeats
    )
    base = samples["without"]
    print(f"{'without a monitor':40s} {statistics.median(base):6.2f} s  (median of {repeats})")
    for name in CONFIGURATIONS:
        ratios = [with_ / without for with_, without in zip(samples[name], base, strict=True)]
        print(f"{name:40s} {statistics.median(samples[name]):6.2f} s  ratio {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
