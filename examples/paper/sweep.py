"""F1 and F3: the sweep of fully-connected classifiers, each trained until it fits and then measured.

The sweep has two parts.

- The F1 grid: ReLU networks on true labels without augmentation, over every combination of width, depth,
  optimizer, learning rate (two per optimizer), batch size and seed. Its fitted models are F1's population, and
  the grid's axes are those of the granulated Kendall coefficient.
- The F3 variants: for each of a few grid models (the F3 bases), one model per factor of the paper, which
  differs from its base in that factor alone (same seed, so the same data split, initial weights and batch
  order): Gaussian input noise as the augmentation, 25% and 100% random labels (on the Adam bases), full-batch
  training, Hardtanh and Hardsigmoid instead of ReLU.

A model trains (plain PyTorch on tensors: these networks are so small that a Lightning Trainer per model would
cost more than the training) until it classifies its own training set, with its random labels if any, perfectly
in eval mode (the fit criterion, checked after every epoch), or until its epoch budget: ``max_epochs`` for
mini-batches, ten times as many for full-batch training, which takes one step per epoch. Then it is measured the
same way as every other model: the generalization gap (training set against held-out set, eval mode), the
Jacobian norm of every held-out point, the baselines (parameter norm, distance from initialization, product of
spectral norms, sharpness, held-out confidence), the per-point statistics of F4 and the transitions along fixed
ellipses through training points. Each run writes its training curve and final measurements to TensorBoard.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.digits import ACTIVATIONS
from examples.paper.data import DataSpec, load_tensors
from examples.paper.rank_statistics import binned_auc, partial_spearman

#: The hyper-parameter axes of the F1 grid, as the granulated Kendall coefficient varies them. ``lr`` is the
#: learning rate's level within its optimizer (the two optimizers take different rates).
AXES = ("width", "depth", "optimizer", "lr_level", "batch_size", "seed")

#: Learning rates per optimizer: (low, high).
LEARNING_RATES: dict[str, tuple[float, float]] = {"sgd": (0.02, 0.1), "adam": (0.001, 0.003)}

#: One F3 variant per factor: its name and the settings that differ from its base.
VARIANTS: dict[str, dict[str, Any]] = {
    "augmentation": {"augment": "noise"},
    "random labels 25%": {"random_label_fraction": 0.25},
    "random labels 100%": {"random_label_fraction": 1.0},
    "full batch": {"batch_size": None},
    "hardtanh": {"activation": "hardtanh"},
    "hardsigmoid": {"activation": "hardsigmoid"},
}

#: The standard deviation of the Gaussian noise added to every training input (pixels are in [0, 1]). In trials
#: on the F3 bases, 0.1 raised held-out accuracy in only 5 of 12 pairs, 0.2 in 7 of 9, 0.3 in 7 of 8 (one tie):
#: the augmentation must help generalization here for its pairs to test the paper's claim.
NOISE_STD = 0.3
#: Full-batch training takes one step per epoch: its budget is this many times the mini-batch one.
FULL_BATCH_EPOCH_FACTOR = 10
#: Sharpness: the relative size of each weight perturbation, and the number of seeded perturbations.
SHARPNESS_SCALE = 0.1
SHARPNESS_DRAWS = 8
#: The ellipses through training points along which every model's transitions are counted.
TRANSITION_ELLIPSES = 4
TRANSITION_POINTS = 960


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of one model of the sweep.

    Args:
        width: units per hidden layer.
        depth: hidden layers.
        activation: the non-linearity (see ``examples.digits.ACTIVATIONS``).
        optimizer: ``sgd`` (momentum 0.9) or ``adam``.
        lr: learning rate.
        batch_size: mini-batch size; ``None`` trains full batch.
        augment: ``"none"`` or ``"noise"`` (Gaussian noise of standard deviation ``NOISE_STD`` on every input,
            drawn anew each epoch).
        random_label_fraction: share of training labels replaced by random classes.
        seed: data split, random labels, augmentation, initial weights and batch order.
        max_epochs: the training budget, if the fit criterion is not met before.
    """

    width: int
    depth: int
    activation: str
    optimizer: str
    lr: float
    batch_size: int | None
    augment: str
    random_label_fraction: float
    seed: int
    max_epochs: int

    @property
    def model_id(self) -> str:
        """A readable name that is unique within a sweep: the TensorBoard version and the table's key."""
        batch = "full" if self.batch_size is None else self.batch_size
        return (
            f"w{self.width}-d{self.depth}-{self.activation}-{self.optimizer}{self.lr:g}-b{batch}"
            f"-aug{self.augment}-rl{self.random_label_fraction:g}-s{self.seed}-e{self.max_epochs}"
        )


