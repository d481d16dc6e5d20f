"""Plain-PyTorch measurements of sensitivity (no Lightning import): Jacobian norms, activation codes,
trajectories through the data, and linear-region transitions along them; and the Jacobian penalty that trains
against the Jacobian norm."""

from lightning_sensitivity.functional.activations import (
    ActivationCodes,
    NonFiniteOutputError,
    activation_codes,
)
from lightning_sensitivity.functional.evaluation import class_logits, logits_from_probabilities, measuring
from lightning_sensitivity.functional.jacobian import jacobian_norm
from lightning_sensitivity.functional.penalty import jacobian_penalty
from lightning_sensitivity.functional.trajectories import (
    Trajectory,
    ellipse_through,
    gaussian_anchors,
    shuffled_anchors,
    trajectory_through,
)
from lightning_sensitivity.functional.transitions import TransitionCount, count_transitions

__all__ = [
    "ActivationCodes",
    "NonFiniteOutputError",
    "Trajectory",
    "TransitionCount",
    "activation_codes",
    "class_logits",
    "count_transitions",
    "ellipse_through",
    "gaussian_anchors",
    "jacobian_norm",
    "logits_from_probabilities",
    "jacobian_penalty",
    "measuring",
    "shuffled_anchors",
    "trajectory_through",
]
