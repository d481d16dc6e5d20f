"""torchmetrics Metrics over the functional measurements."""

from lightning_sensitivity.metrics.jacobian import JacobianNorm
from lightning_sensitivity.metrics.transitions import TransitionDensity

__all__ = ["JacobianNorm", "TransitionDensity"]
