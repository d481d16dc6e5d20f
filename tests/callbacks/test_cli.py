"""The monitors in a LightningCLI: added from a YAML config or the command line, with their arguments."""

import csv

from lightning.pytorch.cli import LightningCLI

from examples.digits import DigitsDataModule, MLPClassifier
from lightning_sensitivity import GeneralizationGapMonitor

KEYS = ["train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"]

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 2
  limit_train_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {save_dir}
      name: cli
  callbacks:
    - class_path: lightning_sensitivity.GeneralizationGapMonitor
      init_args:
        every_n_epochs: 1
        max_train_points: 200
        loss_fn: torch.nn.functional.multi_margin_loss
        prefix: gen
    - class_path: lightning_sensitivity.JacobianNormMonitor
      init_args:
        max_points: 64
model:
  hidden_sizes: [32]
data:
  batch_size: 128
"""


def _logged_keys(save_dir) -> set[str]:
    with open(save_dir / "cli" / "version_0" / "metrics.csv") as file:
        return set(next(csv.reader(file)))


def _cli(args: list[str]) -> LightningCLI:
    return LightningCLI(MLPClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


def test_monitor_from_a_yaml_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(save_dir=tmp_path))
    cli = _cli(["fit", "--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GeneralizationGapMonitor)]
    assert (monitor.max_train_points, monitor.prefix, monitor.loss_fn.__name__) == (
        200,
        "gen",
        "multi_margin_loss",
    )
    assert len(monitor.train_indices) == 200
    assert {f"gen/{key}" for key in KEYS} | {"sensitivity/jacobian_norm"} <= _logged_keys(tmp_path)


def test_monitor_from_the_command_line(tmp_path):
    args = [
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=cli",
        "--trainer.callbacks+=lightning_sensitivity.GeneralizationGapMonitor",
        "--trainer.callbacks.max_train_points=100",
    ]
    cli = _cli(args)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GeneralizationGapMonitor)]
    assert len(monitor.train_indices) == 100
    assert {f"generalization/{key}" for key in KEYS} <= _logged_keys(tmp_path)
