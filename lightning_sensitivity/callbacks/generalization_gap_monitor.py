r"""
Generalization Gap Monitor
==========================

The generalization gap of Novak et al. (ICLR 2018), measured the same way on both sides while a model trains: the
model in eval mode, on a fixed subset of the training set and on the validation set.

.. math::

    \mathrm{gap\_loss} = L_\mathrm{val} - L_\mathrm{train}, \qquad
    \mathrm{gap\_accuracy} = A_\mathrm{train} - A_\mathrm{val}.

The training loss Lightning averages over an epoch is not :math:`L_\mathrm{train}`: it mixes the parameters of
the whole epoch and runs in train mode (dropout, augmentation, batch statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_sensitivity.callbacks._base import _EvaluationMonitor, _Key
from lightning_sensitivity.callbacks._batch import GetInput, _BatchReader
from lightning_sensitivity.callbacks._checks import (
    _check_callable,
    _check_choice,
    _check_classifier_output,
    _check_output_reading,
    _check_positive,
    _check_seed,
    _check_watch_size,
)
from lightning_sensitivity.callbacks._logging import _warn_once
from lightning_sensitivity.callbacks._measured import _LOW_PRECISION, ForwardFn, _default_forward
from lightning_sensitivity.callbacks._train_subset import _read_train_subset
from lightning_sensitivity.functional import measuring
from lightning_sensitivity.metrics import ClassificationLossAccuracy, LossFn

__all__ = ["GeneralizationGapMonitor"]

#: The default watch set: the first points of the training subset, evaluated at every validation pass.
WATCH_TRAIN_POINTS = 64


class GeneralizationGapMonitor(_EvaluationMonitor):
    r"""Log the generalization gap measured in eval mode on a fixed training subset and the validation set.

    At the fit's last validation pass (and every ``every_n_epochs``-th one that runs, when it is set; never the sanity
    check; when the fit ends in a way not known at its last pass, such as early stopping or ``max_time``, and that
    pass was not measured in full, the final weights are measured at the end of training), the **full measurement**
    evaluates the model in eval mode, with the same code, on

    - the validation batches of that validation epoch (the first validation dataloader), as they pass. The outputs
      of the module's ``validation_step`` are not used; but when it calls the module on the batch's input tensor
      itself (``self(x)``), that call's logits are exactly what the monitor would compute (eval mode, no autocast,
      full precision, the default ``forward_fn``, an uncompiled module), and the monitor takes them instead of a
      second forward pass. Otherwise it evaluates the batch itself;
    - a fixed subset of the training set, drawn once with the monitor's own seeded generator. Its size is the number
      of validation points, capped by ``max_train_points`` and by the size of the training set.

    At every validation pass, from the first, it measures its **watch set**: the first ``watch_train_points`` of the
    training subset, beside the whole validation set (whose logits are usually the ones taken from
    ``validation_step``), logged under the ``_watch`` keys. At a pass measured in full, the watch values come from
    the same evaluation.

    **Which training points, and in what form.** For a map-style dataset the subset is a fixed set of indices into
    ``train_dataset`` (default: the dataset of the training dataloader), read once, when the first measurement
    needs it, and kept in host memory (``max_train_points`` times the size of one sample at most). Each measurement
    evaluates those same stored samples, however the training loader shuffles. A ``Dataset`` is opaque: when its
    ``__getitem__`` augments at random, the stored samples carry one fixed random augmentation each (the global RNGs
    are seeded with ``seed`` for the read), so the same inputs are evaluated at every epoch, but they are not the
    unaugmented images. To measure on unaugmented training points, pass ``train_dataset=`` a dataset with the same
    points and no augmentation. Augmentation done in the batch hooks of the module (``on_after_batch_transfer``)
    runs as for validation batches, since the batches are moved through the same hooks during validation. For an
    ``IterableDataset`` the subset is the first batches it yields (whole batches, at least as many points as
    needed). Under DDP each rank evaluates a disjoint share of the subset and the sums are combined, which gives the
    one-process result.

    **Training is left as it was.** The samples are read from a copy of the dataset (so a dataset that owns a random
    generator, as an augmenting one may, keeps its stream), inside ``isolate_rng`` (the global torch, NumPy and
    Python RNG streams are restored), without iterating the training dataloader. Evaluation runs under
    ``torch.no_grad()`` in eval mode, and each submodule's previous mode is restored.

    Logged Metrics:
        ``{prefix}/train_loss``, ``{prefix}/val_loss``: mean loss on the training subset and the validation set.
        ``{prefix}/gap_loss``: ``val_loss - train_loss``.
        ``{prefix}/train_accuracy``, ``{prefix}/val_accuracy``: top-1 accuracy (for a one-logit binary classifier,
        ``[B, 1]`` logits trained with BCE: the sign of the logit, and the loss is the binary cross-entropy).
        ``{prefix}/gap_accuracy``: ``train_accuracy - val_accuracy``.
        ``{prefix}/train_loss_watch``, ``{prefix}/val_loss_watch``, ``{prefix}/gap_loss_watch``,
        ``{prefix}/train_accuracy_watch``, ``{prefix}/val_accuracy_watch``, ``{prefix}/gap_accuracy_watch``: the same
        on the watch set, at every validation pass.
        ``{prefix}/generalization_gap_seconds``: with ``log_seconds=True``, the wall time of each pass's measurement
        (the validation batches' re-evaluation, the training subset's or the watch set's evaluation, and the
        subset's reading at the first measurement; under DDP the slowest process's), in seconds.

    With a TensorBoard logger, the monitor also registers the package's custom-scalars dashboard and, when the
    module saved hyper-parameters, makes the final values the run's hparam metrics (the HPARAMS tab of a sweep).

    Args:
        every_n_epochs: also make the full measurement on every n-th validation pass that runs; ``None``: at the
            fit's last pass only.
        max_train_points: the most training points in the subset; ``None`` for no cap beyond the validation size.
        watch_train_points: the watch set, the first points of the training subset, evaluated at every validation
            pass; ``0`` or ``None``: no watch set (and no ``_watch`` keys).
        loss_fn: ``loss_fn(logits, target)``, returning the mean over the batch (as ``F.cross_entropy`` does) or
            one loss per point; ``None`` means cross-entropy (binary cross-entropy for ``[B, 1]`` logits).
        output: ``"logits"`` (or log-probabilities), or ``"probabilities"`` for a model that returns the classes'
            probabilities (a ``forward`` ending in ``nn.Softmax``): the default loss is then their negative
            log-likelihood, not the cross-entropy of a second softmax; ``loss_fn`` gets the output as it is. The
            first batch tells: probabilities under ``"logits"`` fail there, saying to set it.
        train_dataset: the dataset the training subset is drawn from; default: the training dataloader's.
        batch_size: batch size for evaluating the training subset; default: four times the training dataloader's
            (256 when it has none; for an ``IterableDataset``, whose subset is whole batches, the loader's own).
        seed: seeds the choice of the subset and the global RNGs while its samples are read.
        prefix: the logged keys start with ``{prefix}/``.
        input_key: where the input is in a batch (a dict key or a tuple position); default ``"x"`` or ``0``.
        target_key: where the labels are in a batch; default ``"y"`` or ``1``.
        get_input: ``get_input(batch)`` returns the input; overrides ``input_key``.
        get_target: ``get_target(batch)`` returns the labels; overrides ``target_key``.
        forward_fn: ``forward_fn(pl_module, x)`` returns the logits; default ``pl_module(x)``.
        log_seconds: also log ``{prefix}/generalization_gap_seconds``, the wall time of each measurement.

    Raises:
        ValueError:
            At construction, if an argument is out of range. At the first validation batch (the sanity check, when
            there is one; without one, also the first training batch, before its step), if the model's output is not
            ``[B, C]``, or holds probabilities and ``output`` is not ``"probabilities"`` (or the reverse).
        KeyError, TypeError:
            At the first validation batch, if the batch holds no labels where the monitor looks.
        MisconfigurationException:
            In ``setup``, under a strategy that shards the parameters (FSDP, model parallelism, DeepSpeed ZeRO
            stage 3), or if the module has no ``validation_step`` or validation is switched off
            (``limit_val_batches=0``); at the start of training, if the training dataloader is not a single
            ``DataLoader`` and no ``train_dataset`` is given; at the start of ``fit``, if an ``EarlyStopping`` or
            ``ModelCheckpoint`` monitors a full-measurement key of this monitor and ``every_n_epochs`` is not 1 (its
            ``_watch`` key is logged at every pass).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_sensitivity.callbacks import GeneralizationGapMonitor
        >>> monitor = GeneralizationGapMonitor(every_n_epochs=2, max_train_points=1000)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_checkpointing=False)

    After ``trainer.fit(model, datamodule)``, ``trainer.callback_metrics["generalization/gap_loss"]`` holds the
    last gap, ``trainer.callback_metrics["generalization/gap_loss_watch"]`` its watch value, and every logger of the
    trainer received them.
    """

    KEYS = (
        _Key("train_loss", watch=True),
        _Key("val_loss", watch=True),
        _Key("gap_loss", watch=True),
        _Key("train_accuracy", watch=True),
        _Key("val_accuracy", watch=True),
        _Key("gap_accuracy", watch=True),
        _Key("generalization_gap_seconds", option="log_seconds"),
    )
    MEASURES_OUTSIDE_FIT = False

    def __init__(
        self,
        every_n_epochs: int | None = None,
        max_train_points: int | None = 1_000,
        watch_train_points: int | None = WATCH_TRAIN_POINTS,
        loss_fn: LossFn | None = None,
        output: Literal["logits", "probabilities"] = "logits",
        train_dataset: Dataset | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        prefix: str = "generalization",
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        get_input: GetInput | None = None,
        get_target: GetInput | None = None,
        forward_fn: ForwardFn | None = None,
        log_seconds: bool = False,
    ) -> None:
        _check_positive("max_train_points", max_train_points, optional=True)
        _check_watch_size("watch_train_points", watch_train_points)
        _check_callable("loss_fn", loss_fn)
        _check_choice("output", output, ("logits", "probabilities"))
        if train_dataset is not None and not isinstance(train_dataset, Dataset):
            raise ValueError(f"`train_dataset` must be a torch Dataset or None, got a {type(train_dataset).__name__}.")
        _check_positive("batch_size", batch_size, optional=True)
        _check_seed(seed)
        reader = _BatchReader(input_key, get_input, target_key, get_target)
        super().__init__(
            every_n_epochs=every_n_epochs,
            watch=bool(watch_train_points),
            prefix=prefix,
            forward_fn=forward_fn,
            log_seconds=log_seconds,
            reader=reader,
            state_key={"seed": seed},
        )
        self.max_train_points = max_train_points
        self.watch_train_points = watch_train_points
        self.loss_fn = loss_fn
        self.output = output
        self.train_dataset = train_dataset
        self.batch_size = batch_size
        self.seed = seed
        self._train_metric = ClassificationLossAccuracy(loss_fn, output)
        self._watch_train_metric = ClassificationLossAccuracy(loss_fn, output)
        self._val_metric = ClassificationLossAccuracy(loss_fn, output)
        self._train_indices: Tensor | None = None
        # This process's share of the training subset, as batches: the watch set's (the subset's first points),
        # then the others'; read at the first measurement.
        self._train_batches: tuple[list[Any], list[Any]] | None = None
        # The module's own forward call on a validation batch's input, (input, logits), when it can stand for the
        # monitor's (see `_capture`); the hook that records it lives only during a measured validation pass.
        self._captured: tuple[Tensor, Tensor] | None = None
        self._hook: Any = None
        self._expected: Tensor | None = None  # the input of the validation batch that is passing

    @property
    def train_indices(self) -> Tensor | None:
        """The training subset: indices into the training dataset (positions in the stream for an iterable
        dataset), or ``None`` before the first measurement draws it."""
        return self._train_indices

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.FITTING:
            return
        if not is_overridden("validation_step", pl_module):
            raise MisconfigurationException(
                f"{type(self).__name__} measures after each validation, and {type(pl_module).__name__} has no "
                "`validation_step`: define one (and a validation dataloader), or remove the monitor."
            )
        if trainer.limit_val_batches == 0:
            raise MisconfigurationException(
                f"{type(self).__name__} needs validation batches, but the Trainer has `limit_val_batches=0`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_dataset is None and not isinstance(trainer.train_dataloader, DataLoader):
            raise MisconfigurationException(
                f"{type(self).__name__} draws its training subset from the training DataLoader's dataset, but the "
                f"training dataloader is a {type(trainer.train_dataloader).__name__}. Pass "
                "`train_dataset=` the dataset to draw the subset from."
            )

    @override
    def _check_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        x = self._reader.input(batch)
        target = self._reader.target(batch)
        if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != x.shape[0]:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(
                f"{type(self).__name__} needs one label per point ([B] class indices, or [B, C] class probabilities), "
                f"got {shape} for a batch of {x.shape[0]} inputs. Pass `target_key=` or `get_target=`."
            )
        if x.shape[0] > 0:
            model = self._measured_model(pl_module)
            with measuring(model, pl_module.device):
                logits = model(x[:2])
                _check_classifier_output(type(self).__name__, logits, len(x[:2]))
                _check_output_reading(type(self).__name__, logits, self.output)
                ClassificationLossAccuracy(self.loss_fn, self.output).update(logits, target[:2].to(logits.device))

    @override
    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metric in (self._train_metric, self._watch_train_metric, self._val_metric):
            metric.reset()
            metric.to(pl_module.device)
        self._release_hook()
        low = any(t.dtype in _LOW_PRECISION for t in [*pl_module.parameters(), *pl_module.buffers()])
        compiled = bool(getattr(pl_module, "_compiler_ctx", None))
        if self.forward_fn is _default_forward and not low and not compiled and not self._after_training:
            self._hook = pl_module.register_forward_hook(self._capture, with_kwargs=True)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured = None
        self._expected = None
        if self._hook is not None and dataloader_idx == 0:
            with contextlib.suppress(KeyError, TypeError, IndexError):  # the first batch's check says it clearly
                self._expected = self._reader.input(batch)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Keep the module's call on the batch's input tensor itself, when its logits are the monitor's: the module
        and every submodule in eval mode, autocast off, a full-precision input and output. Calls on other tensors
        (another monitor's, a test-time augmentation) or with other arguments (``self(x, features=True)``) are not
        this batch's logits."""
        x = args[0] if len(args) == 1 and not kwargs else None
        if x is None or x is not self._expected or not isinstance(output, Tensor):
            return
        if x.dtype in _LOW_PRECISION or output.dtype in _LOW_PRECISION or torch.is_autocast_enabled(x.device.type):
            return
        if any(m.training for m in module.modules()):
            return
        self._captured = (x, output.detach())

    def _release_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._captured = self._expected = None

    @override
    def _measure_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx != 0:
            return
        # Under DDP the validation sampler pads the last round with repeated points; those are skipped, so that
        # the sums over ranks are those of one process on the whole validation set.
        x = self._reader.input(batch)
        _, keep = self._points.next_batch(trainer, 0, len(x), pl_module.device)
        logits = self._captured[1] if self._captured is not None and self._captured[0] is x else None
        self._captured = None
        if bool(keep.any()):
            self._evaluate(pl_module, batch, [self._val_metric], keep, logits)

    @override
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Tensor]:
        self._release_hook()
        val = self._val_metric.compute()
        num_val = int(self._val_metric.count)
        if num_val == 0:
            _warn_once(self, "no-validation-batch", "no validation batch was seen; nothing is logged this epoch.")
            return {}
        if self._train_batches is None:
            size = num_val if self.max_train_points is None else min(num_val, self.max_train_points)
            self._train_indices, *batches = _read_train_subset(
                trainer,
                self.train_dataset,
                self.batch_size,
                size,
                self.watch_train_points or 0,
                self.seed,
                self._train_indices,
                lambda batch: len(self._reader.input(batch)),
            )
            self._train_batches = (batches[0], batches[1])
        watched, others = self._train_batches
        full = self._pass == "full"
        # The watch set's points are the subset's first: at a full pass each is evaluated once, for both.
        watch_metrics = [self._watch_train_metric] if self._logs_watch else []
        for batch in watched:
            metrics = ([self._train_metric] if full else []) + watch_metrics
            self._evaluate(pl_module, self._reader.load(trainer, batch), metrics)
        for batch in others if full else []:
            self._evaluate(pl_module, self._reader.load(trainer, batch), [self._train_metric])
        scalars: dict[str, Tensor] = {}
        if self._logs_watch:
            scalars.update(self._gap(self._watch_train_metric.compute(), val, self._watch_key))
        if full:
            scalars.update(self._gap(self._train_metric.compute(), val, self._key))
        return scalars

    @staticmethod
    def _gap(train: dict[str, Tensor], val: dict[str, Tensor], key: Callable[[str], str]) -> dict[str, Tensor]:
        return {
            key("train_loss"): train["loss"],
            key("val_loss"): val["loss"],
            key("gap_loss"): val["loss"] - train["loss"],
            key("train_accuracy"): train["accuracy"],
            key("val_accuracy"): val["accuracy"],
            key("gap_accuracy"): train["accuracy"] - val["accuracy"],
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        indices = None if self._train_indices is None else self._train_indices.tolist()
        return {**super().state_dict(), "train_indices": indices}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        indices = state_dict["train_indices"]
        self._train_indices = None if indices is None else torch.tensor(indices, dtype=torch.long)
        self._train_batches = None

    def _evaluate(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        metrics: list[ClassificationLossAccuracy],
        keep: Tensor | None = None,
        logits: Tensor | None = None,
    ) -> None:
        """Add the points of one batch that ``keep`` marks to each of ``metrics``, the model in eval mode (or its
        ``logits`` as the module's own call computed them)."""
        if not metrics:
            return
        target = self._reader.target(batch)
        if logits is None:
            model = self._measured_model(pl_module)
            with measuring(model, pl_module.device):
                logits = model(self._reader.input(batch))
        target = target.to(logits.device)
        if keep is not None:
            logits, target = logits[keep], target[keep]
        for metric in metrics:
            metric.update(logits, target)
