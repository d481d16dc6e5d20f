"""The causal test: does lowering the Jacobian norm lower the generalization gap?

F1 finds that the Jacobian norm *correlates* with the gap over models that differ in their hyper-parameters. Here
the Jacobian norm is moved on purpose, everything else held fixed: base configurations of the F1 grid, each with
several seeds, train with ``jacobian_penalty`` (the softmax Jacobian, as it is measured) added to their loss at a
few strengths, 0 included, to the reproduction's fit criterion; beside them, the same bases and seeds with weight
decay (an L2 term on every parameter) instead. Each regularized model is paired with its unregularized twin (same
base, same seed: same data, initial weights and batch order), and paired sign tests say whether the Jacobian norm
fell, and whether the gaps fell with it.

This module holds the design (:func:`causal_design`), one model's training and measurement
(:func:`train_and_measure`: ``examples.paper.training.fit`` with its ``penalty`` hook, then
``examples.paper.measures.measure``), the pairs and their statistics (:func:`paired_effects`), the verdict rules
(:data:`RULES`, :func:`verdicts`) and the report (:func:`write_report`). ``python -m examples.causal`` runs it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from examples.paper.data import DataSpec, load_tensors
from examples.paper.grid import LEARNING_RATES, ModelConfig
from examples.paper.measures import measure
from examples.paper.report import markdown_table
from examples.paper.training import build_network, fit
from lightning_sensitivity.functional import jacobian_penalty

#: The base configurations, from the F1 grid (ReLU, true labels, no augmentation, mini-batches): width, depth,
#: optimizer, learning-rate level, batch size. Both optimizers; SGD at its low rate only (at 0.1 the penalty made
#: SGD diverge in a trial), Adam at its high one (at 0.001 and batch 128 a digits model did not fit in 150 epochs).
BASES: tuple[tuple[int, int, str, int, int], ...] = (
    (128, 2, "adam", 1, 32),
    (256, 3, "adam", 1, 32),
    (256, 1, "adam", 1, 128),
    (256, 3, "sgd", 0, 32),
)
QUICK_BASES = ((256, 1, "adam", 1, 32),)
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
#: The quick run's training points (a seeded subset): the quick base fits them in about 35 epochs.
QUICK_TRAIN_POINTS = 100
QUICK_MAX_EPOCHS = 60
#: Strengths of the Jacobian penalty (0: the unregularized twin) and of weight decay.
PENALTY_STRENGTHS = (0.0, 0.01, 0.03, 0.1)
WEIGHT_DECAYS = (1e-4, 1e-3, 3e-3)
QUICK_PENALTY_STRENGTHS = (0.0, 0.03)
QUICK_WEIGHT_DECAYS = (1e-3,)
#: How the weight decays were chosen, as the report states it.
WEIGHT_DECAY_TRIAL = (
    "chosen in a trial on digits (base `w256-d3-sgd0.02-b32`, seed 0) in which the penalty at 0.01, 0.03 and 0.1 "
    "changed the parameter norm by x1.01, x1.04 and x1.32 (it raised it) and weight decays 0.0001, 0.001 and "
    "0.003 by x0.98, x0.86 and x0.54: factors of about the same size, the other way (weight decay can only "
    "lower it)"
)
#: The penalty as every penalized model computes it: the softmax Jacobian (the measured quantity), the projection
#: estimator with two products per point (the most probable class's row exact, one direction for the others).
PENALTY_OPTIONS: dict[str, Any] = {"output": "softmax", "method": "projection", "num_projections": 2}
#: One-sided significance of the paired sign tests, and the fewest pairs that can reach it (0.5 ** 5 = 0.031).
SIGNIFICANCE = 0.05
MIN_PAIRS = 5

REGULARIZERS = ("none", "jacobian", "weight_decay")


@dataclass(frozen=True)
class CausalModel:
    """One model of the design: a grid model (``config``, whose seed sets the data order and initial weights) and
    the regularizer added to its loss, at ``strength`` (``"none"``: the unregularized twin)."""

    config: ModelConfig
    regularizer: str
    strength: float

    @property
    def base_id(self) -> str:
        """The base configuration, without its seed."""
        c = self.config
        return f"w{c.width}-d{c.depth}-{c.optimizer}{c.lr:g}-b{c.batch_size}"

    @property
    def model_id(self) -> str:
        suffix = "" if self.regularizer == "none" else f"-{self.regularizer}{self.strength:g}"
        return f"{self.config.model_id}{suffix}"


def causal_design(quick: bool = False, max_epochs: int | None = None, seeds: Sequence[int] | None = None,
                  num_bases: int | None = None, strengths: Sequence[float] | None = None,
                  weight_decays: Sequence[float] | None = None) -> list[CausalModel]:
    """Every model of the design: for each base (the first ``num_bases``; default all) and seed, the unregularized
    twin, the Jacobian penalty at each nonzero strength, and weight decay at each strength (``strengths`` and
    ``weight_decays`` replace the defaults).

    Example:
        >>> design = causal_design(quick=True)
        >>> [(m.regularizer, m.strength) for m in design if m.config.seed == 0]
        [('none', 0.0), ('jacobian', 0.03), ('weight_decay', 0.001)]
    """
    bases = (QUICK_BASES if quick else BASES)[:num_bases]
    seeds = tuple(seeds) if seeds is not None else (QUICK_SEEDS if quick else SEEDS)
    epochs = max_epochs if max_epochs is not None else (QUICK_MAX_EPOCHS if quick else 300)
    penalties = strengths if strengths is not None else (QUICK_PENALTY_STRENGTHS if quick else PENALTY_STRENGTHS)
    decays = weight_decays if weight_decays is not None else (QUICK_WEIGHT_DECAYS if quick else WEIGHT_DECAYS)
    design = []
    for width, depth, optimizer, level, batch in bases:
        for seed in seeds:
            config = ModelConfig(width, depth, "relu", optimizer, LEARNING_RATES[optimizer][level], batch, "none", 0.0,
                                 seed, epochs)
            design.append(CausalModel(config, "none", 0.0))
            design += [CausalModel(config, "jacobian", s) for s in penalties if s > 0]
            design += [CausalModel(config, "weight_decay", s) for s in decays]
    return design


@dataclass(frozen=True)
class CausalData:
    """The data the models train on: scikit-learn's digits (``file=None``), or a ``.npz`` file with uint8 images
    ``train_images`` / ``test_images`` ``[N, C, H, W]`` and integer ``train_labels`` / ``test_labels`` (the held-out
    set: its test split), read as the reproduction's ``--data-file`` reads it. ``seed`` seeds the digits split and the subset of ``train_points`` training points (all:
    ``None``)."""

    file: str | None = None
    seed: int = 0
    train_points: int | None = None

    @property
    def name(self) -> str:
        return "digits" if self.file is None else Path(self.file).stem


def load_data(data: CausalData) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_val, y_val)``, through the reproduction's loader (``examples.paper.data``): digits, or
    the ``.npz`` file's arrays (``uint8`` images scaled to [0, 1]), with a subset of ``train_points`` drawn with
    ``seed``; cached there, so each process reads them once."""
    file = None if data.file is None else str(data.file)
    return load_tensors(DataSpec(data.name, seed=data.seed, train_points=data.train_points, data_file=file))


