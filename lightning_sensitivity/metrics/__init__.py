"""torchmetrics Metrics over the functional measurements."""

from lightning_sensitivity.metrics.jacobian import JacobianNorm

__all__ = ["JacobianNorm"]
