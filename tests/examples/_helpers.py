"""What several tests of the reproduction build: table rows of a sweep's models, and F2 profiles constructed so
that their region means are known by hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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
            transitions: Callable[[np.ndarray], np.ndarray],
            length: Callable[[np.ndarray], np.ndarray] | None = None, ellipse: int = 0) -> pd.DataFrame:
    """One ellipse's profile with the Jacobian norm ``jacobian(u)`` at each point, ``transitions(u)`` on each
    segment and the segment's length ``length(u)`` (default 1)."""
    t = np.arange(num_points) * 2 * np.pi / num_points
    u, u_segment = distance_to_anchor(t), distance_to_anchor(t + np.pi / num_points)
    lengths = np.ones_like(u_segment) if length is None else length(u_segment)
    return pd.DataFrame({"model": model, "kind": kind, "ellipse": ellipse, "t": t, "u": u, "u_segment": u_segment,
                         "jacobian_norm": jacobian(u), "segment_transitions": transitions(u_segment),
                         "segment_length": lengths})


#: Points per constructed ellipse: u = j / 105 at point i of each third, j = min(i, 210 - i), so that no point
#: lies on a region's boundary.
NUM_POINTS = 630


def constant(value: float) -> Callable[[np.ndarray], np.ndarray]:
    """``u -> value`` everywhere."""
    return lambda u: np.full_like(u, value, dtype=float)


def constructed_profiles() -> pd.DataFrame:
    """Trained (and the same at its first fit): along the different-class ellipse the Jacobian norm rises away
    from the anchors (``1 + u``) and the transitions are 1 per segment everywhere, but the segments near the
    anchors are twice as long (so the density per unit length is 0.5 there and 1 between: a dip per unit length
    that per-segment counts do not show); the same-class ellipse: Jacobian norm 0.5 and 1 transition per segment
    of length 2 (density 0.5); the random ellipse: 5 and 2 per segment of length 1 (density 2). Untrained: flat
    everywhere (1 per segment of length 1)."""
    k = NUM_POINTS
    near_long = lambda u: np.where(u < 0.5, 2.0, 1.0)  # noqa: E731
    trained = [
        ("different classes", lambda u: 1 + u, constant(1), near_long),
        ("same class", constant(0.5), constant(1), constant(2)),
        ("random ellipse", constant(5), constant(2), constant(1)),
    ]
    frames = [profile(model, kind, k, jac, trans, length)
              for model in ("trained", "first fit") for kind, jac, trans, length in trained]
    frames += [profile("untrained", kind, k, constant(2), constant(1), constant(1))
               for kind in ("different classes", "same class", "random ellipse")]
    return pd.concat(frames, ignore_index=True)


def dying_worker(config: ModelConfig, spec: Any, runs_dir: str, points_dir: str) -> dict[str, Any]:
    """A sweep's worker whose process dies (as under the kernel's OOM killer) on a model of width 13, and that
    trains every other model as ``train_and_measure`` does. At the top level of a module, so that the sweep's
    worker processes can import it."""
    import os

    from examples.paper.runner import train_and_measure

    if config.width == 13:
        os._exit(1)
    return train_and_measure(config, spec, runs_dir, points_dir)