def regularizer(model: CausalModel) -> Callable[[nn.Module, Tensor], Tensor] | None:
    """What ``fit`` adds to each batch's loss: ``strength * jacobian_penalty(net, x)`` with the model's own
    generator (seeded by its seed), or ``strength / 2 * ||theta||^2`` over every parameter (weight decay, coupled
    as in ``torch.optim``'s ``weight_decay``); ``None`` for the unregularized twin."""
    if model.regularizer == "none":
        return None
    strength = model.strength
    if model.regularizer == "jacobian":
        generator = torch.Generator().manual_seed(model.config.seed)
        return lambda net, x: strength * jacobian_penalty(net, x, generator=generator, **PENALTY_OPTIONS)
    return lambda net, x: strength / 2 * sum(p.square().sum() for p in net.parameters())


def train_and_measure(model: CausalModel, data: CausalData) -> dict[str, Any]:
    """Train one model of the design to the fit criterion (or its budget) and measure it as the reproduction
    measures its models (``examples.paper.measures.measure``); its row of the table. A model whose weights turned
    non-finite is not measured (its row says ``diverged``)."""
    x_train, y_train, x_val, y_val = load_data(data)
    num_classes = int(torch.cat([y_train, y_val]).max()) + 1
    net = build_network(model.config, x_train[0].numel(), num_classes)
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    start = time.perf_counter()
    result = fit(net, x_train, y_train, model.config, penalty=regularizer(model))
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "model_id": model.model_id,
        "base_id": model.base_id,
        "dataset": data.name,
        **dataclasses.asdict(model.config),
        "regularizer": model.regularizer,
        "strength": model.strength,
        "epochs_trained": result.epochs,
        "reached_target": result.accuracy >= 1.0,
        "train_seconds": seconds,
        "diverged": result.diverged or not all(bool(p.isfinite().all()) for p in net.parameters()),
    }
    if not row["diverged"]:
        summary, _ = measure(net, initial, x_train, y_train, x_val, y_val, data.seed)
        row.update(summary)
    return row


