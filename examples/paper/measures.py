"""How a trained model of the sweep is measured: the two sides of each gap, the Jacobian norm of every held-out
point, the baselines (parameter norm, distance from initialization, product of spectral norms, sharpness,
held-out confidence), the per-point statistics of F4 and the transitions along fixed ellipses through training
points.

Every model is measured the same way, through the package's public API: the model runs inside
``lightning_sensitivity.functional.measuring`` (eval mode, no gradients), losses and accuracies come from
``ClassificationLossAccuracy``, the per-point rows from ``PointRecords``, the Jacobian norms from
``jacobian_norm`` and the transitions from ``count_transitions``, the number of piecewise-linear units from
``activation_codes``.

Every measure copes with a model whose weights or outputs are not finite (a model that diverged is never measured,
but a finite model can still overflow): the measure is then NaN, never an exception that would end the sweep.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from examples.paper.rank_statistics import binned_auc, partial_spearman
from lightning_sensitivity.functional import (
    NonFiniteOutputError,
    activation_codes,
    count_transitions,
    ellipse_through,
    jacobian_norm,
    measuring,
)
from lightning_sensitivity.metrics import ClassificationLossAccuracy, PointRecords

#: Sharpness: the relative size of each weight perturbation, and the number of seeded perturbations.
SHARPNESS_SCALE = 0.1
SHARPNESS_DRAWS = 8
#: The ellipses through training points along which every model's transitions are counted.
TRANSITION_ELLIPSES = 4
TRANSITION_POINTS = 960
#: The most points a forward pass of ``loss_and_accuracy`` takes.
CHUNK = 4096
#: The per-model statistics of F4, as ``point_statistics`` names them.
POINT_STATISTICS = (
    *(f"f4_{kind}_{name}" for name in ("jacobian", "max_softmax", "entropy") for kind in ("spearman", "auc")),
    "f4_partial_spearman",
    "f4_auc_jacobian_within_confidence",
)


def _loss_accuracy(metric: ClassificationLossAccuracy) -> tuple[float, float]:
    values = metric.compute()
    return float(values["loss"]), float(values["accuracy"])


def loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """The mean cross-entropy and the accuracy of ``model`` on ``(x, y)``, in eval mode without gradients (the
    model's modes are restored), by ``ClassificationLossAccuracy``.

    Example:
        >>> logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
        >>> loss, accuracy = loss_and_accuracy(nn.Identity(), logits, torch.tensor([0, 0]))
        >>> round(loss, 4), accuracy
        (1.5486, 0.5)
    """
    metric = ClassificationLossAccuracy()
    with measuring(model, x.device) as net:
        for start in range(0, len(x), CHUNK):
            metric.update(net(x[start : start + CHUNK]), y[start : start + CHUNK])
    return _loss_accuracy(metric)


def _log_spectral_norm(weight: Tensor) -> float:
    # The SVD raises on NaN or infinite entries (a sweep once ended there): such a weight has no spectral norm.
    if not bool(torch.isfinite(weight).all()):
        return math.nan
    norm = float(torch.linalg.matrix_norm(weight.double(), ord=2))
    return math.log10(norm) if norm > 0 else -math.inf


def parameter_measures(model: nn.Module, initial: dict[str, Tensor]) -> dict[str, float]:
    """The norm-based baselines: the Euclidean norm of all parameters, their distance from initialization, and
    log10 of the product of the weight matrices' spectral norms (NaN if a weight is not finite).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.fill_(float("nan"))
        >>> parameter_measures(net, {k: v.detach() for k, v in net.named_parameters()})["log_spectral_product"]
        nan
    """
    params = dict(model.named_parameters())
    weights = [p for name, p in params.items() if name.endswith("weight") and p.ndim == 2]
    with torch.no_grad():
        return {
            "param_norm": math.sqrt(sum(float(p.double().pow(2).sum()) for p in params.values())),
            "distance_from_init": math.sqrt(
                sum(float((p.double() - initial[name].double()).pow(2).sum()) for name, p in params.items())
            ),
            "log_spectral_product": sum(_log_spectral_norm(w) for w in weights),
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
    base, _ = loss_and_accuracy(model, x, y)
    increases = []
    for _ in range(draws):
        perturbed = {}
        for name, p in params.items():
            u = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            perturbed[name] = p.detach() + scale * p.detach().norm() * u / u.norm()
        # The model called with the perturbed tensors in place of its own: its parameters are never written.
        loss, _ = loss_and_accuracy(functools.partial(torch.func.functional_call, model, perturbed), x, y)
        increases.append(loss - base)
    return float(np.mean(increases))


def point_records(norms: Tensor, logits: Tensor, labels: Tensor) -> pd.DataFrame:
    """One row per held-out point: ``index``, ``label``, ``prediction``, ``loss`` and ``jacobian_norm`` (the
    package's ``PointRecords``), beside ``max_softmax`` and ``entropy`` (from the logits, in float64).

    Example:
        >>> rows = point_records(torch.tensor([0.5, 0.1]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]), torch.tensor([1, 1]))
        >>> rows.prediction.tolist(), rows.jacobian_norm.round(3).tolist()
        ([1, 0], [0.5, 0.1])
    """
    records = PointRecords()
    records.update(torch.arange(len(norms)), norms.detach(), logits.detach(), labels)
    rows = {name: column.double().numpy() for name, column in records.compute().items()}
    for name in ("index", "label", "prediction"):
        rows[name] = rows[name].astype(np.int64)
    log_p = logits.detach().double().log_softmax(1)
    rows["max_softmax"] = log_p.max(1).values.exp().numpy()
    rows["entropy"] = -(log_p.exp() * log_p).sum(1).numpy()
    return pd.DataFrame(rows)


def point_statistics(points: pd.DataFrame) -> dict[str, float]:
    """F4 for one model, from its per-point records: how the Jacobian norm, the max-softmax probability (as
    ``1 - max p``) and the predictive entropy track the per-point loss and the misclassified points, and what the
    Jacobian norm tells beyond the max-softmax probability."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    wrong = (points.label != points.prediction).to_numpy()
    finite = bool(np.isfinite(points[["loss", "jacobian_norm", "max_softmax", "entropy"]].to_numpy()).all())
    if not finite:  # an overflowing model: no statistic of its points is defined (ROC AUC raises on NaN)
        return dict.fromkeys(POINT_STATISTICS, math.nan)
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
    curves = [ellipse_through(*anchors[3 * i : 3 * i + 3], TRANSITION_POINTS) for i in range(len(anchors) // 3)]
    try:
        counts = count_transitions(model, curves, method="sampled")
    except NonFiniteOutputError:  # the model overflows along a curve: its count is not defined
        return dict.fromkeys(("transitions", "transitions_half", "transition_density"), math.nan)
    return {
        "transitions": float(np.mean([int(c) for c in counts])),
        "transitions_half": float(np.mean([c.transitions_half for c in counts])),
        "transition_density": float(np.mean([c.density for c in counts])),
    }


def num_units(model: nn.Module, x: Tensor) -> int:
    """The number of piecewise-linear units of ``model`` (ReLU, Hardtanh, ... elements; each max-pooling window
    counts one), as ``activation_codes`` finds them at the points ``x`` (the model's output there must be finite:
    the sweep counts them before training).

    Example:
        >>> num_units(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
        ...           torch.randn(1, 4))
        16
    """
    return int(activation_codes(model, x).pieces.shape[1])


def measure(model: nn.Module, initial: dict[str, Tensor], x_train: Tensor, y_train: Tensor, x_val: Tensor,
            y_val: Tensor, seed: int) -> tuple[dict[str, float], pd.DataFrame]:
    """The final measurements of one trained model, and its per-point records on the held-out set.

    Returns:
        The summary (gap, mean Jacobian norms, baselines, F4 statistics, transitions) and one row per held-out
        point: ``index``, ``label``, ``prediction``, ``loss``, ``jacobian_norm``, ``max_softmax``, ``entropy``.
    """
    train_loss, train_accuracy = loss_and_accuracy(model, x_train, y_train)
    # The held-out side from the Jacobian's own forward pass: its logits, in eval mode like every other measure.
    norms, val_logits = jacobian_norm(model, x_val, return_logits=True)
    val = ClassificationLossAccuracy()
    val.update(val_logits.detach(), y_val)
    val_loss, val_accuracy = _loss_accuracy(val)
    points = point_records(norms, val_logits, y_val)
    summary = {
        "train_loss": train_loss,
        "val_loss": val_loss,
        "gap_loss": val_loss - train_loss,
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
