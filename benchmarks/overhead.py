"""Overhead of the monitors on a training run: wall time with a monitor / wall time without, printed.

    python -m benchmarks.overhead                   # 30-epoch digits training, 15 interleaved repeats
    python -m benchmarks.overhead --quick           # 3 repeats
    python -m benchmarks.overhead --only Transition --repeats 25   # configurations whose name contains a string
    python -m benchmarks.overhead --workload cnn    # a 10-epoch CNN on 8,000 28 x 28 inputs (a realistic run)
    python -m benchmarks.overhead --workload cnn --per-measurement   # each measurement's time, in epochs
    python -m benchmarks.overhead --workload cnn --in-hooks --repeats 5   # the monitors' own time, per run
    python -m benchmarks.overhead --workload cnn --watch-jacobian   # one Jacobian watch pass's measurement, per watch set

The ``digits`` workload (the default) is ``examples.digits.train`` (the MLP 64-128-128-10 on scikit-learn's digits, 1,258 training and 539
validation points, batch 64) with a ``TensorBoardLogger``, the setting of the README. It is a small run (about a
second on one CPU core), so every fixed cost of a monitor shows: on a real model the same measurement is a far
smaller share. Runs are interleaved, in a new random order every round (a heavy run can leave the process slower
for the next one, so no configuration always follows the same other). Two ratios are printed: the *paired* ratio,
the median over repeats of each run's time over the time of the run without a monitor in the same round, and the
*fastest* ratio, the fastest run's time over the fastest run without a monitor (interference from other work on a
shared machine only ever adds time, so the fastest runs are the least disturbed; but a minimum is itself noisy).
Both are printed for the wall time and for the process's CPU time (all its threads).

The ``cnn`` workload is closer to a real run: two convolutions (16 and 32 channels, 3 x 3, each followed by ReLU
and 2 x 2 max-pooling) and a linear head, trained for 10 epochs with SGD at batch 64 on 8,000 inputs of 28 x 28
(digits upscaled from 8 x 8, each drawn several times with a random shift of up to 2 pixels and a little noise, so
nothing is downloaded), validated on 2,000 such inputs.

``--per-measurement`` prints what one measurement of each monitor costs, in epoch-equivalents: a run without a
monitor gives the time of an epoch (its wall time over its epochs), then a run with the three monitors at their
defaults except ``every_n_epochs=1`` and ``log_seconds=True`` gives each measurement's own logged time. Multiply by
the number of measurements a schedule makes (the defaults: every 10th pass and the last) to get a run's overhead.

``--watch-jacobian`` times ``jacobian_norm`` on the workload's untrained model as a watch pass calls it, for watch
sets of 8 and 32 points measured exactly and 16 and 32 points at 2 products a point with a generator per point
(the default watch set), calls interleaved, and prints the median of each.

``--in-hooks`` times what the three monitors at their defaults do inside their hooks (every hook Lightning calls
on them, wrapped on the instance), round after round beside a run without a monitor, and prints that time over the
run's: the monitors' own cost, which a comparison of two whole runs measures only to within their noise (an empty
callback lands 1 to 4% away from 1 here). It leaves out Lightning's own dispatch of the hooks. With ``--only``, it
times the first configuration whose name holds that string instead (``--in-hooks --only lean``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn

from benchmarks._timing import timed
from examples.digits import DigitsDataModule, MLPClassifier, load_digits_tensors, train
from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor
from lightning_sensitivity.functional import jacobian_norm

CONFIGURATIONS: dict[str, Callable[[], list[Callback]]] = {
    "an empty Callback()": lambda: [Callback()],
    "JacobianNormMonitor()": lambda: [JacobianNormMonitor()],
    "TransitionMonitor()": lambda: [TransitionMonitor()],
    "GeneralizationGapMonitor()": lambda: [GeneralizationGapMonitor()],
    "all three, defaults": lambda: [JacobianNormMonitor(), TransitionMonitor(), GeneralizationGapMonitor()],
    "all three, no watch set (full at the end)": lambda: [
        JacobianNormMonitor(watch_points=0),
        TransitionMonitor(watch_segments=0),
        GeneralizationGapMonitor(watch_train_points=0),
    ],
    "all three, former defaults (every 10th, 2x sizes, no watch)": lambda: [
        JacobianNormMonitor(max_points=256, every_n_epochs=10, watch_points=0),
        TransitionMonitor(num_trajectories=4, every_n_epochs=10, watch_segments=0),
        GeneralizationGapMonitor(max_train_points=10_000, every_n_epochs=10, watch_train_points=0),
    ],
    "all three, lean (half sizes, no figure)": lambda: [
        JacobianNormMonitor(max_points=64, watch_points=16),
        TransitionMonitor(watch_segments=8, log_figure=False),
        GeneralizationGapMonitor(max_train_points=500, watch_train_points=32),
    ],
    "all three, full every pass": lambda: [
        JacobianNormMonitor(every_n_epochs=1),
        TransitionMonitor(every_n_epochs=1),
        GeneralizationGapMonitor(every_n_epochs=1),
    ],
}


class _CNNClassifier(MLPClassifier):
    """The ``cnn`` and ``cifar`` workloads' model: the digits classifier's training and validation steps around a
    small CNN (two 3 x 3 convolutions of 16 and 32 channels, each followed by ReLU and 2 x 2 max-pooling, and a
    linear head) on ``channels x size x size`` inputs."""

    def __init__(self, channels: int = 1, size: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (size // 4) ** 2, 10),
        )


def _upscaled_digits(num_train: int = 8000, num_val: int = 2000, seed: int = 0) -> DigitsDataModule:
    """8,000 training and 2,000 validation inputs of 1 x 28 x 28 made from the bundled digits (see the module
    docstring), at batch 64."""
    x_train, y_train, x_val, y_val = load_digits_tensors(seed)
    generator = torch.Generator().manual_seed(seed)
    data = (*_upscaled(x_train, y_train, num_train, generator), *_upscaled(x_val, y_val, num_val, generator))
    return DigitsDataModule(batch_size=64, seed=seed, data=data)


def _upscaled(x: Tensor, y: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    index = torch.randint(len(x), (n,), generator=generator)
    images = F.interpolate(x[index].reshape(n, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    shifts = torch.randint(0, 5, (n, 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(28)
    cols = shifts[:, 1, None] + torch.arange(28)
    images = images[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
    noise = 0.05 * torch.randn(images.shape, generator=generator)
    return (images + noise).contiguous(), y[index]


def _seeded_cnn(**shape: int) -> _CNNClassifier:
    """The workloads' CNN, initialized from seed 0: every run trains the same model (``train`` seeds again)."""
    pl.seed_everything(0, verbose=False)
    return _CNNClassifier(**shape)


