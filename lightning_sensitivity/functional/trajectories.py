r"""Closed trajectories through anchor points (Novak et al., ICLR 2018), and anchors off the data manifold.

A trajectory through :math:`n \ge 3` anchors :math:`x_0, \dots, x_{n-1}` is the trigonometric interpolation

.. math::

    z(t) = a + \sum_{j=1}^{m} \big(b_j \cos jt + c_j \sin jt\big), \qquad z\big(2\pi i / n\big) = x_i ,

a closed smooth curve of order :math:`m = \lfloor n / 2 \rfloor`. Its coefficients are the discrete Fourier
transform of the anchors: with :math:`X_j = \sum_i x_i e^{-2\pi \mathrm{i}\, ij/n}`, :math:`a = X_0 / n`,
:math:`b_j = 2 \operatorname{Re} X_j / n` and :math:`c_j = -2 \operatorname{Im} X_j / n` (for even :math:`n` the
last term is :math:`\operatorname{Re} X_{n/2} / n \cdot \cos(mt)` alone). Three anchors give the ellipse
:math:`z(t) = a + b \cos t + c \sin t` through them, the paper's trajectory.

The curve is discretized at :math:`k` points :math:`t_i = 2\pi i / k`, :math:`i < k`; the last point joins the
first. Its arc length is measured on that discretization, :math:`\sum_i \lVert z_{(i+1) \bmod k} - z_i \rVert_2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Trajectory", "ellipse_through", "gaussian_anchors", "shuffled_anchors", "trajectory_through"]


@dataclass(frozen=True, eq=False)
class Trajectory:
    r"""A closed curve :math:`z(t) = a + \sum_j b_j \cos jt + c_j \sin jt`, discretized at ``num_points`` points.

    The coefficients are kept in ``float64``; points are returned in the anchors' dtype and device.

    Attributes:
        constant: :math:`a`, ``[*shape]``.
        cosines: :math:`b_1 .. b_m`, ``[m, *shape]``.
        sines: :math:`c_1 .. c_m`, ``[m, *shape]``.
        num_points: :math:`k`, the points of the discretization.
        num_anchors: :math:`n`, the anchors the curve passes through at :math:`t = 2\pi i / n`.
        dtype: the dtype of the anchors, and of the points.
    """

    constant: Tensor
    cosines: Tensor
    sines: Tensor
    num_points: int
    num_anchors: int
    dtype: torch.dtype
    #: Arc lengths already computed, by number of points (the coefficients do not change).
    _arc_lengths: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    @property
    def order(self) -> int:
        """:math:`m`, the highest frequency; 1 for an ellipse."""
        return self.cosines.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The shape of one point."""
        return self.constant.shape

    @property
    def anchor_times(self) -> Tensor:
        r""":math:`2\pi i / n`, where the curve passes through its anchors."""
        return torch.arange(self.num_anchors, dtype=torch.float64) * (2 * math.pi / self.num_anchors)

    @property
    def times(self) -> Tensor:
        r""":math:`t_i = 2\pi i / k` for :math:`i < k`."""
        return _times(self.num_points)

    @property
    def points(self) -> Tensor:
        """The discretization, ``[num_points, *shape]``: ``points[i] = z(2 pi i / num_points)``."""
        return self.at(self.times)

    def at(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The points :math:`z(t)` for a 1-D tensor of parameters ``t``, ``[len(t), *shape]``."""
        return _points_along([self], t, dtype)

    def arc_length(self, num_points: int | None = None, chunk_size: int = 65_536) -> float:
        r"""Euclidean length of the closed polygon through ``num_points`` (default: the trajectory's) points.

        Computed from the coefficients, without the points. With :math:`h = 2\pi / k` and the midpoints
        :math:`s_i = t_i + h / 2`, a segment is

        .. math::

            z(t_i + h) - z(t_i) = \sum_j 2 \sin\tfrac{jh}{2}\,\big(c_j \cos j s_i - b_j \sin j s_i\big),

        so its squared norm is :math:`w_i^\top G\, w_i`, with :math:`w_i` the :math:`2m` weights of
        :math:`b_j, c_j` and :math:`G` their Gram matrix: :math:`O(m^2)` per segment instead of :math:`O(d)`,
        in ``float64``, and no difference of nearby points is ever taken. Streamed in chunks of ``chunk_size``
        segments, so memory stays bounded for any ``num_points``. The result is remembered for each ``num_points``.
        """
        k = num_points or self.num_points
        if k in self._arc_lengths:
            return self._arc_lengths[k]
        coefficients = torch.cat([self.cosines.flatten(1), self.sines.flatten(1)]).to(
            torch.float64
        )  # [2m, d]
        gram = coefficients @ coefficients.T
        step = 2 * math.pi / k
        freq = torch.arange(1, self.order + 1, dtype=torch.float64, device=gram.device)
        scale = 2 * torch.sin(freq * (step / 2))
        total = torch.zeros((), dtype=torch.float64, device=gram.device)
        for start in range(0, k, chunk_size):
            middle = (
                torch.arange(start, min(start + chunk_size, k), dtype=torch.float64, device=gram.device) + 0.5
            )
            angles = (middle * step)[:, None] * freq
            weights = torch.cat([-angles.sin() * scale, angles.cos() * scale], dim=1)  # [n, 2m]
            total += ((weights @ gram) * weights).sum(1).clamp_min(0).sqrt().sum()
        self._arc_lengths[k] = float(total)
        return self._arc_lengths[k]


def trajectory_through(anchors: Tensor, num_points: int) -> Trajectory:
    r"""The closed trigonometric interpolation through ``anchors`` (:math:`n \ge 3`), see the module docstring.

    Args:
        anchors: ``[n, *shape]``, floating point; ``anchors[i]`` is reached at :math:`t = 2\pi i / n`.
        num_points: points of the discretization; a multiple of ``n`` puts the anchors on it.

    Returns:
        The :class:`Trajectory`.

    Raises:
        ValueError: if there are fewer than 3 anchors, or ``num_points < 3``.
        TypeError: if the anchors are not floating point.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import trajectory_through
        >>> anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        >>> curve = trajectory_through(anchors, num_points=8)
        >>> curve.order
        2
        >>> torch.allclose(curve.points[::2], anchors, atol=1e-6)
        True
    """
    if anchors.ndim < 2 or anchors.shape[0] < 3:
        raise ValueError(
            f"A closed trajectory needs at least 3 anchors, stacked as [n, *shape]; got shape {tuple(anchors.shape)}."
        )
    if not anchors.is_floating_point():
        raise TypeError(f"The anchors must be floating point, got {anchors.dtype}.")
    if num_points < 3:
        raise ValueError(f"`num_points` must be at least 3, got {num_points}.")
    n = anchors.shape[0]
    spectrum = torch.fft.fft(anchors.detach().to(torch.float64).flatten(1), dim=0)
    order = n // 2
    weights = torch.full((order,), 2.0 / n, dtype=torch.float64, device=anchors.device)
    if n % 2 == 0:
        weights[-1] = 1.0 / n  # the Nyquist term: its sine vanishes at every anchor
    cosines = spectrum[1 : order + 1].real * weights[:, None]
    sines = -spectrum[1 : order + 1].imag * weights[:, None]
    if n % 2 == 0:
        sines[-1] = 0.0
    shape = anchors.shape[1:]
    return Trajectory(
        (spectrum[0].real / n).reshape(shape),
        cosines.reshape(order, *shape),
        sines.reshape(order, *shape),
        num_points,
        n,
        anchors.dtype,
    )


def ellipse_through(a: Tensor, b: Tensor, c: Tensor, num_points: int) -> Trajectory:
    r"""The ellipse :math:`z(t) = \mu + \beta \cos t + \gamma \sin t` with :math:`z(0) = a`,
    :math:`z(2\pi/3) = b`, :math:`z(4\pi/3) = c`: the paper's trajectory through three points.

    Solving the three conditions gives :math:`\mu = (a + b + c)/3`, :math:`\beta = a - \mu` and
    :math:`\gamma = (b - c)/\sqrt{3}`.

    Args:
        a: the first anchor, any shape.
        b: the second anchor, same shape.
        c: the third anchor, same shape.
        num_points: points of the discretization; a multiple of 3 puts the anchors on it.

    Returns:
        The :class:`Trajectory` (order 1).

    Raises:
        ValueError: if the anchors' shapes differ, or ``num_points < 3``.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import ellipse_through
        >>> a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 0.75**0.5]), torch.tensor([-0.5, -0.75**0.5])
        >>> circle = ellipse_through(a, b, c, num_points=6)
        >>> circle.points.shape
        torch.Size([6, 2])
        >>> round(circle.arc_length(num_points=100_000), 4)  # 2 pi
        6.2832
    """
    if not a.shape == b.shape == c.shape:
        raise ValueError(
            f"The three anchors must have the same shape, got {tuple(a.shape)}, {tuple(b.shape)} and {tuple(c.shape)}."
        )
    return trajectory_through(torch.stack([a, b, c]), num_points)


def gaussian_anchors(mean: Tensor, std: Tensor, num_anchors: int, *, generator: torch.Generator) -> Tensor:
    r"""Off-manifold anchors :math:`\mu + \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal{N}(0, I)`:
    points that match the data's per-feature mean and standard deviation, but not its structure.

    Args:
        mean: the per-feature mean of the data, ``[*shape]``.
        std: the per-feature standard deviation, ``[*shape]``.
        num_anchors: how many points.
        generator: the ``torch.Generator`` to draw from (the global random state is never used); the draws are
            made on the generator's device and moved to ``mean``'s.

    Returns:
        ``[num_anchors, *shape]`` in ``mean``'s dtype and device.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import gaussian_anchors
        >>> points = gaussian_anchors(torch.zeros(3), torch.ones(3), 4, generator=torch.Generator().manual_seed(0))
        >>> points.shape
        torch.Size([4, 3])
    """
    noise = torch.randn((num_anchors, *mean.shape), generator=generator, device=generator.device)
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


def shuffled_anchors(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """Off-manifold anchors: each point of ``x`` with its features (all entries) randomly permuted.

    The marginal distribution of the entries of each point is kept; their arrangement is destroyed.

    Args:
        x: data points ``[N, *shape]``.
        generator: the ``torch.Generator`` for the permutations (one per point).

    Returns:
        ``[N, *shape]``, like ``x``.

    Example:
        >>> import torch
        >>> from lightning_sensitivity.functional import shuffled_anchors
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> shuffled = shuffled_anchors(x, generator=torch.Generator().manual_seed(0))
        >>> shuffled.sort(dim=1).values.equal(x)
        True
    """
    flat = x.flatten(1)
    order = torch.rand(flat.shape, generator=generator, device=generator.device).argsort(dim=1)
    return flat.gather(1, order.to(x.device)).reshape(x.shape)


def _points_along(curves: Sequence[Trajectory], t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The points :math:`z(t)` of each of several curves of one order and shape, curve after curve,
    ``[len(curves) * len(t), *shape]``, in ``dtype`` (default: the first curve's): one batched evaluation instead
    of one per curve."""
    first = curves[0]
    t = t.to(device=first.constant.device, dtype=torch.float64)
    angles = t[:, None] * torch.arange(1, first.order + 1, device=t.device, dtype=torch.float64)  # [k, m]

    def stacked(tensors: list[Tensor]) -> Tensor:  # [C, ...]; a view for one curve
        return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)

    constants = stacked([curve.constant.reshape(1, -1) for curve in curves])  # [C, 1, d]
    cosines = stacked([curve.cosines.flatten(1) for curve in curves])  # [C, m, d]
    sines = stacked([curve.sines.flatten(1) for curve in curves])
    flat = constants + angles.cos() @ cosines + angles.sin() @ sines  # [C, k, d]
    return flat.reshape(len(curves) * len(t), *first.shape).to(dtype or first.dtype)


def _times(k: int) -> Tensor:
    return torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
