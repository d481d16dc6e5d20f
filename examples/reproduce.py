"""Reproduce the findings of Novak et al., "Sensitivity and Generalization in Neural Networks" (ICLR 2018).

    python -m examples.reproduce                 # the default sweep on digits (48 models, under 20 min on 2 cores)
    python -m examples.reproduce --quick         # 12 models, under 2 minutes (what CI runs)
    python -m examples.reproduce --jobs 2        # two models at a time, in separate processes
    python -m examples.reproduce --ray           # the same sweep as Ray Tune trials (pip install -e ".[ray]")
    python -m examples.reproduce --dataset mnist --data-dir data --download --train-points 10000

It trains the sweep (F1, F3), every run logged to TensorBoard under ./runs, measures each model (F4), studies
one model on and off the data manifold (F2), and writes to --out (default ./reproduction): results.csv (one
row per model; a re-run trains only the models it does not hold), manifold.csv, per-point records, PNG figures,
and report.md, which says what reproduced and what did not, with the numbers.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from examples.paper.data import DATASETS, DataSpec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of the reproduction."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the small sweep (12 models, 30 epochs at most)")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", default="data", help="torchvision root folder (not used for digits)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the data set")
    parser.add_argument("--train-points", type=int, default=None, help="a seeded subset of the training set")
    parser.add_argument("--val-points", type=int, default=None, help="a seeded subset of the held-out set")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every model and of the F2 anchors")
    parser.add_argument("--max-epochs", type=int, default=None, help="training cap (default 100, quick 30)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once (processes or Ray trials)")
    parser.add_argument("--ray", action="store_true", help="run the sweep on Ray Tune (the `ray` extra)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--ellipses", type=int, default=None, help="F2 ellipses of each kind (default 10, quick 3)")
    parser.add_argument("--ellipse-points", type=int, default=None, help="points per F2 ellipse, a multiple of 6 (default 300, quick 120)")
    parser.add_argument("--out", type=Path, default=Path("reproduction"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    args = parser.parse_args(argv)
    if args.address is not None and not args.ray:
        parser.error("--address joins a Ray cluster: it needs --ray")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.ellipse_points is not None and (args.ellipse_points < 6 or args.ellipse_points % 6):
        parser.error("--ellipse-points must be a positive multiple of 6 (the anchors are points of the curve)")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the whole reproduction; return the path of the report."""
    args = parse_args(argv)
    start = time.perf_counter()
    # Imported here so that `--help` answers at once.
    import lightning
    import torch

    from examples.paper.manifold import manifold_experiment
    from examples.paper.report import write_report
    from examples.paper.runner import run_sweep
    from examples.paper.sweep import quiet_lightning, reference_model, sweep_grid

    quiet_lightning()

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m examples.reproduce", *map(shlex.quote, given)])
    seeds = (
        f"Seeds: every model uses seed {args.seed} (data split, subsets, random labels, augmentation, initial "
        f"weights, batch order; so each pair of F3 starts from the same weights), and the F2 anchors are drawn "
        f"with `torch.Generator().manual_seed({args.seed})`."
    )
    print(seeds)
    spec = DataSpec(args.dataset, str(args.data_dir), args.download, args.seed, args.train_points, args.val_points)
    configs = sweep_grid(args.quick, args.seed, args.max_epochs)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = run_sweep(configs, spec, out / "results.csv", args.runs_dir, out / "points", jobs=args.jobs,
                      use_ray=args.ray, ray_address=args.address)

    reference = reference_model(configs)
    num_ellipses = args.ellipses or (3 if args.quick else 10)
    num_points = args.ellipse_points or (120 if args.quick else 300)
    print(f"F2: {reference.model_id}, trained and untrained, {num_ellipses} ellipses of each kind, {num_points} points each.")
    manifold = manifold_experiment(reference, spec, str(args.runs_dir), num_ellipses, num_points, args.seed)
    manifold.curves.assign(model_id=reference.model_id).to_csv(out / "manifold.csv", index=False)
    manifold.profiles.to_csv(out / "manifold_profiles.csv", index=False)

    elapsed = time.perf_counter() - start
    setup = [
        f"Data: {args.dataset}, {int(table.num_train_points.iloc[0])} training and "
        f"{int(table.num_val_points.iloc[0])} held-out points.",
        f"Sweep: {len(table)} fully-connected models; {int(table.reached_target.sum())} reached 100% training "
        f"accuracy within {int(table.max_epochs.max())} epochs; training took {table.train_seconds.sum():.0f} s "
        f"in total.",
        f"F2 model: `{reference.model_id}` (training accuracy {manifold.train_accuracy:.3f}), {num_ellipses} "
        f"ellipses of each kind with {num_points} points.",
        f"This invocation: {elapsed:.0f} s wall time, {args.jobs} job(s){' on Ray Tune' if args.ray else ''}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}.",
    ]
    report = write_report(out, table, manifold.curves, manifold.profiles, command, seeds, setup)
    print(f"{len(table)} models in {out / 'results.csv'}")
    print(f"Report: {report}\nTensorBoard: tensorboard --logdir {args.runs_dir}")
    return report


if __name__ == "__main__":
    main()
