"""Running the sweep: one model at a time (trained, measured, logged: ``train_and_measure``), in this process, in
a pool of processes (``--jobs N``), or on Ray Tune (``--ray``).

Whatever runs the models, each finished model becomes one row of one tidy table (``results.csv``), written
after every model, so that an interrupted sweep keeps its finished models and a re-run trains only the rest.
Each run writes its training curve and final measurements to TensorBoard.

A model's ``status`` says how it ended (``STATUSES``): it fit its training set, it did not within its budget, it
diverged (a NaN or infinite loss or weight: no measures, ``diverged_epoch`` says when), or it failed (an exception
while training or measuring it, recorded in ``error``; or its worker process died twice, the second time alone).
A model that diverged or failed keeps its row, so the sweep goes on and a re-run does not train it again (delete
its row to try it again).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from examples.paper.data import DataSpec, load_tensors
from examples.paper.grid import ModelConfig, learning_rate_level
from examples.paper.measures import measure, num_units
from examples.paper.training import build_network, fit, training_labels

REPO_ROOT = Path(__file__).resolve().parents[2]

#: How a model of the sweep ended: the ``status`` column of the table.
STATUSES = ("fit", "did not fit", "diverged", "failed")

#: The function that trains and measures one model and returns its row (``train_and_measure``; a test may give
#: another, defined at a module's top level so that worker processes can import it).
Worker = Callable[[ModelConfig, DataSpec, str, str], dict[str, Any]]


def config_columns(config: ModelConfig) -> dict[str, Any]:
    """The hyper-parameter columns of a model's row (full batch: ``batch_size`` is filled in by the caller)."""
    return {
        "model_id": config.model_id,
        **dataclasses.asdict(config),
        "full_batch": config.batch_size is None,
        "lr_level": learning_rate_level(config.optimizer, config.lr),
    }


def train_and_measure(config: ModelConfig, spec: DataSpec, runs_dir: str, points_dir: str) -> dict[str, Any]:
    """Train one model (its curve and final measurements logged to TensorBoard under ``runs_dir``), measure it,
    and return its row of the table: every hyper-parameter and every measurement. Its per-point records are
    written to ``points_dir/<model_id>.csv``. A model that diverges is not measured: its row says when it
    diverged, and its measurements are missing."""
    from torch.utils.tensorboard import SummaryWriter

    x_train, y_true, x_val, y_val = load_tensors(spec)
    num_classes = int(torch.cat([y_true, y_val]).max()) + 1
    y_train = training_labels(y_true, num_classes, config.random_label_fraction, config.seed)
    model = build_network(config, x_train[0].numel(), num_classes)
    units = num_units(model, x_train[:1])  # before training: the untrained network's output is finite
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    folder = Path(runs_dir) / f"reproduce-{spec.name}" / config.model_id
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier try
    writer = SummaryWriter(str(folder))
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fit(model, x_train, y_train, config, writer)
    seconds = time.perf_counter() - start
    row = {
        **config_columns(config),
        "dataset": spec.name,
        "batch_size": config.batch_size or len(x_train),
        "num_train_points": len(x_train),
        "num_val_points": len(x_val),
        "num_units": units,
        "epochs_trained": result.epochs,
        "train_seconds": seconds,
    }
    if result.diverged:
        writer.close()
        return {**row, "status": "diverged", "diverged_epoch": result.diverged_epoch, "reached_target": False,
                "cpu_seconds": time.process_time() - cpu_start}
    summary, points = measure(model, initial, x_train, y_train, x_val, y_val, spec.seed)
    # CPU time, training and measuring: on a shared machine it grows far less than wall time does.
    cpu_seconds = time.process_time() - cpu_start
    for key in ("jacobian_norm", "transition_density"):
        writer.add_scalar(f"sensitivity/{key}", summary[key], result.epochs)
    for key in ("train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"):
        writer.add_scalar(f"generalization/{key}", summary[key], result.epochs)
    writer.close()
    Path(points_dir).mkdir(parents=True, exist_ok=True)
    points.to_csv(Path(points_dir) / f"{config.model_id}.csv", index=False)
    fitted = result.accuracy >= 1.0
    return {**row, "status": "fit" if fitted else "did not fit", "reached_target": fitted,
            "cpu_seconds": cpu_seconds, **summary}


def failed_row(config: ModelConfig, spec: DataSpec, error: str) -> dict[str, Any]:
    """The row of a model whose training or measuring raised, or whose worker process died: its hyper-parameters,
    ``status`` ``failed`` and the ``error``; no measurements."""
    return {**config_columns(config), "dataset": spec.name, "batch_size": config.batch_size,
            "status": "failed", "reached_target": False, "error": error}