def _train_cnn(callbacks: list[Callback], max_epochs: int, logger: Any) -> None:
    train(callbacks, max_epochs=max_epochs, logger=logger, model=_seeded_cnn(), datamodule=_upscaled_digits())


def _cifar_subset(path: str) -> DigitsDataModule:
    """The CIFAR-10 subset of ``path`` (an ``.npz`` with ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``, images ``uint8 [N, 3, 32, 32]``) scaled to [0, 1]: training on the training images at batch 64,
    validation on the test images."""
    import numpy as np

    with np.load(path) as arrays:
        data = tuple(
            torch.from_numpy(arrays[name]).float() / 255 if name.endswith("images") else torch.from_numpy(arrays[name])
            for name in ("train_images", "train_labels", "test_images", "test_labels")
        )
    return DigitsDataModule(batch_size=64, data=data)


def _cifar_fit(path: str) -> Callable[..., None]:
    datamodule = _cifar_subset(path)

    def fit(callbacks: list[Callback], max_epochs: int, logger: Any) -> None:
        model = _seeded_cnn(channels=3, size=32)
        train(callbacks, max_epochs=max_epochs, logger=logger, model=model, datamodule=datamodule)

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workload", choices=["digits", "cnn", "cifar"], default="digits")
    parser.add_argument("--data-file", default=None, help="the CIFAR-10 subset (.npz) of the cifar workload")
    parser.add_argument("--epochs", type=int, default=None, help="default 30 (digits), 10 (cnn) or 20 (cifar)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default 1; 2 for cifar, the issue's run)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default 15; 3 with --quick)"
    )
    parser.add_argument("--only", default="", help="run the configurations whose name contains this string")
    parser.add_argument("--per-measurement", action="store_true", help="each measurement's time, in epochs")
    parser.add_argument(
        "--in-hooks", action="store_true", help="the time spent inside the three monitors' hooks, per run"
    )
    parser.add_argument(
        "--watch-error", action="store_true", help="the watch sets' values against the full measurement's"
    )
    parser.add_argument("--watch-jacobian", action="store_true", help="a Jacobian watch set's time, per size")
    args = parser.parse_args()
    threads = args.threads or (2 if args.workload == "cifar" else 1)
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    repeats = args.repeats or (3 if args.quick else 15)
    epochs = args.epochs or {"digits": 30, "cnn": 10, "cifar": 20}[args.workload]
    if args.workload == "cifar":
        if args.data_file is None:
            parser.error("--workload cifar needs --data-file (the CIFAR-10 subset, an .npz)")
        fit = _cifar_fit(args.data_file)
    else:
        fit = train_digits if args.workload == "digits" else _train_cnn
    root = tempfile.mkdtemp()
    if args.per_measurement:
        _per_measurement(fit, epochs, root)
        return
    if args.in_hooks:
        # The configuration that --only names (its first match), by default the three at their defaults.
        name = next((n for n in CONFIGURATIONS if args.only and args.only in n), "all three, defaults")
        print(f"in the hooks of: {name}")
        _in_hooks(fit, epochs, root, repeats, CONFIGURATIONS[name])
        return
    if args.watch_error:
        _watch_error(fit, epochs, root)
        return
    if args.watch_jacobian:
        _watch_jacobian(args.workload, args.repeats or 15)
        return
    configurations = {name: make for name, make in CONFIGURATIONS.items() if args.only in name}
    cpu: dict[str, list[float]] = {name: [] for name in ["without", *configurations]}

    def run(name: str, make: Callable[[], list[Callback]]) -> Any:
        def fn() -> None:
            start = time.process_time()
            fit(make(), max_epochs=epochs, logger=TensorBoardLogger(root))
            cpu[name].append(time.process_time() - start)

        return fn

    print(
        f"torch {torch.__version__}, {threads} thread(s); workload {args.workload}, {epochs} epochs"
    )
    samples = timed(
        {"without": run("without", list), **{name: run(name, make) for name, make in configurations.items()}},
        repeats,
        shuffle_seed=0,
    )
    cpu = {name: times[1:] for name, times in cpu.items()}  # without the warm-up call, as `timed` does

    def paired(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times["without"], strict=True))

    def fastest(times: dict[str, list[float]], name: str) -> float:
        return min(times[name]) / min(times["without"])

    print(
        f"{'':40s} {'median':>8s} {'paired':>8s} {'fastest':>8s} {'CPU':>8s} {'fastest':>8s}\n"
        f"{'':40s} {'wall':>8s} {'ratio':>8s} {'ratio':>8s} {'ratio':>8s} {'CPU ratio':>8s}   ({repeats} repeats)"
    )
    for name in ["without", *configurations]:
        label = "without a monitor" if name == "without" else name
        print(
            f"{label:40s} {statistics.median(samples[name]):6.2f} s {paired(samples, name):7.3f}x "
            f"{fastest(samples, name):7.3f}x {paired(cpu, name):7.3f}x {fastest(cpu, name):8.3f}x"
        )


