"""The causal test: train F1 grid models with the Jacobian penalty (and, beside them, weight decay) at a few
strengths, 0 included, and ask whether the generalization gap falls when the Jacobian norm is lowered on purpose.

    python -m examples.causal                                    # digits (offline)
    python -m examples.causal --quick                            # 6 small models, seconds: a smoke test
    python -m examples.causal --data-file ../shared/data/cifar10-subset.npz --train-points 1000 --bases 1 \
        --seeds 0 1 2 3 4 --strengths 0.03 0.1 --weight-decays 0.001 0.003 --out causal-cifar10
                                                                 # the CIFAR-10 run kept in docs/causal

A `.npz` data file holds uint8 images `train_images` / `test_images` `[N, C, H, W]` and integer `train_labels` /
`test_labels`; its test split is the held-out set. Writes to --out (default ./causal): results.csv (one row per
model; a re-run trains only the models it does not hold) and report.md (the design and the verdict rules, then
the numbers). The design, the rules and the report are in `examples/paper/causal.py`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

from examples.paper.causal import (
    QUICK_TRAIN_POINTS,
    CausalData,
    CausalModel,
    causal_design,
    design_text,
    train_and_measure,
    write_report,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.causal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small base, two seeds, one strength each, on a "
                        f"subset of {QUICK_TRAIN_POINTS} training points (seconds)")
    parser.add_argument("--train-points", type=int, default=None, help="a seeded subset of the training points")
    parser.add_argument("--data-file", default=None, help="a .npz data set instead of digits (see above)")
    parser.add_argument("--seed", type=int, default=0, help="the digits split's seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the models' seeds (default 0 1 2; quick 0 1)")
    parser.add_argument("--max-epochs", type=int, default=None, help="the training budget (default 300, quick 60)")
    parser.add_argument("--bases", type=int, default=None, help="the first N base configurations only (default: all 4)")
    parser.add_argument("--strengths", type=float, nargs="+", default=None,
                        help="the Jacobian penalty's nonzero strengths (default 0.01 0.03 0.1)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=None,
                        help="the weight decays (default 0.0001 0.001 0.003)")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once, in separate processes")
    parser.add_argument("--out", type=Path, default=Path("causal"))
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.data_file is not None and not Path(args.data_file).is_file():
        parser.error(f"--data-file {args.data_file}: no such file")
    return args


def _rows(todo: Sequence[CausalModel], data: CausalData, jobs: int) -> Iterator[dict]:
    if jobs == 1:
        yield from (train_and_measure(model, data) for model in todo)
        return
    # spawn, not fork (a forked child inherits torch's thread pools in an unusable state); one thread per model:
    # these small networks train slower when threads contend for the cores.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        futures = [pool.submit(train_and_measure, model, data) for model in todo]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the causal test; return the path of its report."""
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    train_points = args.train_points or (QUICK_TRAIN_POINTS if args.quick else None)
    data = CausalData(None if args.data_file is None else str(args.data_file), args.seed, train_points)
    design = causal_design(args.quick, args.max_epochs, args.seeds, args.bases, args.strengths, args.weight_decays)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table_path = out / "results.csv"
    table = pd.read_csv(table_path) if table_path.exists() else pd.DataFrame({"model_id": pd.Series(dtype=str)})
    if "dataset" in table and (table.dataset != data.name).any():
        raise SystemExit(f"{table_path} holds models of another data set: give this run its own --out folder.")
    todo = [m for m in design if m.model_id not in set(table.model_id)]
    print(f"Causal test on {data.name}: {len(design)} models, {len(design) - len(todo)} already in {table_path}.")
    for done, row in enumerate(_rows(todo, data, args.jobs), 1):
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
        tmp = table_path.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, table_path)
        print(f"  [{done}/{len(todo)}] {row['model_id']}: {row['epochs_trained']} epochs, "
              f"{'fit' if row['reached_target'] else 'did not fit'}, {row['train_seconds']:.0f} s", flush=True)
    table = table.set_index("model_id").loc[[m.model_id for m in design]].reset_index()
    elapsed = time.perf_counter() - start
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m examples.causal", *map(shlex.quote, given)])
    setup = [
        f"{len(table)} models, {int(table.reached_target.sum())} reached the fit criterion; training took "
        f"{table.train_seconds.sum():.0f} s summed over the models.",
        (f"This invocation: {elapsed:.0f} s wall time with {args.jobs} job(s), {len(todo)} model(s) trained"
         if todo else f"This invocation trained no model (all {len(design)} were in `results.csv` from an earlier "
         "run) and wrote this report")
        + f"; Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores.",
    ]
    report = write_report(out, table, design_text(design, data), setup, command)
    print(f"Report: {report}")
    return report


if __name__ == "__main__":
    main()