@dataclass(frozen=True)
class Sweep:
    """The models of a sweep: the F1 grid, the F3 bases (grid models) and their variants, and the F2 model.

    Args:
        grid: the F1 grid.
        variants: ``(factor, base, variant)`` for every F3 variant.
        reference: the model that F2 studies (three ReLU layers or more, true labels).
    """

    grid: tuple[ModelConfig, ...]
    variants: tuple[tuple[str, ModelConfig, ModelConfig], ...]
    reference: ModelConfig

    @property
    def configs(self) -> list[ModelConfig]:
        """Every model to train, each once: the grid, then the variants."""
        return [*self.grid, *(variant for _, _, variant in self.variants)]


def sweep_grid(quick: bool = False, seed: int = 0, max_epochs: int | None = None) -> Sweep:
    """The sweep: default 144 grid models (width 64/128/256 x depth 1/2/3 x SGD or Adam at two learning rates x
    batch 32/128 x seeds ``seed`` and ``seed + 1``) and 60 variants of 12 bases (width 128/256 x depth 1/2/3 x
    SGD or Adam, at the high learning rate, batch 32, seed ``seed``; the random-label variants on the Adam bases
    only); quick 8 grid models and the 6 variants of one base.

    Args:
        quick: the small sweep that CI runs.
        seed: the first seed of the grid (the F3 bases and the F2 model use it).
        max_epochs: the mini-batch budget; default 40 (quick) or 300.
    """
    epochs = max_epochs if max_epochs is not None else (40 if quick else 300)
    if quick:
        widths, depths, levels, batches, seeds = (64, 256), (1, 3), (1,), (32,), (seed,)
        bases = {"width": (256,), "depth": (1,), "optimizer": ("adam",)}
    else:
        widths, depths, levels, batches, seeds = (64, 128, 256), (1, 2, 3), (0, 1), (32, 128), (seed, seed + 1)
        bases = {"width": (128, 256), "depth": (1, 2, 3), "optimizer": ("sgd", "adam")}
    grid = tuple(
        ModelConfig(width, depth, "relu", optimizer, LEARNING_RATES[optimizer][level], batch, "none", 0.0, s, epochs)
        for width, depth, optimizer, level, batch, s in itertools.product(
            widths, depths, tuple(LEARNING_RATES), levels, batches, seeds
        )
    )
    variants = []
    for base in grid:
        # The high learning rate: at the low one, the random-label and Hardsigmoid variants need far longer to fit.
        if (base.width in bases["width"] and base.depth in bases["depth"] and base.optimizer in bases["optimizer"]
                and base.lr == LEARNING_RATES[base.optimizer][1] and base.batch_size == batches[0]
                and base.seed == seed):
            for factor, changes in VARIANTS.items():
                # SGD at these rates does not memorize random labels within the budget (in a trial of the default
                # sweep, none of 5 models did at 100% and 3 of 5 at 25%): those pairs would only be reported apart.
                if "random_label_fraction" in changes and base.optimizer != "adam":
                    continue
                variant = dataclasses.replace(base, **changes)
                if variant.batch_size is None:
                    variant = dataclasses.replace(variant, max_epochs=epochs * FULL_BATCH_EPOCH_FACTOR)
                variants.append((factor, base, variant))
    reference = next(c for c in grid if c.depth >= 3 and c.optimizer == "adam" and c.width == max(widths))
    return Sweep(grid, tuple(variants), reference)


