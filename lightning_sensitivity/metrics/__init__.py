"""torchmetrics Metrics over the functional measurements."""
