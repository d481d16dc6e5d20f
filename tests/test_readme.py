"""The README's usage example runs as printed, and its commands match what CI runs."""

import pathlib
import re
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 2, "the README's two python examples"
    monkeypatch.chdir(tmp_path)
    # as pasted into a fresh project: nothing but the package and its dependencies (no `examples`, no `tests`)
    for name in ("examples", "tests"):
        monkeypatch.setitem(sys.modules, name, None)
    functional: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), functional)
    assert functional["norms"].shape == (8,) and (functional["norms"] > 0).all()
    assert int(functional["result"]) > 0 and functional["result"].density > 0
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    for key in (
        "sensitivity/jacobian_norm",
        "generalization/gap_loss",
        "sensitivity/transition_density_on_manifold",
        "sensitivity/transitions_on_manifold",
    ):
        assert key in metrics, key
        assert torch.isfinite(metrics[key]), key
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c).strip().splitlines()[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    for part in test_command.split(" && "):
        assert part.strip() in ci, part
