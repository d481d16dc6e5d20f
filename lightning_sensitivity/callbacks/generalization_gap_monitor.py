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

import copy
import random
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from torchmetrics import Metric
from typing_extensions import override

from lightning_sensitivity.callbacks._dashboard import _register_dashboard
from lightning_sensitivity.callbacks._utils import (
    ForwardFn,
    GetInput,
    _batch_input,
    _batch_target,
    _default_forward,
    _evaluation_dataloader,
    _evaluation_points,
    _log_scalars,
    _new_generator,
    _should_measure,
)
from lightning_sensitivity.functional._utils import _eval_mode

__all__ = ["GeneralizationGapMonitor"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class _LossAccuracy(Metric):
    """Mean loss and top-1 accuracy from per-batch sums: the states add up over batches and DDP ranks."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, correct: Tensor, count: int) -> None:
        self.loss_sum += loss_sum.to(self.loss_sum)
        self.correct += correct.to(self.correct)
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        return {
            "count": self.count,
            "loss": self.loss_sum / self.count,
            "accuracy": (self.correct / self.count).float(),
        }


class GeneralizationGapMonitor(Callback):
    r"""Log the generalization gap measured in eval mode on a fixed training subset and the validation set.

    After every ``every_n_epochs``-th validation of ``trainer.fit`` (and the last one; never the sanity check), the
    model is evaluated in eval mode, with the same code, on

    - the validation batches of that validation epoch (the first validation dataloader), re-evaluated by the monitor
      as they pass: the outputs of the module's ``validation_step`` are not used;
    - a fixed subset of the training set, drawn once with the monitor's own seeded generator. Its size is the number
      of validation points, capped by ``max_train_points`` and by the size of the training set.

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
        ``{prefix}/train_accuracy``, ``{prefix}/val_accuracy``: top-1 accuracy.
        ``{prefix}/gap_accuracy``: ``train_accuracy - val_accuracy``.

    With a TensorBoard logger, the monitor also registers the package's custom-scalars dashboard and, when the
    module saved hyper-parameters, makes the final values the run's hparam metrics (the HPARAMS tab of a sweep).

    Args:
        every_n_epochs: measure after the validation of every ``every_n_epochs``-th epoch, and of the last epoch.
        max_train_points: the most training points in the subset; ``None`` for no cap beyond the validation size.
        loss_fn: ``loss_fn(logits, target)``, returning the mean over the batch (as ``F.cross_entropy`` does) or
            one loss per point; ``None`` means cross-entropy.
        train_dataset: the dataset the training subset is drawn from; default: the training dataloader's.
        batch_size: batch size for evaluating the training subset; default: the training dataloader's.
        seed: seeds the choice of the subset and the global RNGs while its samples are read.
        prefix: the logged keys start with ``{prefix}/``.
        input_key: where the input is in a batch (a dict key or a tuple position); default ``"x"`` or ``0``.
        target_key: where the labels are in a batch; default ``"y"`` or ``1``.
        get_input: ``get_input(batch)`` returns the input; overrides ``input_key``.
        get_target: ``get_target(batch)`` returns the labels; overrides ``target_key``.
        forward_fn: ``forward_fn(pl_module, x)`` returns the logits; default ``pl_module(x)``.

    Raises:
        ValueError:
            If ``every_n_epochs`` or ``max_train_points`` is not positive.
        MisconfigurationException:
            In ``setup``, if the module has no ``validation_step`` or validation is switched off
            (``limit_val_batches=0``); at the start of training, if the training dataloader is not a single
            ``DataLoader`` and no ``train_dataset`` is given.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_sensitivity.callbacks import GeneralizationGapMonitor
        >>> monitor = GeneralizationGapMonitor(every_n_epochs=2, max_train_points=1000)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_checkpointing=False)

    After ``trainer.fit(model, datamodule)``, ``trainer.callback_metrics["generalization/gap_loss"]`` holds the
    last gap, and every logger of the trainer received the six values.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        max_train_points: int | None = 10_000,
        loss_fn: LossFn | None = None,
        train_dataset: Dataset | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        prefix: str = "generalization",
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        get_input: GetInput | None = None,
        get_target: GetInput | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs}.")
        if max_train_points is not None and max_train_points < 1:
            raise ValueError(f"`max_train_points` must be positive or None, got {max_train_points}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be positive or None, got {batch_size}.")
        self.every_n_epochs = every_n_epochs
        self.max_train_points = max_train_points
        self.loss_fn: LossFn = F.cross_entropy if loss_fn is None else loss_fn
        self.train_dataset = train_dataset
        self.batch_size = batch_size
        self.seed = seed
        self.prefix = prefix
        self.input_key, self.target_key = input_key, target_key
        self.get_input, self.get_target = get_input, get_target
        self.forward_fn: ForwardFn = _default_forward if forward_fn is None else forward_fn
        self._train_metric = _LossAccuracy()
        self._val_metric = _LossAccuracy()
        self._train_indices: Tensor | None = None
        self._train_batches: list[Any] | None = None
        self._measuring = False
        self._val_seen = 0
        # Lightning reads `state_key` around every hook call: build it once.
        self._state_key = self._generate_state_key(prefix=prefix, seed=seed)

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @property
    def train_indices(self) -> Tensor | None:
        """The training subset: indices into the training dataset (positions in the stream for an iterable
        dataset), or ``None`` before the first measurement draws it."""
        return self._train_indices

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _register_dashboard(trainer, generalization_prefix=self.prefix)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_dataset is None and not isinstance(trainer.train_dataloader, DataLoader):
            raise MisconfigurationException(
                f"{type(self).__name__} draws its training subset from the training DataLoader's dataset, but the "
                f"training dataloader is a {type(trainer.train_dataloader).__name__}. Pass "
                "`train_dataset=` the dataset to draw the subset from."
            )

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measuring = trainer.state.fn == TrainerFn.FITTING and _should_measure(
            trainer, self.every_n_epochs
        )
        if self._measuring:
            self._val_seen = 0
            for metric in (self._train_metric, self._val_metric):
                metric.reset()
                metric.to(pl_module.device)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._measuring or dataloader_idx != 0:
            return
        # Under DDP the validation sampler pads the last round with repeated points; those are skipped, so that
        # the sums over ranks are those of one process on the whole validation set.
        size = len(_batch_input(batch, self.input_key, self.get_input))
        _, keep = _evaluation_points(
            _evaluation_dataloader(trainer, 0), self._val_seen, size, pl_module.device
        )
        self._val_seen += size
        if not bool(keep.any()):
            return
        self._val_metric.update(*self._evaluate(pl_module, batch, keep))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._measuring:
            return
        self._measuring = False
        val = self._val_metric.compute()
        num_val = int(val["count"])
        if num_val == 0:
            rank_zero_warn(
                f"{type(self).__name__}: no validation batch was seen; nothing is logged this epoch."
            )
            return
        if self._train_batches is None:
            self._train_batches = self._read_train_subset(trainer, num_val)
        for batch in self._train_batches:
            self._train_metric.update(*self._evaluate(pl_module, trainer.strategy.batch_to_device(batch)))
        train = self._train_metric.compute()
        p = self.prefix
        _log_scalars(
            pl_module,
            {
                f"{p}/train_loss": train["loss"],
                f"{p}/val_loss": val["loss"],
                f"{p}/gap_loss": val["loss"] - train["loss"],
                f"{p}/train_accuracy": train["accuracy"],
                f"{p}/val_accuracy": val["accuracy"],
                f"{p}/gap_accuracy": train["accuracy"] - val["accuracy"],
            },
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        indices = None if self._train_indices is None else self._train_indices.tolist()
        return {"train_indices": indices}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        indices = state_dict["train_indices"]
        self._train_indices = None if indices is None else torch.tensor(indices, dtype=torch.long)
        self._train_batches = None

    def _evaluate(
        self, pl_module: pl.LightningModule, batch: Any, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """Summed loss, number correct and number of points of one batch (the points ``keep`` marks), the model
        in eval mode."""
        x = _batch_input(batch, self.input_key, self.get_input)
        target = _batch_target(batch, self.target_key, self.get_target)
        with torch.no_grad(), _eval_mode(pl_module):
            logits = self.forward_fn(pl_module, x)
            if keep is not None:
                logits, target = logits[keep], target[keep]
            loss = self.loss_fn(logits, target)
        count = logits.shape[0]
        loss_sum = loss.sum() if loss.ndim > 0 else loss * count
        labels = target.argmax(-1) if target.ndim == logits.ndim else target
        correct = (logits.argmax(-1) == labels).sum().double()
        if not torch.isfinite(logits).all():
            # argmax of NaN logits is a class like any other: report the broken model as NaN, not as a score.
            correct = torch.full_like(correct, float("nan"))
        return loss_sum.detach(), correct, count

    def _read_train_subset(self, trainer: pl.Trainer, num_val: int) -> list[Any]:
        """Draw the subset (unless restored from a checkpoint) and read this rank's share of it, as CPU batches."""
        loader = trainer.train_dataloader if isinstance(trainer.train_dataloader, DataLoader) else None
        dataset = self.train_dataset if self.train_dataset is not None else loader.dataset
        collate = loader.collate_fn if loader is not None else default_collate
        batch_size = self.batch_size or (loader.batch_size if loader is not None else None) or 256
        size = num_val if self.max_train_points is None else min(num_val, self.max_train_points)
        with isolate_rng():
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
            random.seed(self.seed)
            source = _detached_copy(dataset)
            if isinstance(dataset, IterableDataset):
                batches = self._first_batches(source, size, batch_size, collate)
                self._train_indices = torch.arange(sum(self._batch_len(b) for b in batches))
                return batches[trainer.global_rank :: trainer.world_size]
            if self._train_indices is None:
                order = torch.randperm(len(dataset), generator=_new_generator(self.seed))
                self._train_indices = order[: min(size, len(dataset))]
            share = self._train_indices[trainer.global_rank :: trainer.world_size].tolist()
            return [
                collate([source[i] for i in share[start : start + batch_size]])
                for start in range(0, len(share), batch_size)
            ]

    def _first_batches(
        self, dataset: IterableDataset, size: int, batch_size: int, collate: Callable
    ) -> list[Any]:
        """The first batches an iterable dataset yields, until they hold at least ``size`` points."""
        batches, count = [], 0
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            batches.append(batch)
            count += self._batch_len(batch)
            if count >= size:
                break
        return batches

    def _batch_len(self, batch: Any) -> int:
        return len(_batch_input(batch, self.input_key, self.get_input))


def _detached_copy(dataset: Any) -> Any:
    """A deep copy of ``dataset`` to read from, so that reading leaves the original's internal state (an
    augmentation generator, say) as training left it; the original when it cannot be copied, with a warning."""
    try:
        return copy.deepcopy(dataset)
    except Exception as error:  # whatever stops the copy (an open file, a lock), the fallback is said aloud
        rank_zero_warn(
            f"GeneralizationGapMonitor could not copy the training dataset ({type(error).__name__}: {error}); it "
            "reads the training subset from the dataset itself, which advances any random state the dataset owns."
        )
        return dataset
