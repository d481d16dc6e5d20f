"""What several tests of the reproduction build: table rows of a sweep's models, and F2 profiles constructed so
that their region means are known by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd

from examples.paper.grid import ModelConfig
from examples.paper.manifold import distance_to_anchor


def table_rows(configs: list[ModelConfig]) -> pd.DataFrame:
    """The hyper-parameter columns of the results table for ``configs`` (digits: 1,258 training points)."""
    return pd.DataFrame([
        {**dataclasses.asdict(c), "model_id": c.model_id, "dataset": "digits", "full_batch": c.batch_size is None,
         "batch_size": c.batch_size or 1258}
        for c in configs
    ])


def profile(model: str, kind: str, num_points: int, jacobian: Callable[[np.ndarray], np.ndarray],
            transitions: Callable[[np.ndarray], np.ndarray]) -> pd.DataFrame:
    """One ellipse's profile with the Jacobian norm ``jacobian(u)`` at each point and ``transitions(u)`` on each
    segment."""
    t = np.arange(num_points) * 2 * np.pi / num_points
    u, u_segment = distance_to_anchor(t), distance_to_anchor(t + np.pi / num_points)
    return pd.DataFrame({"model": model, "kind": kind, "ellipse": 0, "t": t, "u": u, "u_segment": u_segment,
                         "jacobian_norm": jacobian(u), "segment_transitions": transitions(u_segment)})


#: Points per constructed ellipse: u = j / 105 at point i of each third, j = min(i, 210 - i), so that no point
#: lies on a region's boundary.
NUM_POINTS = 630


def constructed_profiles() -> pd.DataFrame:
    """Trained: the one-class Jacobian norm rises away from the anchors (``1 + u``) and its transitions are 1
    between them only; the any-classes Jacobian norm falls (``3 - u``) and its transitions are flat; off the
    manifold, 5 and 2 everywhere. Untrained: flat everywhere."""
    k = NUM_POINTS
    return pd.concat([
        profile("trained", "one class", k, lambda u: 1 + u, lambda u: (u >= 0.5).astype(int)),
        profile("trained", "any classes", k, lambda u: 3 - u, lambda u: np.ones_like(u, dtype=int)),
        profile("trained", "off manifold", k, lambda u: np.full_like(u, 5.0), lambda u: 2 * np.ones_like(u, dtype=int)),
        profile("untrained", "one class", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
        profile("untrained", "any classes", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
        profile("untrained", "off manifold", k, lambda u: np.full_like(u, 2.0), lambda u: np.ones_like(u, dtype=int)),
    ], ignore_index=True)
