"""Plain-PyTorch measurements of sensitivity (no Lightning import): Jacobian norms, activation codes,
trajectories through the data, and linear-region transitions along them."""

from lightning_sensitivity.functional.jacobian import jacobian_norm

__all__ = ["jacobian_norm"]