class _Seconds(Callback):
    """Collects the monitors' ``*_seconds`` values at each epoch end."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_seconds"):
                self.values.setdefault(key, []).append(float(value))


def _per_measurement(fit: Callable[..., None], epochs: int, root: str) -> None:
    """What one measurement of each monitor costs, in epochs: the full measurement (every pass measured in full), and
    the watch set (the defaults, whose full measurement is at the last pass only: the other passes are watch passes)."""
    start = time.perf_counter()
    fit([], max_epochs=epochs, logger=TensorBoardLogger(root))
    epoch = (time.perf_counter() - start) / epochs
    runs = {
        "full": dict(every_n_epochs=1),
        "watch": dict(),
    }
    medians: dict[str, dict[str, float]] = {}
    for kind, schedule in runs.items():
        seconds = _Seconds()
        monitors: list[Callback] = [
            JacobianNormMonitor(log_seconds=True, **schedule),
            TransitionMonitor(log_seconds=True, log_figure=False, **schedule),
            GeneralizationGapMonitor(log_seconds=True, **schedule),
        ]
        fit([*monitors, seconds], max_epochs=epochs, logger=TensorBoardLogger(root))
        # the watch run's last pass is its full measurement; the gap's first measurement also reads the training
        # subset: the medians are the steady costs
        medians[kind] = {
            key: statistics.median(values[:-1] if kind == "watch" else values)
            for key, values in seconds.values.items()
        }
    print(f"an epoch without a monitor: {epoch:.3f} s (the run's wall time over its {epochs} epochs)")
    print(f"{'one measurement of':42s} {'full':>9s} {'epochs':>7s} {'watch':>9s} {'epochs':>7s}")
    for key in medians["full"]:
        full, watch = medians["full"][key], medians["watch"].get(key, float("nan"))
        print(f"{key:42s} {full:7.3f} s {full / epoch:7.4f} {watch:7.4f} s {watch / epoch:7.4f}")
    full = sum(medians["full"].values()) / epoch
    watch = sum(medians["watch"].values()) / epoch
    print(
        f"{'the three':42s} {full:17.4f} {watch:17.4f}\n"
        f"at the defaults on {epochs} epochs (the full measurement at the last pass, the watch set at the "
        f"{epochs - 1} others; without the figure and the anchors' reservoir): "
        f"{(full + (epochs - 1) * watch) / epochs:.2%} of the run"
    )


class _Values(Logger):
    """A logger that keeps every value the monitors log, in the order logged."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[float]] = {}

    @property
    def name(self) -> str:
        return "values"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key.startswith(("sensitivity/", "generalization/")):
                self.values.setdefault(key, []).append(float(value))


