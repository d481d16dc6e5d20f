"""``JacobianNormMonitor`` inside real ``Trainer`` runs on digits."""

import csv
import glob
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional import spearman_corrcoef

from examples.digits import DigitsDataModule, MLPClassifier, train
from lightning_sensitivity import JacobianNormMonitor
from lightning_sensitivity.functional import jacobian_norm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_logs_scalar_and_histogram_equal_to_direct_measurement(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    trainer, model = train(
        [JacobianNormMonitor(max_points=100, every_n_epochs=1)], max_epochs=2, logger=logger
    )
    data = DigitsDataModule()
    expected = jacobian_norm(model, data.x_val[:100])

    ea = events(logger.log_dir)
    scalars = ea.Scalars("sensitivity/jacobian_norm")
    assert [s.step for s in scalars] == [trainer.global_step // 2 - 1, trainer.global_step - 1]
    assert scalars[-1].value == pytest.approx(expected.mean().item(), rel=1e-5)
    histograms = ea.Histograms("sensitivity/jacobian_norm_per_point")
    assert [h.step for h in histograms] == [s.step for s in scalars]
    histogram = histograms[-1].histogram_value
    assert histogram.num == 100
    assert histogram.sum == pytest.approx(expected.sum().item(), rel=1e-4)
    assert histogram.min == pytest.approx(expected.min().item(), rel=1e-4)
    assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(
        expected.mean().item(), rel=1e-5
    )


def test_validate_under_inference_mode_gives_the_no_grad_values():
    pl.seed_everything(0)
    model = MLPClassifier().eval()
    with torch.inference_mode():
        x = torch.rand(40, 1, 8, 8)
        y = torch.randint(0, 10, (40,))
    assert x.is_inference()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(callbacks=[JacobianNormMonitor()], logger=False, enable_progress_bar=False)
    trainer.validate(model, loader, verbose=False)
    logged = trainer.callback_metrics["sensitivity/jacobian_norm"]
    with torch.no_grad():
        expected = jacobian_norm(model, x.clone()).mean()
    assert logged.item() > 0
    assert logged.item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.test(model, loader, verbose=False)
    assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_per_point_records_and_spearman(tmp_path):
    logger = CSVLogger(tmp_path)
    trainer, model = train([JacobianNormMonitor(max_points=None)], max_epochs=2, logger=logger)
    files = glob.glob(os.path.join(logger.log_dir, "jacobian_norm_records", "*.csv"))
    assert [os.path.basename(f) for f in files] == ["fit_epoch=1.csv"]
    with open(files[0]) as handle:
        rows = list(csv.DictReader(handle))
    data = DigitsDataModule()
    assert [int(r["index"]) for r in rows] == list(range(len(data.x_val)))
    assert [int(r["label"]) for r in rows] == data.y_val.tolist()
    logits = model(data.x_val)
    assert [int(r["prediction"]) for r in rows] == logits.argmax(1).tolist()
    losses = torch.tensor([float(r["loss"]) for r in rows])
    torch.testing.assert_close(
        losses, F.cross_entropy(logits, data.y_val, reduction="none").detach(), rtol=1e-4, atol=1e-6
    )
    norms = torch.tensor([float(r["jacobian_norm"]) for r in rows])
    torch.testing.assert_close(norms, jacobian_norm(model, data.x_val), rtol=1e-4, atol=1e-7)
    rho = trainer.callback_metrics["sensitivity/jacobian_loss_spearman"]
    assert rho.item() == pytest.approx(spearman_corrcoef(norms, losses).item(), abs=1e-3)


class TensorOnly(pl.LightningModule):
    """Batches are bare tensors (no labels) or dicts; the logits are one head of a dict output."""

    def __init__(self, dict_output: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        self.dict_output = dict_output

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits, "features": x} if self.dict_output else logits

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass


def _validate(module, loader, **monitor_kwargs):
    trainer = pl.Trainer(
        callbacks=[JacobianNormMonitor(**monitor_kwargs)], logger=False, enable_progress_bar=False
    )
    trainer.validate(module, loader, verbose=False)
    return trainer


def test_batch_formats_get_input_and_forward_fn():
    x = torch.randn(20, 5)
    module = TensorOnly()
    expected = jacobian_norm(module.net, x).mean().item()
    for loader, kwargs in [
        (DataLoader(x, batch_size=8), {}),
        (DataLoader([{"image": row} for row in x], batch_size=8), {"input_key": "image"}),
        (DataLoader([(0, row) for row in x], batch_size=8), {"get_input": lambda batch: batch[1]}),
    ]:
        trainer = _validate(module, loader, **kwargs)
        assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(
            expected, rel=1e-5
        )
    trainer = _validate(
        TensorOnly(dict_output=True), DataLoader(x, batch_size=8), forward_fn=lambda m, v: m(v)["logits"]
    )
    assert "sensitivity/jacobian_norm" in trainer.callback_metrics


def test_bad_outputs_and_inputs_fail_with_clear_messages():
    x = torch.randn(20, 5)
    with pytest.raises(ValueError, match=r"logits of shape \[batch, num_classes\].*forward_fn"):
        _validate(TensorOnly(dict_output=True), DataLoader(x, batch_size=8))

    class Tokens(TensorOnly):
        def forward(self, ids):
            return self.net(ids.float())

    ids = torch.randint(0, 10, (20, 5))
    with pytest.raises(TypeError, match="continuous inputs.*forward_fn"):
        _validate(Tokens(), DataLoader(ids, batch_size=8))
    with pytest.raises(KeyError, match="input_key"):
        _validate(TensorOnly(), DataLoader([{"image": row} for row in x], batch_size=8))
    for bad in [{"max_points": 0}, {"every_n_epochs": 0}, {"output": "probs"}, {"method": "fast"}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            _validate(TensorOnly(), DataLoader(x, batch_size=8), **bad)


def test_non_finite_points_are_excluded_and_warned_once():
    x = torch.randn(20, 5)
    x[3, 1] = float("nan")
    x[11, 0] = float("inf")
    module = TensorOnly()
    finite = torch.ones(20, dtype=torch.bool)
    finite[[3, 11]] = False
    with pytest.warns(UserWarning, match="2 point"):
        trainer = _validate(module, DataLoader(x, batch_size=8))
    expected = jacobian_norm(module.net, x[finite]).mean().item()
    assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(expected, rel=1e-5)


def test_empty_batches_no_logger_and_no_validation_data(tmp_path):
    x = torch.randn(8, 5)

    class Batches:  # an iterable of batches whose first batch is empty (a filtering collate can do that)
        def __iter__(self):
            return iter([torch.zeros(0, 5), x])

        def __len__(self):
            return 2

    module = TensorOnly()
    trainer = _validate(module, Batches())
    expected = jacobian_norm(module.net, x).mean().item()
    assert trainer.callback_metrics["sensitivity/jacobian_norm"].item() == pytest.approx(expected, rel=1e-5)

    class NoValidation(TensorOnly):
        def training_step(self, batch, batch_idx):
            return self.net(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = pl.Trainer(
        callbacks=[JacobianNormMonitor()],
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="no validation point"):
        trainer.fit(NoValidation(), DataLoader(x, batch_size=4), DataLoader(x, batch_size=4))


def test_several_validation_dataloaders_are_logged_separately():
    module = TensorOnly()
    a, b = torch.randn(10, 5), 3 * torch.randn(12, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _validate(module, [DataLoader(a, batch_size=4), DataLoader(b, batch_size=5)])
    for idx, x in enumerate((a, b)):
        logged = trainer.callback_metrics[f"sensitivity/jacobian_norm/dataloader_idx_{idx}"].item()
        assert logged == pytest.approx(jacobian_norm(module.net, x).mean().item(), rel=1e-5)


def test_state_dict_round_trip():
    monitor = JacobianNormMonitor(method="projection", seed=123)
    restored = JacobianNormMonitor(method="projection")
    assert not torch.equal(restored.state_dict()["generator_state"], monitor.state_dict()["generator_state"])
    restored.load_state_dict(monitor.state_dict())
    assert torch.equal(restored.state_dict()["generator_state"], monitor.state_dict()["generator_state"])
    assert monitor.state_key != JacobianNormMonitor(output="logits").state_key


class _Predicting(MLPClassifier):
    """A classifier whose ``predict_step`` takes batches with or without labels."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)


def _read_predict_records(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_per_point_records_equal_to_direct_values(tmp_path):
    data = DigitsDataModule()
    model = _Predicting()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        callbacks=[JacobianNormMonitor()],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    x, y = data.x_val[:70], data.y_val[:70]
    unlabelled = DataLoader(x[:45], batch_size=16)  # plain tensors: no labels
    labelled = DataLoader(TensorDataset(x[45:], y[45:]), batch_size=8)
    predictions = trainer.predict(model, dataloaders=[unlabelled, labelled])
    assert len(predictions) == 2 and torch.cat(predictions[0]).shape == (45, 10)  # `return_predictions` kept

    folder = os.path.join(trainer.log_dir, "jacobian_norm_records")
    assert sorted(os.listdir(folder)) == ["predict_dataloader_idx=0.csv", "predict_dataloader_idx=1.csv"]
    for idx, (points, labels) in enumerate([(x[:45], None), (x[45:], y[45:])]):
        rows = _read_predict_records(os.path.join(folder, f"predict_dataloader_idx={idx}.csv"))
        assert [int(r["index"]) for r in rows] == list(range(len(points)))
        expected = jacobian_norm(model, points)
        measured = torch.tensor([float(r["jacobian_norm"]) for r in rows])
        torch.testing.assert_close(measured, expected, rtol=1e-5, atol=0)
        assert expected.min() > 0  # predict runs under inference mode: a measurement there is not zero
        with torch.no_grad():
            logits = model(points)
        assert [int(r["prediction"]) for r in rows] == logits.argmax(1).tolist()
        if labels is None:
            assert all(r["label"] == "" and r["loss"] == "" for r in rows)
        else:
            assert [int(r["label"]) for r in rows] == labels.tolist()
            loss = F.cross_entropy(logits, labels, reduction="none")
            torch.testing.assert_close(torch.tensor([float(r["loss"]) for r in rows]), loss, rtol=1e-5, atol=1e-6)


def test_predict_with_one_dataloader_and_opt_out(tmp_path):
    data = DigitsDataModule()
    model = _Predicting()
    x = data.x_val[:20]

    def predict(monitor, root):
        trainer = pl.Trainer(
            accelerator="cpu",
            default_root_dir=root,
            logger=False,
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_checkpointing=False,
        )
        trainer.predict(model, dataloaders=DataLoader(x, batch_size=7, shuffle=False))
        return os.path.join(root, "jacobian_norm_records")

    folder = predict(JacobianNormMonitor(max_points=5), tmp_path / "on")
    rows = _read_predict_records(os.path.join(folder, "predict.csv"))
    # every predicted point is measured (`max_points` is the validation passes')
    assert [int(r["index"]) for r in rows] == list(range(20))
    torch.testing.assert_close(
        torch.tensor([float(r["jacobian_norm"]) for r in rows]), jacobian_norm(model, x), rtol=1e-5, atol=0
    )
    assert not os.path.exists(predict(JacobianNormMonitor(measure_predict=False), tmp_path / "off"))


class _Clock:
    """A clock that moves one second at each reading: the first-batch check reads it twice (1 s for its 4 points),
    and each training batch end once (1 s a batch)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize(
    ("every_n_epochs", "watch_points", "watch_projections", "share"),
    [(1, 0, 2, "100%"), (20, 0, 2, None), (None, 8, None, "70%"), (None, 8, 2, "56%")],
)
def test_the_expected_cost_is_said_once_when_it_is_a_large_share_of_training(
    every_n_epochs, watch_points, watch_projections, share, monkeypatch
):
    """0.25 s a point (the check) times 40 points is 10 s, one epoch of ten 1-second batches: every epoch that doubles
    the training time, and the monitor says so once, with what to change; every 20 epochs it is 5%, and it says
    nothing. At the default schedule, the full measurement once in the fit's 2 epochs (5 s an epoch) and the watch
    set's 8 exact points at every pass (2 s) add 70%; at 2 products a point instead of the 9 rows and a forward pass
    of the 10 classes' exact norm, the watch set takes 3/10 of that (0.6 s), 56% in all."""
    from lightning_sensitivity.callbacks import _cost, jacobian_norm_monitor

    infos: list[str] = []
    monkeypatch.setattr(_cost, "time", _Clock())
    monkeypatch.setattr(jacobian_norm_monitor, "rank_zero_info", infos.append)
    monitor = JacobianNormMonitor(
        max_points=40, every_n_epochs=every_n_epochs, watch_points=watch_points, watch_projections=watch_projections
    )
    train([monitor], max_epochs=2, limit_train_batches=10)
    if share is None:
        assert infos == []
        return
    (info,) = infos
    assert "one full measurement of 40 points is expected to take about 10 s (250 ms a point" in info
    assert "1 epochs of training (10 s an epoch" in info and f"about {share} to the training time" in info
    when = "at every_n_epochs=1" if every_n_epochs else "once in 2 epochs"
    assert f"{when}, with the watch set's {watch_points} points at every pass" in info
    for way_out in ("max_points=", "method='projection'", "every_n_epochs="):
        assert way_out in info