def learning_rate_level(optimizer: str, lr: float) -> int | None:
    """0 for the optimizer's low learning rate, 1 for its high one (the grid's ``lr_level`` axis); ``None`` for
    a rate that is not one of the grid's."""
    rates = LEARNING_RATES.get(optimizer, ())
    return rates.index(lr) if lr in rates else None


def build_network(config: ModelConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """The untrained network of ``config``: flatten, ``depth`` hidden layers, logits. The seed sets the initial
    weights, so models that differ only in activation, labels, augmentation or batch size start alike."""
    torch.manual_seed(config.seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(config.depth):
        layers += [nn.Linear(width, config.width), ACTIVATIONS[config.activation]()]
        width = config.width
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def training_labels(y: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """The labels a model learns: a seeded ``fraction`` of them replaced by uniformly random classes."""
    if fraction <= 0:
        return y
    generator = torch.Generator().manual_seed(seed + 1)
    flip = torch.rand(len(y), generator=generator) < fraction
    return torch.where(flip, torch.randint(0, num_classes, y.shape, generator=generator), y)


def evaluate_logits(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """The model's logits on ``x`` in eval mode, without gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    finally:
        model.train(was_training)


def fit(model: nn.Module, x: Tensor, y: Tensor, config: ModelConfig, writer: Any = None) -> tuple[int, float]:
    """Train ``model`` on ``(x, y)`` until it classifies all of them in eval mode or ``config.max_epochs`` pass;
    return the epochs trained and the final training accuracy. Batch order and noise come from a generator
    seeded by ``config.seed``."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    if config.optimizer == "adam":
        # The fused kernel: one call per parameter tensor, which matters for networks this small.
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    batch = config.batch_size or len(x)
    accuracy = 0.0
    epoch = 0
    while epoch < config.max_epochs and accuracy < 1.0:
        inputs = x + NOISE_STD * torch.randn(x.shape, generator=generator) if config.augment == "noise" else x
        order = torch.randperm(len(x), generator=generator)
        model.train()
        total = 0.0
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(inputs[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        epoch += 1
        accuracy = (evaluate_logits(model, x).argmax(1) == y).double().mean().item()
        if writer is not None:
            writer.add_scalar("train_loss_epoch", total / len(x), epoch)
            writer.add_scalar("train_accuracy_eval", accuracy, epoch)
    return epoch, accuracy


def parameter_measures(model: nn.Module, initial: dict[str, Tensor]) -> dict[str, float]:
    """The norm-based baselines: the Euclidean norm of all parameters, their distance from initialization, and
    log10 of the product of the weight matrices' spectral norms."""
    params = dict(model.named_parameters())
    weights = [p for name, p in params.items() if name.endswith("weight") and p.ndim == 2]
    with torch.no_grad():
        return {
            "param_norm": math.sqrt(sum(float(p.double().pow(2).sum()) for p in params.values())),
            "distance_from_init": math.sqrt(
                sum(float((p.double() - initial[name].double()).pow(2).sum()) for name, p in params.items())
            ),
            "log_spectral_product": sum(math.log10(float(torch.linalg.matrix_norm(w.double(), ord=2))) for w in weights),
        }


def sharpness(model: nn.Module, x: Tensor, y: Tensor, scale: float = SHARPNESS_SCALE,
              draws: int = SHARPNESS_DRAWS, seed: int = 0) -> float:
    """The mean increase of the training loss under random weight perturbations of a fixed relative size.

    Each draw perturbs every parameter tensor ``w`` by ``scale * ||w|| * u / ||u||`` with ``u`` standard normal
    (drawn from ``torch.Generator().manual_seed(seed)``), evaluates the cross-entropy on ``(x, y)`` in eval mode,
    and the result is the mean over ``draws`` of the perturbed loss minus the unperturbed one. The model is left
    as it was.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> sharpness(net, x, y, seed=1) == sharpness(net, x, y, seed=1)
        True
    """
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    base = F.cross_entropy(evaluate_logits(model, x), y).item()
    increases = []
    for _ in range(draws):
        perturbed = {}
        for name, p in params.items():
            u = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            perturbed[name] = p.detach() + scale * p.detach().norm() * u / u.norm()
        with torch.no_grad():
            was_training = model.training
            model.eval()
            logits = torch.func.functional_call(model, perturbed, (x,))
            model.train(was_training)
        increases.append(F.cross_entropy(logits, y).item() - base)
    return float(np.mean(increases))


def point_statistics(points: pd.DataFrame) -> dict[str, float]:
    """F4 for one model, from its per-point records: how the Jacobian norm, the max-softmax probability (as
    ``1 - max p``) and the predictive entropy track the per-point loss and the misclassified points, and what the
    Jacobian norm tells beyond the max-softmax probability."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    wrong = (points.label != points.prediction).to_numpy()
    both = 0 < wrong.sum() < len(wrong)
    uncertainty = 1 - points.max_softmax
    scores = {"jacobian": points.jacobian_norm, "max_softmax": uncertainty, "entropy": points.entropy}
    out: dict[str, float] = {}
    for name, score in scores.items():
        out[f"f4_spearman_{name}"] = float(spearmanr(score, points.loss).statistic)
        out[f"f4_auc_{name}"] = float(roc_auc_score(wrong, score)) if both else math.nan
    out["f4_partial_spearman"] = partial_spearman(points.jacobian_norm, points.loss, points.max_softmax)
    out["f4_auc_jacobian_within_confidence"] = (
        binned_auc(points.jacobian_norm.to_numpy(), wrong, points.max_softmax.to_numpy()) if both else math.nan
    )
    return out


def transition_anchors(x_train: Tensor, seed: int) -> Tensor:
    """The ``3 * TRANSITION_ELLIPSES`` training points through which every model's transitions are counted: the
    same for all models of a sweep (seeded by the sweep's seed)."""
    generator = torch.Generator().manual_seed(seed + 3)
    return x_train[torch.randperm(len(x_train), generator=generator)[: 3 * TRANSITION_ELLIPSES]]


def transition_measures(model: nn.Module, anchors: Tensor) -> dict[str, float]:
    """The mean sampled transitions along the ellipses through ``anchors`` (``TRANSITION_POINTS`` points each),
    the mean count on every other point (the convergence evidence) and the mean density per unit arc length."""
    from lightning_sensitivity.functional import count_transitions, ellipse_through

    curves = [ellipse_through(*anchors[3 * i : 3 * i + 3], TRANSITION_POINTS) for i in range(len(anchors) // 3)]
    counts = count_transitions(model, curves, method="sampled")
    return {
        "transitions": float(np.mean([int(c) for c in counts])),
        "transitions_half": float(np.mean([c.transitions_half for c in counts])),
        "transition_density": float(np.mean([c.density for c in counts])),
    }


def measure(model: nn.Module, initial: dict[str, Tensor], x_train: Tensor, y_train: Tensor, x_val: Tensor,
            y_val: Tensor, seed: int) -> tuple[dict[str, float], pd.DataFrame]:
    """The final measurements of one trained model, and its per-point records on the held-out set.

    Returns:
        The summary (gap, mean Jacobian norms, baselines, F4 statistics, transitions) and one row per held-out
        point: ``index``, ``label``, ``prediction``, ``loss``, ``jacobian_norm``, ``max_softmax``, ``entropy``.
    """
    from lightning_sensitivity.functional import jacobian_norm

    train_logits = evaluate_logits(model, x_train)
    train_loss = F.cross_entropy(train_logits, y_train).item()
    train_accuracy = (train_logits.argmax(1) == y_train).double().mean().item()
    norms, val_logits = jacobian_norm(model, x_val, return_logits=True)
    val_logits = val_logits.detach()
    val_losses = F.cross_entropy(val_logits, y_val, reduction="none")
    log_p = val_logits.double().log_softmax(1)
    prediction = val_logits.argmax(1)
    points = pd.DataFrame(
        {
            "index": np.arange(len(x_val)),
            "label": y_val.numpy(),
            "prediction": prediction.numpy(),
            "loss": val_losses.double().numpy(),
            "jacobian_norm": norms.detach().double().numpy(),
            "max_softmax": log_p.max(1).values.exp().numpy(),
            "entropy": -(log_p.exp() * log_p).sum(1).numpy(),
        }
    )
    val_accuracy = (prediction == y_val).double().mean().item()
    summary = {
        "train_loss": train_loss,
        "val_loss": val_losses.mean().item(),
        "gap_loss": val_losses.mean().item() - train_loss,
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        "gap_accuracy": train_accuracy - val_accuracy,
        "jacobian_norm": float(points.jacobian_norm.mean()),
        "jacobian_norm_train": jacobian_norm(model, x_train).double().mean().item(),
        **parameter_measures(model, initial),
        "sharpness": sharpness(model, x_train, y_train, seed=seed),
        "confidence": float(points.max_softmax.mean()),
        **point_statistics(points),
        "num_misclassified": int((points.label != points.prediction).sum()),
        **transition_measures(model, transition_anchors(x_train, seed)),
    }
    return summary, points


def quiet_lightning() -> None:
    """Keep the output readable: no per-run banners, no warnings that do not apply here (the logging interval is
    longer than a digits epoch on purpose, a deprecation inside Lightning)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def train_and_measure(config: ModelConfig, spec: DataSpec, runs_dir: str, points_dir: str) -> dict[str, Any]:
    """Train one model (its curve and final measurements logged to TensorBoard under ``runs_dir``), measure it,
    and return its row of the table: every hyper-parameter and every measurement. Its per-point records are
    written to ``points_dir/<model_id>.csv``."""
    from torch.utils.tensorboard import SummaryWriter

    x_train, y_true, x_val, y_val = load_tensors(spec)
    num_classes = int(torch.cat([y_true, y_val]).max()) + 1
    y_train = training_labels(y_true, num_classes, config.random_label_fraction, config.seed)
    model = build_network(config, x_train[0].numel(), num_classes)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    folder = Path(runs_dir) / f"reproduce-{spec.name}" / config.model_id
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier try
    writer = SummaryWriter(str(folder))
    start, cpu_start = time.perf_counter(), time.process_time()
    epochs, accuracy = fit(model, x_train, y_train, config, writer)
    seconds = time.perf_counter() - start
    summary, points = measure(model, initial, x_train, y_train, x_val, y_val, spec.seed)
    # CPU time, training and measuring: on a shared machine it grows far less than wall time does.
    cpu_seconds = time.process_time() - cpu_start
    for key in ("jacobian_norm", "transition_density"):
        writer.add_scalar(f"sensitivity/{key}", summary[key], epochs)
    for key in ("train_loss", "val_loss", "gap_loss", "train_accuracy", "val_accuracy", "gap_accuracy"):
        writer.add_scalar(f"generalization/{key}", summary[key], epochs)
    writer.close()
    Path(points_dir).mkdir(parents=True, exist_ok=True)
    points.to_csv(Path(points_dir) / f"{config.model_id}.csv", index=False)
    return {
        "model_id": config.model_id,
        "dataset": spec.name,
        **dataclasses.asdict(config),
        "batch_size": config.batch_size or len(x_train),
        "full_batch": config.batch_size is None,
        "lr_level": learning_rate_level(config.optimizer, config.lr),
        "num_train_points": len(x_train),
        "num_val_points": len(x_val),
        "epochs_trained": epochs,
        "reached_target": accuracy >= 1.0,
        "train_seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **summary,
    }
