"""Reproduce the findings of Novak et al., "Sensitivity and Generalization in Neural Networks" (ICLR 2018).

    python -m examples.reproduce                 # the default sweep on digits (1,212 models, two at a time)
    python -m examples.reproduce --grid small    # the 144-model grid of earlier versions (204 models in all)
    python -m examples.reproduce --quick         # 14 models, under 2 minutes (what CI runs)
    python -m examples.reproduce --jobs 1        # one model at a time
    python -m examples.reproduce --ray           # the same sweep as Ray Tune trials (pip install -e ".[ray]")
    python -m examples.reproduce --dataset mnist --data-dir data --download --train-points 10000
    python -m examples.reproduce --data-file my.npz   # your own arrays (see below)
    python -m examples.reproduce --report-only   # the report of the models --out holds, training none

It trains the sweep until each model fits its training set (F1, F3), every run logged to TensorBoard under
./runs, measures each model and its baselines (F1, F4), compares transition counts across sizes, studies one
model along random ellipses and ellipses through training points (F2), and writes to --out (default
./reproduction): results.csv (one row per model; a re-run trains only the models it does not hold), the F2
tables, per-point records, PNG figures, and report.md, which states its verdict rules and then what reproduced
and what did not, with the numbers. A sweep stopped before its end (a long one on a small machine) gives its
report so far with --report-only: the report names the models it lacks at its top, and its findings are over the
models trained.

A data file (--data-file, numpy's .npz) holds the arrays train_images and test_images ([N, ...], channels first,
for example [N, 3, 32, 32]; uint8 is divided by 255, floating point is taken as it is), train_labels and
test_labels ([N] integers from 0), and optionally classes (the class names); the test arrays are the held-out set.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from examples.paper.data import DATASETS, DataSpec
from examples.paper.grid import GRIDS, Sweep


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of the reproduction."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the smallest sweep (14 models, 40 epochs at most)")
    parser.add_argument("--grid", choices=[g for g in GRIDS if g != "quick"], default="default",
                        help="the F1 grid: default (1,152 models) or small (the 144 of earlier versions)")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="a named data set (default digits)")
    parser.add_argument("--data-file", type=Path, default=None,
                        help="a .npz file of train_images, train_labels, test_images, test_labels (see above)")
    parser.add_argument("--data-dir", default="data", help="torchvision root folder (not used for digits)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the data set")
    parser.add_argument("--train-points", type=int, default=None, help="a seeded subset of the training set")
    parser.add_argument("--val-points", type=int, default=None, help="a seeded subset of the held-out set")
    parser.add_argument("--seed", type=int, default=0, help="the first seed of the grid, the seed of F3 and of the F2 anchors")
    parser.add_argument("--max-epochs", type=int, default=None, help="mini-batch budget in epochs (default 300, quick 40; full batch: 10x)")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once (processes or Ray trials)")
    parser.add_argument("--ray", action="store_true", help="run the sweep on Ray Tune (the `ray` extra)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--ellipses", type=int, default=None, help="F2 ellipses of each kind (default 20, quick 4)")
    parser.add_argument("--ellipse-points", type=int, default=None, help="points per F2 ellipse, a multiple of 6 (default 600, quick 120)")
    parser.add_argument("--out", type=Path, default=Path("reproduction"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--report-only", action="store_true",
                        help="train no model of the sweep: report on the models --out/results.csv holds (F2 runs)")
    args = parser.parse_args(argv)
    if args.address is not None and not args.ray:
        parser.error("--address joins a Ray cluster: it needs --ray")
    if args.data_file is not None and args.dataset is not None:
        parser.error("--data-file and --dataset each name the data: give one")
    if args.data_file is not None and not args.data_file.is_file():
        parser.error(f"--data-file {args.data_file}: no such file")
    if args.quick and "--grid" in (argv if argv is not None else sys.argv[1:]):
        parser.error("--quick has its own grid: leave out --grid")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.ellipse_points is not None and (args.ellipse_points < 6 or args.ellipse_points % 6):
        parser.error("--ellipse-points must be a positive multiple of 6 (the anchors are points of the curve)")
    return args


def unfinished(sweep: Sweep, trained: set[str]) -> list[str]:
    """The report's warning when ``trained`` lacks models of ``sweep`` (``--report-only`` on a sweep stopped early):
    how many of each part, and the F3 variants by factor; empty when the sweep is whole."""
    grid = [c for c in sweep.grid if c.model_id not in trained]
    variants = [(factor, v) for factor, _, v in sweep.variants if v.model_id not in trained]
    if not grid and not variants:
        return []
    by_factor = ", ".join(f"{factor} {n}" for factor, n in Counter(factor for factor, _ in variants).items())
    return [
        f"**An unfinished sweep** (`--report-only`): {len(grid)} of the {len(sweep.grid)} models of the F1 grid and "
        f"{len(variants)} of the {len(sweep.variants)} F3 variants are not trained"
        f"{f' ({by_factor})' if by_factor else ''}. Every finding below is over the models that were trained; "
        f"F3 counts only the pairs whose two models were. Missing grid models: "
        f"{', '.join(f'`{c.model_id}`' for c in grid) or 'none'}."
    ]


def quiet_lightning() -> None:
    """Keep the output readable: no per-run banners, no warnings that do not apply here (the logging interval is
    longer than a digits epoch on purpose, a deprecation inside Lightning)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the whole reproduction; return the path of the report."""
    args = parse_args(argv)
    start = time.perf_counter()
    # Imported here so that `--help` answers at once.
    import lightning
    import torch

    from examples.paper.analysis import pair_links, paired
    from examples.paper.grid import sweep_grid
    from examples.paper.manifold import manifold_experiment
    from examples.paper.report import Run, write_report
    from examples.paper.runner import run_sweep

    quiet_lightning()

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m examples.reproduce", *map(shlex.quote, given)])
    offsets = GRIDS["quick" if args.quick else args.grid].seed_offsets
    seeds = (
        f"Seeds: the grid's models use seeds {', '.join(str(args.seed + o) for o in offsets)} (data split, subsets, random labels, "
        f"noise, initial weights, batch order); the F3 bases and their variants use seed {args.seed}, so each "
        f"pair starts from the same weights; the F2 anchors are drawn with "
        f"`torch.Generator().manual_seed({args.seed})`, the bootstrap with `numpy.random.default_rng(0)`."
    )
    print(seeds)
    name = args.data_file.stem if args.data_file is not None else (args.dataset or "digits")
    spec = DataSpec(name, str(args.data_dir), args.download, args.seed, args.train_points, args.val_points,
                    None if args.data_file is None else str(args.data_file.resolve()))
    sweep = sweep_grid("quick" if args.quick else args.grid, args.seed, args.max_epochs)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = run_sweep(sweep.configs, spec, out / "results.csv", args.runs_dir, out / "points", jobs=args.jobs,
                      use_ray=args.ray, ray_address=args.address, train=not args.report_only)
    missing = unfinished(sweep, set(table.model_id))
    sweep_seconds = time.perf_counter() - start

    reference = sweep.reference
    num_ellipses = args.ellipses or (4 if args.quick else 20)
    num_points = args.ellipse_points or (120 if args.quick else 600)
    print(f"F2: {reference.model_id}, trained by its rule, at its first fit and untrained, {num_ellipses} ellipses of each kind, {num_points} points each.")
    manifold = manifold_experiment(reference, spec, str(args.runs_dir), num_ellipses, num_points, args.seed)
    manifold.curves.assign(model_id=reference.model_id).to_csv(out / "manifold.csv", index=False)
    manifold.profiles.to_csv(out / "manifold_profiles.csv", index=False)

    elapsed = time.perf_counter() - start
    grid_size = len(sweep.grid)
    counts = table.status.value_counts()
    sizes = table.num_train_points.dropna()
    f2_model = {"model_id": reference.model_id, "epochs": manifold.epochs, "first_fit_epoch": manifold.first_fit_epoch,
                "train_loss": manifold.train_loss, "first_fit_loss": manifold.first_fit_loss,
                "train_accuracy": manifold.train_accuracy, "clearance": manifold.clearance,
                "radius": manifold.radius}
    first_fit = ("never fit" if manifold.first_fit_epoch is None
                 else f"first fit at epoch {manifold.first_fit_epoch}")
    setup = [
        *missing,
        f"Data: {name}{f' (`{args.data_file.name}`)' if args.data_file is not None else ''}, "
        f"{int(sizes.iloc[0]) if len(sizes) else 0} training and "
        f"{int(table.num_val_points.dropna().iloc[0]) if len(sizes) else 0} held-out points.",
        f"Sweep: {len(table)} fully-connected models ({grid_size} in the F1 grid `{'quick' if args.quick else args.grid}`, "
        f"{len(sweep.variants)} F3 variants); {int(counts.get('fit', 0))} reached the fit criterion, "
        f"{int(counts.get('did not fit', 0))} did not, {int(counts.get('diverged', 0))} diverged, "
        f"{int(counts.get('failed', 0))} failed; training took {table.train_seconds.sum():.0f} s of wall time summed "
        f"over the models, training and measuring {table.cpu_seconds.sum():.0f} s of CPU time "
        f"({table.cpu_seconds.mean():.2f} s per model).",
        f"F2 model: `{reference.model_id}` ({first_fit}, {manifold.epochs} epochs in all, training accuracy "
        f"{manifold.train_accuracy:.3f}), {num_ellipses} ellipses of each kind with {num_points} points.",
        f"This invocation: {elapsed:.0f} s wall time ({sweep_seconds:.0f} s for the sweep), {args.jobs} job(s)"
        f"{' on Ray Tune' if args.ray else ''}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}.",
    ]
    run = Run(table, paired(table, pair_links(sweep)), manifold.profiles, manifold.curves, command, seeds, setup,
              f"{elapsed:.0f} s for this invocation with {args.jobs} job(s)", f2_model)
    report = write_report(out, run)
    print(f"{len(table)} models in {out / 'results.csv'}")
    print(f"Report: {report}\nTensorBoard: tensorboard --logdir {args.runs_dir}")
    return report


if __name__ == "__main__":
    main()
