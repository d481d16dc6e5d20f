"""What several tests of the reproduction build: table rows of a sweep's models."""

from __future__ import annotations

import dataclasses

import pandas as pd

from examples.paper.grid import ModelConfig


def table_rows(configs: list[ModelConfig]) -> pd.DataFrame:
    """The hyper-parameter columns of the results table for ``configs`` (digits: 1,258 training points)."""
    return pd.DataFrame([
        {**dataclasses.asdict(c), "model_id": c.model_id, "dataset": "digits", "full_batch": c.batch_size is None,
         "batch_size": c.batch_size or 1258}
        for c in configs
    ])
