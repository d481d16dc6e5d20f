"""The TransitionMonitor picture: bars where there are transitions, the Jacobian line, the anchors."""

import numpy as np

from lightning_sensitivity.callbacks._chart import (
    _BLUE,
    _LEFT,
    _LIGHT_BLUE,
    _RED,
    _RIGHT,
    _WIDTH,
    _trajectory_chart,
)


def column(image, position):
    """The pixel column at ``position`` in [0, 1) of the plot's width."""
    return image[:, int(_LEFT + position * (_WIDTH - _RIGHT - _LEFT))]


def has(pixels, colour):
    return bool((pixels == np.array(colour, dtype=np.uint8)).all(-1).any())


def test_bars_line_and_anchors_are_where_the_data_says():
    per_bin = [0.0] * 10
    per_bin[3] = 4.0  # one bin with transitions: [0.3, 0.4)
    image = _trajectory_chart(per_bin, [0.0, 1.0, 2.0, 3.0], [0.0, 0.55], "title")
    assert image.shape == (280, 640, 3) and image.dtype == np.uint8
    assert has(column(image, 0.35), _LIGHT_BLUE)  # the bar
    assert not has(column(image, 0.15), _LIGHT_BLUE) and not has(column(image, 0.65), _LIGHT_BLUE)
    assert has(image, _RED)  # the Jacobian line and its axis
    anchor = column(image, 0.55)
    assert (anchor == 0).all(-1).sum() > 50  # a dashed black line from top to bottom of the plot


def test_no_jacobian_and_no_transitions_still_draws():
    image = _trajectory_chart([0.0] * 96, None, [0.0, 1 / 3, 2 / 3], "nothing crossed")
    assert not has(image, _RED) and not has(image, _LIGHT_BLUE) and has(image, _BLUE)  # the left axis labels