#: Keys whose values cross or sit near 0 (differences, correlations): their watch values are compared by the
#: absolute difference, the others' by the relative one.
_NEAR_ZERO = ("gap_loss", "gap_accuracy", "jacobian_loss_spearman")


def _watch_error(fit: Callable[..., None], epochs: int, root: str) -> None:
    """The watch sets' sampling error: a run with the three monitors at their defaults but measured in full at every
    pass, so that each pass logs the full value and the watch set's (a part of the same measurement); for each
    quantity, the two series compared pass by pass and as curves."""
    from torchmetrics.functional import spearman_corrcoef

    values = _Values()
    monitors: list[Callback] = [
        JacobianNormMonitor(every_n_epochs=1),
        TransitionMonitor(every_n_epochs=1),
        GeneralizationGapMonitor(every_n_epochs=1),
    ]
    fit(monitors, max_epochs=epochs, logger=[TensorBoardLogger(root), values])
    print(
        f"{epochs} passes, each measured in full; the watch values are the watch set's part of the same measurement\n"
        f"{'quantity':44s} {'full, mean':>11s} {'watch, mean':>11s} {'difference':>11s} {'median |diff|':>14s} "
        f"{'Spearman':>9s} {'Pearson':>8s}"
    )
    for key in [key for monitor in monitors for key in monitor.logged_keys("scalar", watch=False)]:
        watch = values.values.get(f"{key}_watch")
        if key not in values.values or watch is None:
            continue
        full = torch.tensor(values.values[key], dtype=torch.float64)
        watched = torch.tensor(watch, dtype=torch.float64)
        absolute = key.endswith(_NEAR_ZERO)
        scale = 1.0 if absolute else full.abs()
        each = ((watched - full) / scale).abs().median()
        means = watched.mean() - full.mean()
        means = means if absolute else means / full.mean().abs()
        rho = spearman_corrcoef(watched, full) if len(full) > 2 else torch.tensor(float("nan"))
        pearson = torch.corrcoef(torch.stack([watched, full]))[0, 1] if len(full) > 2 else torch.tensor(float("nan"))
        unit = "" if absolute else "%"
        factor = 1 if absolute else 100
        print(
            f"{key:44s} {full.mean():11.4g} {watched.mean():11.4g} {factor * means:+10.3g}{unit or ' '} "
            f"{factor * each:13.3g}{unit or ' '} {rho:9.3f} {pearson:8.3f}"
        )
    print("(difference: of the watch series' mean from the full series' mean, relative (%) or absolute for the gaps "
          "and the correlation; median |diff|: pass by pass; Spearman, Pearson: of the two series across the passes)")