#: The quantities compared within each pair: (column, how the report names it, whether it is compared as a ratio).
QUANTITIES: tuple[tuple[str, str, bool], ...] = (
    ("jacobian_norm_train", "Jacobian norm, training points", True),
    ("jacobian_norm", "Jacobian norm, held-out points", True),
    ("param_norm", "parameter norm", True),
    ("gap_loss", "loss gap", False),
    ("gap_accuracy", "accuracy gap", False),
    ("val_accuracy", "held-out accuracy", False),
)


def pairs(table: pd.DataFrame) -> pd.DataFrame:
    """Each regularized model beside its unregularized twin (same base and seed): the two models' values of every
    compared quantity (``<column>`` and ``<column>_twin``) and whether both fit."""
    twins = table[table.regularizer == "none"].set_index(["base_id", "seed"])
    rows = []
    for _, model in table[table.regularizer != "none"].iterrows():
        key = (model.base_id, model.seed)
        if key not in twins.index:
            continue
        twin = twins.loc[key]
        row = {"base_id": model.base_id, "seed": model.seed, "regularizer": model.regularizer,
               "strength": model.strength, "both_fit": bool(model.reached_target and twin.reached_target)}
        for column, _, _ in QUANTITIES:
            row[column] = model.get(column, math.nan)
            row[f"{column}_twin"] = twin.get(column, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def sign_test(differences: Sequence[float] | np.ndarray) -> tuple[int, int, float, float]:
    """``(fell, n, p_fell, p_rose)``: in how many of the ``n`` non-tied pairs the value fell, and the one-sided sign
    test p-values for "falls" and "rises" (binomial, probability 1/2).

    Example:
        >>> fell, n, p_fell, p_rose = sign_test([-1.0, -2.0, -0.5, 0.0, 3.0])
        >>> fell, n, round(p_fell, 4), round(p_rose, 4)
        (3, 4, 0.3125, 0.9375)
    """
    values = np.asarray(differences, dtype=float)
    values = values[np.isfinite(values) & (values != 0)]
    fell, n = int((values < 0).sum()), len(values)
    if n == 0:
        return 0, 0, math.nan, math.nan
    return (fell, n, float(stats.binomtest(fell, n, alternative="greater").pvalue),
            float(stats.binomtest(n - fell, n, alternative="greater").pvalue))


def paired_effects(paired: pd.DataFrame) -> pd.DataFrame:
    """Per regularizer, strength and quantity, over the pairs in which both models fit: the number of pairs, the
    median ratio (norms) or difference (gaps, accuracy) to the twin, and the sign test (fell in k of n)."""
    rows = []
    for (kind, strength), group in paired[paired.both_fit].groupby(["regularizer", "strength"]):
        for column, label, ratio in QUANTITIES:
            model, twin = group[column].to_numpy(float), group[f"{column}_twin"].to_numpy(float)
            fell, n, p_fell, p_rose = sign_test(model - twin)
            rows.append({
                "regularizer": kind, "strength": strength, "quantity": column, "label": label, "pairs": len(group),
                "median_change": float(np.median(model / twin if ratio else model - twin)) if len(group) else math.nan,
                "as_ratio": ratio, "fell": fell, "n": n, "p_fell": p_fell, "p_rose": p_rose,
                "median_model": float(np.median(model)), "median_twin": float(np.median(twin)),
            })
    return pd.DataFrame(rows)


RULES = f"""\
- **Pairs.** Every regularized model is paired with its unregularized twin: the same base configuration and seed,
  so the same data, initial weights and batch order. Only pairs in which both models reached the fit criterion
  enter the statistics; the others are listed apart.
- **Sign tests.** For a quantity and a strength, the pairs in which it fell against the twin (ties left out),
  with the one-sided binomial sign test (probability 1/2): "fell" at p < {SIGNIFICANCE}, "rose" at p < {SIGNIFICANCE}
  the other way, else "no change shown"; with fewer than {MIN_PAIRS} pairs that fit (too few to reach
  p < {SIGNIFICANCE}), "too few pairs", and a verdict that rests only on such strengths is **undecided**.
- **V1, the penalty lowers the Jacobian norm:** (a) at the training points, where it acts: if the norm there fell
  at no strength, the penalty is broken; (b) at the held-out points, the paper's measure (the one F1 correlates
  with the gap): the strengths at which it fell are those where the Jacobian norm was lowered on purpose.
- **V2, the gap falls with it:** at each strength where V1 (b) holds, the loss gap and the accuracy gap are tested
  the same way. Per gap: **yes** if it fell at every such strength, **no** if at none (**no, it rose** if it rose at
  one), **partly** otherwise; not judged if V1 (b) holds at no strength.
- **Is the Jacobian special?** Weight decay gets the same tests. At the strengths used, it changes the parameter
  norm by factors of the same size as the penalty does (the table shows both). Per gap: **yes** if the gap falls
  with the penalty (V2 yes or partly) and not with weight decay at any strength; **no** if it falls with both;
  **neither** if it falls with neither; **weight decay only** otherwise."""


def _decided(results: Sequence[str]) -> str:
    if results and all(r == "fell" for r in results):
        return "yes"
    if "fell" in results:
        return "partly"
    return "no, it rose" if "rose" in results else "no"


def _direction(effect: pd.Series) -> str:
    if effect.pairs < MIN_PAIRS:
        return "too few pairs"
    if effect.p_fell < SIGNIFICANCE:
        return "fell"
    if effect.p_rose < SIGNIFICANCE:
        return "rose"
    return "no change shown"


def verdicts(effects: pd.DataFrame) -> dict[str, Any]:
    """The rules applied: the strengths at which the penalty lowered the Jacobian norm at the training points
    (V1 a) and at the held-out points (V1 b), each gap's V2 verdict, and whether the Jacobian is special (per gap).

    Example:
        >>> rows = [("jacobian", 0.1, "jacobian_norm_train", 0.001, 0.9), ("jacobian", 0.1, "jacobian_norm", 0.01, 0.9),
        ...         ("jacobian", 0.1, "gap_loss", 0.01, 0.9), ("jacobian", 0.1, "gap_accuracy", 0.3, 0.2),
        ...         ("weight_decay", 0.001, "gap_loss", 0.5, 0.5), ("weight_decay", 0.001, "gap_accuracy", 0.5, 0.5)]
        >>> effects = pd.DataFrame(rows, columns=["regularizer", "strength", "quantity", "p_fell", "p_rose"]).assign(pairs=12)
        >>> v = verdicts(effects)
        >>> v["v1a"], v["v1b_strengths"], v["v2"], v["special"]
        ('yes', [0.1], {'gap_loss': 'yes', 'gap_accuracy': 'no'}, {'gap_loss': 'yes', 'gap_accuracy': 'neither'})
    """
    def directions(kind: str, quantity: str) -> dict[float, str]:
        rows = effects[(effects.regularizer == kind) & (effects.quantity == quantity)]
        return {float(r.strength): _direction(r) for _, r in rows.iterrows()}

    def judged(kind: str, quantity: str) -> bool:
        return any(d != "too few pairs" for d in directions(kind, quantity).values())

    acts = [s for s, d in directions("jacobian", "jacobian_norm_train").items() if d == "fell"]
    lowered = [s for s, d in directions("jacobian", "jacobian_norm").items() if d == "fell"]
    undecided = "undecided (too few pairs)"
    v1a = "yes" if acts else ("no: the penalty is broken" if judged("jacobian", "jacobian_norm_train") else undecided)
    v1b = "yes" if lowered else ("no" if judged("jacobian", "jacobian_norm") else undecided)
    v2, special = {}, {}
    for gap in ("gap_loss", "gap_accuracy"):
        penalty = directions("jacobian", gap)
        results = [penalty[s] for s in lowered if penalty.get(s, "too few pairs") != "too few pairs"]
        v2[gap] = _decided(results) if results else (undecided if v1b == undecided else "not judged (V1 b fails)")
        if v2[gap] not in ("yes", "partly", "no", "no, it rose") or not judged("weight_decay", gap):
            special[gap] = undecided
            continue
        with_penalty = v2[gap] in ("yes", "partly")
        with_decay = "fell" in directions("weight_decay", gap).values()
        special[gap] = {(True, False): "yes", (True, True): "no", (False, False): "neither",
                        (False, True): "weight decay only"}[(with_penalty, with_decay)]
    return {"v1a": v1a, "v1a_strengths": acts, "v1b": v1b, "v1b_strengths": lowered, "v2": v2, "special": special}


def largest_changes(effects: pd.DataFrame) -> list[str]:
    """For each regularizer, the strength with the largest median fall of the loss gap, and what the Jacobian norms,
    the accuracy gap and the held-out accuracy did there (one bullet each)."""
    bullets = []
    for kind, name in (("jacobian", "Jacobian penalty"), ("weight_decay", "weight decay")):
        rows = effects[(effects.regularizer == kind) & (effects.pairs >= MIN_PAIRS)]
        gaps = rows[rows.quantity == "gap_loss"]
        if not len(gaps):
            continue
        strength = float(gaps.loc[gaps.median_change.idxmin()].strength)
        at = rows[rows.strength == strength].set_index("quantity").median_change
        bullets.append(
            f"- {name} at {strength:g}: loss gap {at['gap_loss']:+.4f}, accuracy gap {at['gap_accuracy']:+.4f}, "
            f"held-out accuracy {at['val_accuracy']:+.4f}; Jacobian norm x{at['jacobian_norm']:.3f} (held-out), "
            f"x{at['jacobian_norm_train']:.3f} (training points); parameter norm x{at['param_norm']:.3f}."
        )
    return bullets


def effects_table(effects: pd.DataFrame, kind: str) -> str:
    """One regularizer's effects: a row per strength and quantity."""
    rows = effects[effects.regularizer == kind]
    frame = pd.DataFrame({
        "strength": [f"{s:g}" for s in rows.strength],
        "quantity": rows.label,
        "pairs": rows.pairs.astype(int),
        "twin (median)": rows.median_twin.map(lambda v: f"{v:.4g}"),
        "regularized (median)": rows.median_model.map(lambda v: f"{v:.4g}"),
        "median change": [f"x{v:.3f}" if r else f"{v:+.4f}" for v, r in zip(rows.median_change, rows.as_ratio, strict=True)],
        "fell in": [f"{f} of {n}" for f, n in zip(rows.fell, rows.n, strict=True)],
        "p (fell)": rows.p_fell.map(lambda p: f"{p:.2g}"),
        "p (rose)": rows.p_rose.map(lambda p: f"{p:.2g}"),
        "result": [_direction(r) for _, r in rows.iterrows()],
    })
    return markdown_table(frame)


def design_text(design: Sequence[CausalModel], data: CausalData) -> str:
    """The design as the report states it, before any number."""
    bases = sorted({m.base_id for m in design})
    used_seeds = sorted({m.config.seed for m in design})
    penalties = sorted({m.strength for m in design if m.regularizer == "jacobian"})
    decays = sorted({m.strength for m in design if m.regularizer == "weight_decay"})
    options = ", ".join(f"{k}={v!r}" for k, v in PENALTY_OPTIONS.items())
    subset = "" if data.train_points is None else f", a seeded subset of {data.train_points} training points"
    return f"""\
- Data: {data.name}{"" if data.file is None else f" (`{data.file}`)"}{subset}; the held-out set is {"a seeded 30% split" if data.file is None else "its test split"}.
- Base configurations ({len(bases)}, from the F1 grid: ReLU, true labels, no augmentation): {", ".join(f"`{b}`" for b in bases)};
  seeds {", ".join(map(str, used_seeds))} (data order, initial weights; the data split is fixed). {len(design)} models.
- Jacobian penalty: the loss is `cross_entropy + strength * jacobian_penalty(model, x, {options})` on each batch,
  strengths {", ".join(f"{s:g}" for s in penalties)} (and 0: the twin). The directions come from the model's own
  generator, seeded with its seed.
- Weight decay: the loss is `cross_entropy + strength / 2 * ||theta||^2` (every parameter; what `weight_decay` does
  in `torch.optim.SGD` and `Adam`), strengths {", ".join(f"{s:g}" for s in decays)}; {WEIGHT_DECAY_TRIAL}.
- Every model trains as the reproduction trains its models (`examples.paper.training.fit`) to the same fit
  criterion: it classifies every training point correctly in eval mode, checked after each epoch, or its budget
  of {design[0].config.max_epochs} epochs. It is then measured as the reproduction measures its models
  (`examples.paper.measures.measure`): both gaps in eval mode on the whole training and held-out sets, the mean
  Jacobian norm on the held-out and on the training points, the parameter norm."""


def write_report(out: Path, table: pd.DataFrame, design: str, setup: Sequence[str], command: str) -> Path:
    """``out/report.md``: the design and the verdict rules, then the results and the verdicts."""
    paired = pairs(table)
    effects = paired_effects(paired)
    found = verdicts(effects) if len(effects) else {}
    unfitted = table[~table.reached_target.astype(bool)]
    lines = [
        f"# The causal test on {table.dataset.iloc[0]}: does lowering the Jacobian norm lower the gap?",
        "",
        f"Command: `{command}`",
        "",
        "## Design",
        "",
        design,
        "",
        "## Verdict rules",
        "",
        RULES,
        "",
        "## Verdicts",
        "",
    ]
    if not len(effects):
        lines.append("No pair in which both models fit: nothing is judged.")
    else:
        def at(strengths: list[float]) -> str:
            return f"at strength {', '.join(f'{s:g}' for s in strengths)}" if strengths else "at no strength"

        lines += [
            "| Question | Verdict |",
            "|---|---|",
            f"| V1 (a): the penalty lowers the Jacobian norm at the training points | **{found['v1a']}** ({at(found['v1a_strengths'])}) |",
            f"| V1 (b): ... and at the held-out points (the paper's measure) | **{found['v1b']}** ({at(found['v1b_strengths'])}) |",
            *(f"| V2: the {gap.replace('_', ' ').replace('gap ', '')} gap falls with it | **{found['v2'][gap]}** |"
              for gap in ("gap_loss", "gap_accuracy")),
            *(f"| Is the Jacobian special ({gap.replace('_', ' ').replace('gap ', '')} gap)? | **{found['special'][gap]}** |"
              for gap in ("gap_loss", "gap_accuracy")),
        ]
        changes = largest_changes(effects)
        lines += (
            ["", f"Beside the verdicts, the largest median changes (strengths with at least {MIN_PAIRS} pairs that both fit):", "", *changes]
            if changes
            else ["", f"No strength has {MIN_PAIRS} pairs that both fit: the tables below give the pairs there are."]
        )
    lines += ["", "## Jacobian penalty against its unregularized twin", "", effects_table(effects, "jacobian") if len(effects) else "(no pairs)",
              "", "## Weight decay against its unregularized twin", "", effects_table(effects, "weight_decay") if len(effects) else "(no pairs)",
              "", "## Models that did not fit", ""]
    if len(unfitted):
        lines.append(markdown_table(pd.DataFrame({
            "model": unfitted.model_id,
            "regularizer": unfitted.regularizer,
            "strength": unfitted.strength.map(lambda v: f"{v:g}"),
            "epochs": unfitted.epochs_trained.astype(int),
            "training accuracy": unfitted.reindex(columns=["train_accuracy"]).train_accuracy.astype(float),
            "diverged": unfitted.diverged.astype(bool),
        }), digits=4))
    else:
        lines.append("Every model reached the fit criterion.")
    lines += ["", "## Run", "", *[f"- {line}" for line in setup], "",
              "Every model's row (hyper-parameters, regularizer, every measurement) is in `results.csv` beside this report.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