def train_and_measure_safely(config: ModelConfig, spec: DataSpec, runs_dir: str, points_dir: str,
                             worker: Worker = train_and_measure) -> dict[str, Any]:
    """``worker(config, ...)``'s row, or, if it raises, the model's ``failed_row`` with the exception and where it
    was raised: one model's failure never ends the sweep."""
    try:
        return worker(config, spec, runs_dir, points_dir)
    except Exception as error:  # any failure of one model is recorded against it, whatever its kind
        where = traceback.extract_tb(error.__traceback__)[-1]
        return failed_row(config, spec, f"{type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})")


def read_table(path: Path) -> pd.DataFrame:
    """The table of finished models, or an empty one."""
    return pd.read_csv(path) if path.exists() else pd.DataFrame({"model_id": pd.Series(dtype=str)})


def with_status(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the columns ``status``, ``diverged_epoch`` and ``error`` (a table written before they
    existed holds only models that fit or did not)."""
    table = table.copy()
    derived = pd.Series(["fit" if bool(r) else "did not fit" for r in table.get("reached_target", [])],
                        index=table.index, dtype=object)
    table["status"] = table["status"].fillna(derived) if "status" in table else derived
    for column in ("diverged_epoch", "error"):
        if column not in table:
            table[column] = pd.Series(dtype=float if column == "diverged_epoch" else object, index=table.index)
    return table


def run_sweep(
    configs: Sequence[ModelConfig],
    spec: DataSpec,
    table_path: Path,
    runs_dir: Path,
    points_dir: Path,
    jobs: int = 1,
    use_ray: bool = False,
    ray_address: str | None = None,
    worker: Worker = train_and_measure,
    train: bool = True,
) -> pd.DataFrame:
    """Train and measure every model of ``configs`` that ``table_path`` does not hold yet; return the table of
    all of ``configs`` (in their order); with ``train=False``, train none and return the rows of the models it
    holds. Torch in this process is set to one thread (see below). A model that raises is recorded as failed and the
    sweep goes on (see the module docstring).

    Args:
        configs: the models of the sweep.
        spec: the data they train on.
        table_path: the CSV table, read first and rewritten after each finished model.
        runs_dir: TensorBoard logs, one version folder per model.
        points_dir: per-point records, one CSV per model.
        jobs: models trained at once in separate processes (or Ray trials).
        use_ray: run the models as Ray Tune trials.
        ray_address: an existing Ray cluster to join (``None``: start a local Ray instance).
        worker: what trains and measures one model (tests give one that fails on purpose).
        train: ``False`` trains nothing (the report of a sweep stopped before its end).

    Raises:
        ValueError: if ``table_path`` holds models of another data set.
    """
    # One thread per model: these small networks train several times slower when two threads contend for
    # the cores, and --jobs uses the other cores better.
    torch.set_num_threads(1)
    table = read_table(table_path)
    if "dataset" in table and (table.dataset != spec.name).any():
        raise ValueError(
            f"{table_path} holds models trained on {sorted(set(table.dataset))}, not on {spec.name!r}: give this "
            "sweep its own --out folder."
        )
    _check_sizes(table, spec, table_path)
    done = set(table.model_id)
    missing = [c for c in configs if c.model_id not in done]
    todo = missing if train else []
    print(f"Sweep: {len(configs)} models, {len(configs) - len(missing)} already in {table_path}, {len(todo)} to train.")
    args = (spec, str(runs_dir), str(points_dir))
    if use_ray:
        rows: Iterator[dict[str, Any]] = _ray_rows(todo, args, jobs, ray_address, table_path.parent / "ray")
    elif jobs > 1:
        rows = _pool_rows(todo, args, jobs, worker)
    else:
        rows = (train_and_measure_safely(c, *args, worker=worker) for c in todo)
    for row in tqdm(rows, total=len(todo), desc="models", unit="model", disable=not todo):
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
        _write_atomically(table, table_path)
    wanted = [c.model_id for c in configs if train or c.model_id in done]
    ordered = with_status(table.set_index("model_id").loc[wanted].reset_index())
    if todo:
        # Rows arrive in the order the models finish: the file keeps the sweep's order (then any other models).
        _write_atomically(pd.concat([ordered, table[~table.model_id.isin(wanted)]], ignore_index=True), table_path)
    return ordered


def _check_sizes(table: pd.DataFrame, spec: DataSpec, table_path: Path) -> None:
    """``ValueError`` when ``table`` holds models trained on other numbers of training or held-out points than
    ``spec`` gives (another ``--train-points`` or ``--val-points`` into the same folder), which one table would
    otherwise mix into one population."""
    if table.empty or "num_train_points" not in table:
        return
    x_train, _, x_val, _ = load_tensors(spec)
    sizes = table[["num_train_points", "num_val_points"]].dropna()  # (a failed model may have none)
    held = {(int(t), int(v)) for t, v in sizes.itertuples(index=False)}
    wanted = (len(x_train), len(x_val))
    if held - {wanted}:
        found = ", ".join(f"{t} and {v}" for t, v in sorted(held))
        raise ValueError(
            f"{table_path} holds models trained on {found} training and held-out points, not on the {wanted[0]} and "
            f"{wanted[1]} of this command (--train-points, --val-points): give this sweep its own --out folder, or "
            "repeat the options of the sweep it holds."
        )


def _write_atomically(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _pool_rows(todo: Sequence[ModelConfig], args: tuple[Any, ...], jobs: int,
               worker: Worker) -> Iterator[dict[str, Any]]:
    # At most `jobs` models in flight, so that when a worker process dies (a segfault, the kernel's OOM killer),
    # the models it may have held are known: each is tried again alone, and one that kills its process alone too
    # is recorded as failed. An exception inside a model is caught in its worker (train_and_measure_safely).
    context = multiprocessing.get_context("spawn")
    pending = deque(todo)
    suspects: set[str] = set()
    while pending:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                                    initargs=(1,)) as pool:
            running: dict[concurrent.futures.Future, ModelConfig] = {}
            broken = False
            while (pending or running) and not broken:
                while pending and len(running) < jobs and not any(c.model_id in suspects for c in running.values()):
                    if pending[0].model_id in suspects and running:
                        break  # a suspect waits until it can run alone
                    config = pending.popleft()
                    try:
                        running[pool.submit(train_and_measure_safely, config, *args, worker=worker)] = config
                    except BrokenProcessPool:
                        # A process died after `wait` last returned: this model never started; the ones running
                        # are tried again below.
                        pending.appendleft(config)
                        broken = True
                        break
                if broken:
                    break
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    config = running.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool as error:
                        broken = True
                        if config.model_id in suspects:  # it ran alone: its own process died
                            yield failed_row(config, args[0], f"its worker process died twice, the second time "
                                                              f"alone ({error})")
                        else:
                            suspects.add(config.model_id)
                            pending.appendleft(config)
            for config in running.values():  # the pool broke under them: each is tried again, alone
                suspects.add(config.model_id)
                pending.appendleft(config)


def _tune_trial(params: dict[str, Any]) -> None:
    """One Ray Tune trial: a model of the sweep; its table row is the trial's reported result."""
    from ray import tune

    torch.set_num_threads(1)
    config = ModelConfig(**params["config"])
    spec = DataSpec(**params["spec"])
    row = train_and_measure_safely(config, spec, params["runs_dir"], params["points_dir"])
    # One JSON string, so the row comes back exactly, apart from the keys Tune adds to every result.
    tune.report({"row": json.dumps(row)})


def _ray_rows(todo: Sequence[ModelConfig], args: tuple[Any, ...], jobs: int, address: str | None,
              storage: Path) -> Iterator[dict[str, Any]]:
    import ray
    from ray import tune

    if not todo:
        return
    spec, runs_dir, points_dir = args
    # The workers import this package from the repository, wherever Ray starts them on this machine.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
             ignore_reinit_error=True, log_to_driver=False)
    try:
        space = {
            "config": tune.grid_search([dataclasses.asdict(c) for c in todo]),
            "spec": dataclasses.asdict(spec),
            "runs_dir": str(Path(runs_dir).resolve()),
            "points_dir": str(Path(points_dir).resolve()),
        }
        tuner = tune.Tuner(
            tune.with_resources(_tune_trial, {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=jobs),
            run_config=tune.RunConfig(storage_path=str(storage.resolve()), name="sweep", verbose=0),
        )
        results = tuner.fit()
        for result in results:
            if result.error is not None:  # the trial's process itself failed: recorded against its model
                config = ModelConfig(**result.config["config"])
                yield failed_row(config, spec, f"the Ray Tune trial failed: {result.error}")
                continue
            yield json.loads(result.metrics["row"])
    finally:
        ray.shutdown()
