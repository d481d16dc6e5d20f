"""The models of the sweep: every hyper-parameter of one model, and which models the sweep trains.

The sweep has two parts.

- The F1 grid: ReLU networks on true labels without augmentation, over every combination of width, depth,
  optimizer, learning rate (three per optimizer), batch size and seed. Its fitted models are F1's population, and
  the grid's axes are those of the granulated Kendall coefficient. Three sizes (``GRIDS``): ``default`` (1,152
  models), ``small`` (the 144 models of earlier versions, all of them in the default grid too) and ``quick`` (8).
- The F3 variants: for each of a few grid models (the F3 bases), one model per factor of the paper, which
  differs from its base in that factor alone (same seed, so the same data split, initial weights and batch
  order): Gaussian input noise as the augmentation, 25% and 100% random labels (on the Adam bases), full-batch
  training, Hardtanh and Hardsigmoid instead of ReLU.

How a model trains is in ``examples.paper.training``, how it is measured in ``examples.paper.measures``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

#: The hyper-parameter axes of the F1 grid, as the granulated Kendall coefficient varies them. ``lr`` is the
#: learning rate's level within its optimizer (the two optimizers take different rates).
AXES = ("width", "depth", "optimizer", "lr_level", "batch_size", "seed")

#: Learning rates per optimizer, lowest first; a model's ``lr_level`` is its rate's index here.
LEARNING_RATES: dict[str, tuple[float, ...]] = {"sgd": (0.02, 0.05, 0.1), "adam": (0.001, 0.003, 0.01)}

#: The learning rate of the F3 bases per optimizer (the rate at which the random-label and Hardsigmoid variants
#: fit within the budget), and of the small grid's high level.
F3_LEARNING_RATES = {"sgd": 0.1, "adam": 0.003}


@dataclass(frozen=True)
class GridAxes:
    """The values of each axis of an F1 grid (the seeds are offsets from the sweep's seed)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    learning_rates: dict[str, tuple[float, ...]]
    batch_sizes: tuple[int, ...]
    seed_offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        """The number of models of the grid."""
        rates = sum(len(r) for r in self.learning_rates.values())
        return len(self.widths) * len(self.depths) * rates * len(self.batch_sizes) * len(self.seed_offsets)


#: The F1 grids by name. ``small`` is the grid of earlier versions (144 models); every model of it is in
#: ``default`` too, so the report can say how the statistics move from the one to the other.
GRIDS: dict[str, GridAxes] = {
    "default": GridAxes((32, 64, 128, 256), (1, 2, 3, 4), LEARNING_RATES, (32, 64, 128), (0, 1, 2, 3)),
    "small": GridAxes((64, 128, 256), (1, 2, 3), {"sgd": (0.02, 0.1), "adam": (0.001, 0.003)}, (32, 128), (0, 1)),
    "quick": GridAxes((64, 256), (1, 3), {"sgd": (0.1,), "adam": (0.003,)}, (32,), (0,)),
}

#: One F3 variant per factor: its name and the settings that differ from its base.
VARIANTS: dict[str, dict[str, Any]] = {
    "augmentation": {"augment": "noise"},
    "random labels 25%": {"random_label_fraction": 0.25},
    "random labels 100%": {"random_label_fraction": 1.0},
    "full batch": {"batch_size": None},
    "hardtanh": {"activation": "hardtanh"},
    "hardsigmoid": {"activation": "hardsigmoid"},
}

#: Full-batch training takes one step per epoch: its budget is this many times the mini-batch one.
FULL_BATCH_EPOCH_FACTOR = 10


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
        augment: ``"none"`` or ``"noise"`` (Gaussian noise of standard deviation
            ``examples.paper.training.NOISE_STD`` on every input, drawn anew each epoch).
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


def sweep_grid(grid: str = "default", seed: int = 0, max_epochs: int | None = None) -> Sweep:
    """The sweep: the F1 grid ``GRIDS[grid]`` and the F3 variants of its bases.

    ``default``: 1,152 grid models (width 32/64/128/256 x depth 1/2/3/4 x SGD or Adam at three learning rates x
    batch 32/64/128 x seeds ``seed`` to ``seed + 3``); ``small``: the 144 of earlier versions (width 64/128/256 x
    depth 1/2/3 x SGD 0.02/0.1 or Adam 0.001/0.003 x batch 32/128 x seeds ``seed``, ``seed + 1``). Both have
    the same 60 variants of 12 bases (width 128/256 x depth 1/2/3 x SGD 0.1 or Adam 0.003, batch 32, seed
    ``seed``; the random-label variants on the Adam bases only). ``quick``: 8 grid models and the 6 variants
    of one base.

    Args:
        grid: ``default``, ``small`` or ``quick`` (the small sweep that CI runs).
        seed: the first seed of the grid (the F3 bases and the F2 model use it).
        max_epochs: the mini-batch budget; default 40 (quick) or 300.

    Raises:
        ValueError: for an unknown grid name.

    Example:
        >>> sweep = sweep_grid("quick")
        >>> len(sweep.grid), len(sweep.variants), sweep.reference.model_id
        (8, 6, 'w256-d3-relu-adam0.003-b32-augnone-rl0-s0-e40')
        >>> len(sweep_grid("small").grid), len(sweep_grid().grid)
        (144, 1152)
    """
    if grid not in GRIDS:
        raise ValueError(f"Unknown grid {grid!r}; choose one of {', '.join(GRIDS)}.")
    quick = grid == "quick"
    epochs = max_epochs if max_epochs is not None else (40 if quick else 300)
    axes = GRIDS[grid]
    rates = [(optimizer, lr) for optimizer, values in axes.learning_rates.items() for lr in values]
    configs = tuple(
        ModelConfig(width, depth, "relu", optimizer, lr, batch, "none", 0.0, seed + offset, epochs)
        for width, depth, (optimizer, lr), batch, offset in itertools.product(
            axes.widths, axes.depths, rates, axes.batch_sizes, axes.seed_offsets
        )
    )
    bases = (
        {"width": (256,), "depth": (1,), "optimizer": ("adam",)}
        if quick
        else {"width": (128, 256), "depth": (1, 2, 3), "optimizer": ("sgd", "adam")}
    )
    variants = []
    for base in configs:
        # The high learning rate: at the low one, the random-label and Hardsigmoid variants need far longer to fit.
        if (base.width in bases["width"] and base.depth in bases["depth"] and base.optimizer in bases["optimizer"]
                and base.lr == F3_LEARNING_RATES[base.optimizer] and base.batch_size == 32 and base.seed == seed):
            for factor, changes in VARIANTS.items():
                # SGD at these rates does not memorize random labels within the budget (in a trial of the default
                # sweep, none of 5 models did at 100% and 3 of 5 at 25%): those pairs would only be reported apart.
                if "random_label_fraction" in changes and base.optimizer != "adam":
                    continue
                variant = dataclasses.replace(base, **changes)
                if variant.batch_size is None:
                    variant = dataclasses.replace(variant, max_epochs=epochs * FULL_BATCH_EPOCH_FACTOR)
                variants.append((factor, base, variant))
    # F2's model: three ReLU layers of the widest width, Adam at its lowest rate, batch 32, the sweep's seed.
    reference = next(c for c in configs if c.depth == 3 and c.optimizer == "adam" and c.width == max(axes.widths)
                     and c.batch_size == 32 and c.seed == seed)
    return Sweep(configs, tuple(variants), reference)


def learning_rate_level(optimizer: str, lr: float) -> int | None:
    """The index of ``lr`` among ``LEARNING_RATES[optimizer]`` (the grid's ``lr_level`` axis); ``None`` for a
    rate that is not one of the grid's.

    Example:
        >>> learning_rate_level("adam", 0.003), learning_rate_level("sgd", 0.2)
        (1, None)
    """
    rates = LEARNING_RATES.get(optimizer, ())
    return rates.index(lr) if lr in rates else None
