"""The pictures of the monitors, drawn with Pillow: the figure of TransitionMonitor, and a histogram for the loggers
that take none (MLflow, CSV files). A few milliseconds each, where a matplotlib figure of the same content takes 50 to
80 ms to lay out and render on a CPU core (most of it text), which showed in the monitors' overhead on short runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from lightning_sensitivity.functional import Trajectory, TransitionCount, count_transitions, jacobian_norm

_WIDTH, _HEIGHT = 640, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 64, 44, 46
_BLUE, _LIGHT_BLUE, _RED, _GREY = (31, 119, 180), (150, 190, 220), (214, 39, 40), (90, 90, 90)
#: Points along the figure's trajectory at which the Jacobian norm is drawn: a multiple of 3, so that the three
#: anchors of an ellipse are among them (the norm's dips there are drawn, not interpolated). 48 points draw the curve
#: as well as 96 did, at half the cost, which on a CIFAR-sized CNN was 0.8% of a 20-epoch run.
_FIGURE_JACOBIAN_POINTS = 48
#: Bars of the figure's transitions-per-segment histogram.
_FIGURE_BINS = 96


def _trajectory_figure(
    model: Callable[[Tensor], Tensor],
    curve: Trajectory,
    count: TransitionCount,
    chunk_size: int,
    title: str,
    on_no_jacobian: Callable[[Exception], None],
    output: str = "softmax",
) -> np.ndarray:
    """Transitions per segment and the Jacobian norm along ``curve`` (of ``output``, as ``jacobian_norm`` takes it),
    with its anchors marked, as an RGB image (:func:`_trajectory_chart`). A model whose output is not a classifier's
    gets no Jacobian curve, and ``on_no_jacobian`` is told why."""
    segments = count.segments
    if segments is None:  # an exact count: draw the sampled per-segment counts
        segments = count_transitions(model, curve, chunk_size=chunk_size, return_segments=True).segments
    segments = segments.cpu()
    bins = min(_FIGURE_BINS, len(segments))
    per_bin = torch.zeros(bins).index_add_(0, torch.arange(len(segments)) * bins // len(segments), segments.float())
    points = curve.at(torch.arange(_FIGURE_JACOBIAN_POINTS) * (2 * math.pi / _FIGURE_JACOBIAN_POINTS))
    try:
        log_norms = jacobian_norm(model, points, output=output).cpu().clamp_min(1e-12).log10().tolist()
    except (ValueError, TypeError) as error:
        on_no_jacobian(error)
        log_norms = None
    anchors = (curve.anchor_times / (2 * math.pi)).tolist()
    return _trajectory_chart(per_bin.tolist(), log_norms, anchors, f"{title} ({bins} bins)")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _trajectory_chart(
    per_bin: Sequence[float], log_norms: Sequence[float] | None, anchors: Sequence[float], title: str
) -> np.ndarray:
    """An RGB image ``[H, W, 3]`` ``uint8``: transitions per bin of the curve as bars (left axis, blue), the log10
    Jacobian norm as a line (right axis, red), and the anchors as dashed vertical lines.

    ``per_bin`` covers the curve from ``t = 0`` to ``2 pi`` in equal bins; ``log_norms`` are at equally spaced
    ``t`` from 0; ``anchors`` are positions in ``[0, 1)`` (``t / 2 pi``).
    """
    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(12), _font(11)
    x0, y0, x1, y1 = _LEFT, _TOP, _WIDTH - _RIGHT, _HEIGHT - _BOTTOM

    def x_at(position: float) -> float:
        return x0 + position * (x1 - x0)

    top = max(max(per_bin, default=0.0), 1.0)
    for i, value in enumerate(per_bin):
        if value > 0:
            height = value / top * (y1 - y0)
            draw.rectangle(
                (x_at(i / len(per_bin)), y1 - height, x_at((i + 1) / len(per_bin)), y1), fill=_LIGHT_BLUE
            )
    for value in (0.0, top / 2, top):
        y = y1 - value / top * (y1 - y0)
        draw.line((x0 - 4, y, x0, y), fill=_BLUE)
        draw.text((x0 - 6, y), f"{value:g}", fill=_BLUE, font=small, anchor="rm")
    if log_norms is not None and len(log_norms) > 1:
        low, high = min(log_norms), max(log_norms)
        span = high - low or 1.0
        low, high = low - 0.05 * span, high + 0.05 * span
        points = [
            (x_at(i / len(log_norms)), y1 - (value - low) / (high - low) * (y1 - y0))
            for i, value in enumerate(log_norms)
        ]
        draw.line(points, fill=_RED, width=2)
        for value in (low, (low + high) / 2, high):
            y = y1 - (value - low) / (high - low) * (y1 - y0)
            draw.line((x1, y, x1 + 4, y), fill=_RED)
            draw.text((x1 + 6, y), f"{value:.2f}", fill=_RED, font=small, anchor="lm")
    for i, position in enumerate(anchors):
        x = x_at(position)
        for y in range(y0, y1, 8):  # dashed
            draw.line((x, y, x, min(y + 4, y1)), fill="black")
        draw.text((x, y1 + 4), f"anchor {i}", fill="black", font=small, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=_GREY)
    draw.text((x0, 6), title, fill="black", font=font)
    legend_y = 24
    draw.text((x0, legend_y), "bars: transitions per bin", fill=_BLUE, font=small)
    if log_norms is not None:
        draw.text((x1, legend_y), "line: log10 Jacobian norm", fill=_RED, font=small, anchor="ra")
    draw.text(
        ((x0 + x1) / 2, _HEIGHT - 6),
        "position along the trajectory, t / 2 pi",
        fill="black",
        font=small,
        anchor="mb",
    )
    return np.asarray(image)


#: Bars of a histogram picture.
_HISTOGRAM_BINS = 30


def _histogram_chart(values: Tensor, title: str) -> np.ndarray:
    """A histogram of ``values`` (a float CPU tensor) as an RGB image ``[H, W, 3]`` ``uint8``: bars of the number of
    values per bin, on a log10 axis when the values are positive and span more than a factor of 10 (Jacobian norms
    span decades), else on a linear one. Non-finite values are left out (their number is in the title)."""
    finite = values[torch.isfinite(values)].double()
    left_out = values.numel() - finite.numel()
    log = finite.numel() > 0 and bool((finite > 0).all()) and float(finite.max() / finite.min()) > 10
    axis = finite.log10() if log else finite
    low, high = (float(axis.min()), float(axis.max())) if axis.numel() else (0.0, 1.0)
    if high == low:
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(axis, bins=_HISTOGRAM_BINS, min=low, max=high).tolist() if axis.numel() else []

    image = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(12), _font(11)
    x0, y0, x1, y1 = _LEFT, _TOP, _WIDTH - _RIGHT, _HEIGHT - _BOTTOM
    top = max(max(counts, default=0.0), 1.0)
    for i, count in enumerate(counts):
        if count > 0:
            height = count / top * (y1 - y0)
            left, right = x0 + i / len(counts) * (x1 - x0), x0 + (i + 1) / len(counts) * (x1 - x0)
            draw.rectangle((left, y1 - height, right - 1, y1), fill=_BLUE)
    for count in (0.0, top / 2, top):
        y = y1 - count / top * (y1 - y0)
        draw.line((x0 - 4, y, x0, y), fill=_GREY)
        draw.text((x0 - 6, y), f"{count:g}", fill=_GREY, font=small, anchor="rm")
    for position in (0.0, 0.5, 1.0):
        value = low + position * (high - low)
        x = x0 + position * (x1 - x0)
        draw.line((x, y1, x, y1 + 4), fill=_GREY)
        draw.text((x, y1 + 6), f"{10 ** value:.3g}" if log else f"{value:.3g}", fill="black", font=small, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline=_GREY)
    suffix = f"; {left_out} non-finite left out" if left_out else ""
    draw.text((x0, 6), f"{title}: {finite.numel()} values{suffix}", fill="black", font=font)
    draw.text((x0, 24), "bars: values per bin", fill=_BLUE, font=small)
    draw.text(
        ((x0 + x1) / 2, _HEIGHT - 6),
        "value (log axis)" if log else "value",
        fill="black",
        font=small,
        anchor="mb",
    )
    return np.asarray(image)
