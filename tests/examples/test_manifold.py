"""F2's measurement along the ellipses: where each point lies relative to the anchors."""

from __future__ import annotations

import numpy as np

from examples.paper.manifold import distance_to_anchor


def test_distance_to_the_nearest_anchor() -> None:
    t = np.array([0, np.pi / 6, np.pi / 3, np.pi / 2, 2 * np.pi / 3, np.pi, 5 * np.pi / 3, 2 * np.pi - 0.01])
    np.testing.assert_allclose(distance_to_anchor(t), [0, 0.5, 1, 0.5, 0, 1, 1, 0.01 / (np.pi / 3)], atol=1e-12)
