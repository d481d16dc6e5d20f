"""torchmetrics Metrics over the functional measurements."""

from lightning_sensitivity.metrics.classification import ClassificationLossAccuracy, LossFn
from lightning_sensitivity.metrics.jacobian import JacobianNorm
from lightning_sensitivity.metrics.records import PointRecords
from lightning_sensitivity.metrics.transitions import TransitionDensity

__all__ = ["ClassificationLossAccuracy", "JacobianNorm", "LossFn", "PointRecords", "TransitionDensity"]
