"""Sensitivity and generalization measurements (Novak et al., ICLR 2018) for PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_sensitivity.callbacks import GeneralizationGapMonitor, JacobianNormMonitor, TransitionMonitor

__all__ = ["GeneralizationGapMonitor", "JacobianNormMonitor", "TransitionMonitor", "__version__"]