def _watch_jacobian(workload: str, repeats: int) -> None:
    """The median time of one Jacobian watch pass's measurement on the workload's model, per watch set."""
    shape = {"digits": None, "cnn": (1, 28), "cifar": (3, 32)}[workload]
    if shape is None:
        model: nn.Module = MLPClassifier().net
        x = torch.rand(32, 64)
    else:
        model = _seeded_cnn(channels=shape[0], size=shape[1]).net
        x = torch.rand(32, shape[0], shape[1], shape[1])
    model.eval()

    def projected(n: int) -> Callable[[], Tensor]:
        return lambda: jacobian_norm(
            model, x[:n], method="projection", num_projections=2,
            generator=[torch.Generator().manual_seed(i) for i in range(n)],
        )

    sets = {
        "8 points, exact (the former watch set)": lambda: jacobian_norm(model, x[:8]),
        "32 points, exact": lambda: jacobian_norm(model, x[:32]),
        "16 points, 2 products each": projected(16),
        "32 points, 2 products each (the default)": projected(32),
    }
    samples = timed(sets, repeats, shuffle_seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); workload {workload}'s model, untrained")
    for name, times in samples.items():
        print(f"{name:45s} {1e3 * statistics.median(times):7.1f} ms  ({repeats} repeats)")


def _timing_hooks(callback: Callback, seconds: dict[str, float]) -> Callback:
    """``callback`` with every hook Lightning calls timed into ``seconds[hook name]`` (instance attributes, which
    Lightning's ``getattr`` finds first)."""
    for name in dir(Callback):
        if name.startswith("on_") or name in ("setup", "teardown", "state_dict", "load_state_dict"):
            hook = getattr(callback, name)

            def timed_hook(*args: Any, _hook: Callable[..., Any] = hook, _key: str = name, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _hook(*args, **kwargs)
                finally:
                    key = f"{type(callback).__name__}.{_key}"
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

            setattr(callback, name, timed_hook)
    return callback


def _in_hooks(fit: Callable[..., None], epochs: int, root: str, repeats: int,
              make: Callable[[], list[Callback]]) -> None:
    """Rounds of a run without a monitor and a run with the monitors ``make`` returns (the three at their defaults
    unless ``--only`` names another configuration) whose hooks are timed: the monitors' own time, free of the
    run-to-run noise of comparing two 20-second runs."""
    print(f"{'round':>5s} {'without':>9s} {'with':>9s} {'in hooks':>9s} {'in hooks / without':>19s}")
    shares, hooks_total = [], {}
    for i in range(repeats):
        start = time.perf_counter()
        fit([], max_epochs=epochs, logger=TensorBoardLogger(root))
        without = time.perf_counter() - start
        seconds: dict[str, float] = {}
        monitors = make()
        start = time.perf_counter()
        fit([_timing_hooks(monitor, seconds) for monitor in monitors], max_epochs=epochs, logger=TensorBoardLogger(root))
        with_monitors = time.perf_counter() - start
        inside = sum(seconds.values())
        shares.append(inside / without)
        for key, value in seconds.items():
            hooks_total.setdefault(key, []).append(value)
        print(f"{i:5d} {without:8.2f}s {with_monitors:8.2f}s {inside:8.3f}s {inside / without:18.2%}")
    print(f"median share of a run without a monitor: {statistics.median(shares):.2%}; the hooks that take the time:")
    for key, values in sorted(hooks_total.items(), key=lambda item: -statistics.median(item[1]))[:6]:
        print(f"  {key:55s} {statistics.median(values):.3f} s")


def train_digits(callbacks: list[Callback], max_epochs: int, logger: Any) -> None:
    train(callbacks, max_epochs=max_epochs, logger=logger)


if __name__ == "__main__":
    main()
