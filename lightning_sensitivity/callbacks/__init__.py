"""Lightning callbacks that measure sensitivity and generalization while a model trains."""

from lightning_sensitivity.callbacks.generalization_gap_monitor import GeneralizationGapMonitor
from lightning_sensitivity.callbacks.jacobian_norm_monitor import JacobianNormMonitor
from lightning_sensitivity.callbacks.transition_monitor import TransitionMonitor

__all__ = ["GeneralizationGapMonitor", "JacobianNormMonitor", "TransitionMonitor"]
