"""The benchmark scripts run and print their tables (their figures are read by people, not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_run(module: str, timeout: int) -> str:
    """``python -m benchmarks.<module> --quick`` from the repository root; its standard output, once it succeeded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_jacobian_benchmark_quick_mode_prints_its_tables():
    stdout = _quick_run("jacobian", timeout=900)
    for header in (
        "== per-point accuracy at confident points",
        "== exact jacobian_norm against the references",
        "== resnet18 (torchvision) at 3x16x16, batch 4",
        "ours/faster ref",
        "ours/floor",
        "== projection estimator on resnet18, C = 200",
        "== projection estimator: validation-set mean against exact",
    ):
        assert header in stdout, stdout[-3000:]


@pytest.mark.slow
def test_penalty_benchmark_quick_mode_prints_its_table():
    stdout = _quick_run("penalty", timeout=600)
    assert "== one SGD step: cross-entropy alone, with the logits' Jacobian penalty (ours), with JacobianReg's ==" in stdout
    for name in ("digits MLP 64-64-64-10", "small CNN (2 conv + linear)", "resnet18, 3x32x32, C=10"):
        assert stdout.count(name) == 3, name  # K = 1, K = 3 and exact
    assert stdout.count("time x variance, ours/JacobianReg") == 6


def test_jacobian_reg_reimplementation_estimates_the_squared_norm():
    """The benchmark's reference is JacobianReg's algorithm: exact with its unit vectors, unbiased with random ones."""
    import torch

    from benchmarks.penalty import jacobian_reg

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
    x = torch.randn(6, 5, requires_grad=True)
    z = model(x)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x.detach())
    exact = jacobians.pow(2).sum() / 6
    assert torch.allclose(jacobian_reg(x, z, None), exact)
    draws = torch.stack([jacobian_reg(x, z, 2).detach() for _ in range(4000)])
    assert abs(float(draws.mean() / exact) - 1) < 4 * float(draws.std() / exact) / 4000**0.5


def test_the_hook_timer_times_the_monitors_hooks_and_leaves_their_values_alone():
    from benchmarks.overhead import _timing_hooks
    from examples.digits import train
    from lightning_sensitivity import JacobianNormMonitor

    seconds: dict[str, float] = {}
    plain, _ = train([JacobianNormMonitor(every_n_epochs=1, max_points=64)], max_epochs=1)
    trainer, _ = train([_timing_hooks(JacobianNormMonitor(every_n_epochs=1, max_points=64), seconds)], max_epochs=1)
    assert seconds["JacobianNormMonitor.on_validation_batch_end"] > 0
    assert "JacobianNormMonitor.on_train_batch_start" in seconds
    value = float(trainer.callback_metrics["sensitivity/jacobian_norm"])
    assert value > 0 and value == float(plain.callback_metrics["sensitivity/jacobian_norm"])



@pytest.mark.slow
def test_monitor_cost_benchmark_quick_mode_prints_its_table():
    stdout = _quick_run("monitor_cost", timeout=900)
    assert "== one JacobianNormMonitor measurement against classes and model size" in stdout, stdout[-3000:]
    for row in ("small CNN", "resnet18"):
        assert row in stdout, stdout[-3000:]


def test_the_watch_error_compares_every_watch_key_with_its_full_key(tmp_path, capsys):
    from benchmarks.overhead import _watch_error, train_digits
    from lightning_sensitivity import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

    _watch_error(train_digits, 3, str(tmp_path))
    printed = capsys.readouterr().out
    monitors = (JacobianNormMonitor(), TransitionMonitor(), GeneralizationGapMonitor())
    watched = {key for monitor in monitors for key in monitor.logged_keys("scalar", watch=True)}
    # every full key with a watch twin (the transitions' resolutions have none)
    keys = [key for monitor in monitors for key in monitor.logged_keys("scalar", watch=False) if f"{key}_watch" in watched]
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith(tuple(keys))}
    assert set(rows) == set(keys)
    # the validation side of the gap's watch set is the whole validation set: the same series, no difference
    assert rows["generalization/val_loss"][2:4] == ["+0%", "0%"]


def test_the_watch_jacobian_benchmark_times_every_watch_set(capsys):
    from benchmarks.overhead import _watch_jacobian

    _watch_jacobian("cnn", 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith("(1 repeats)")]
    assert [line.split(",")[0] for line in lines] == ["8 points", "32 points", "16 points", "32 points"]
    assert all(float(line.split("ms")[0].split()[-1]) > 0 for line in lines)


def test_in_hooks_times_the_configuration_it_is_given(tmp_path, capsys):
    from benchmarks.overhead import CONFIGURATIONS, _in_hooks, train_digits

    _in_hooks(train_digits, 1, str(tmp_path), 1, CONFIGURATIONS["JacobianNormMonitor()"])
    printed = capsys.readouterr().out
    hooks = [line.split()[0] for line in printed.split("the hooks that take the time:")[1].splitlines() if line.strip()]
    # only the monitor of that configuration was timed, and its hooks took some time
    assert hooks and all(hook.startswith("JacobianNormMonitor.") for hook in hooks)
    assert "JacobianNormMonitor.on_validation_epoch_end" in hooks
    share = printed.split("median share of a run without a monitor: ")[1].split("%")[0]
    assert float(share) > 0
