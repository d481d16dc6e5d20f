r"""The input-output Jacobian norm of a classifier (Novak et al., ICLR 2018, section 2).

For logits :math:`z = f(x)` and probabilities :math:`p = \mathrm{softmax}(z)`, the sensitivity of the
classifier at a point :math:`x` is the Frobenius norm of the Jacobian of the probabilities with respect to
the (flattened) input:

.. math::

    s(x) = \lVert J(x) \rVert_F, \qquad J(x) = \frac{\partial p}{\partial x^\top} \in \mathbb{R}^{C \times D}.

This module is the one place where that quantity is computed. Everything else in the package (the
``JacobianNorm`` metric, the ``JacobianNormMonitor`` callback, the examples) calls :func:`jacobian_norm`.
It holds the measurement's math: the rows pulled back (the softmax factor's, the projection estimator's, a square
root of their Gram matrix at a last linear layer), their squared norms and their sum over a chunk of points. How
the forward pass is watched and the products are taken is in :mod:`~lightning_sensitivity.functional._pullback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_sensitivity.functional._pullback import _Forwards, _pullback, _rows_per_pass
from lightning_sensitivity.functional.evaluation import (
    _check_continuous,
    _per_pass_on_device,
    class_logits,
    measuring,
)

__all__ = ["jacobian_norm"]

#: Default bound on the number of Jacobian entries (points x rows x input entries) alive at once.
_DEFAULT_MAX_ENTRIES = 2**24
#: Rows a default chunk of points leaves room for in one backward pass.
_ROWS_PER_PASS = 64



def jacobian_norm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    output: Literal["softmax", "logits", "probabilities"] = "softmax",
    method: Literal["exact", "projection"] = "exact",
    num_projections: int | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Per-point Frobenius norm of the input-output Jacobian of a classifier.

    .. math::

        s(x_b) = \Big\lVert \frac{\partial\, \mathrm{softmax}(f(x_b))}{\partial x_b^\top} \Big\rVert_F
        \quad\text{or, with ``output="logits"``,}\quad
        \Big\lVert \frac{\partial f(x_b)}{\partial x_b^\top} \Big\rVert_F ,

    with the input of any shape flattened to :math:`D` entries. An ``nn.Module`` is evaluated in eval mode
    (dropout off, batch-norm running statistics), so each point's Jacobian does not depend on the other
    points of the batch; every submodule's previous mode is restored afterwards. The measurement works under
    ``torch.no_grad()`` and ``torch.inference_mode()`` (both are undone inside), runs in full precision even
    inside an ``autocast`` region, and touches no parameter ``.grad``, buffer or global random state.

    A model whose output has a single column (``[B, 1]``) is read as a binary classifier with probabilities
    :math:`(1 - \sigma(z), \sigma(z))`, the softmax of the logits :math:`(0, z)`.

    **Models that return probabilities.** With ``output="probabilities"`` the model's output is taken as the
    classes' probabilities :math:`p = f(x)` (a ``forward`` that ends in ``nn.Softmax``), and the norm is that of
    :math:`\partial p / \partial x^\top` itself, the same quantity as the default's for a model that returns logits;
    a single column is the probability of class 1, read as :math:`(1 - p, p)` (a norm :math:`\sqrt 2` times that of
    :math:`\partial p / \partial x^\top`). The default would take the softmax of the probabilities, a different and
    much smaller number. A model that returns log-probabilities (``log_softmax``) needs nothing: their softmax is
    the probabilities, so the default measures :math:`\partial p / \partial x^\top`.

    **Accuracy.** The softmax's own factor :math:`J_p = (\operatorname{diag}(p) - p p^\top) J_z` is formed in
    float64 from the logits, and only the logits are pulled back: at a confident point :math:`p_c = 1 - \epsilon`
    a backward pass through the softmax forms :math:`p_c (1 - p_c)` in the model's dtype and loses
    :math:`1 - p_c` (every float32 implementation does, ``vmap(jacrev)`` included: off by up to 33% on a trained
    digits MLP). Here :math:`1 - p_c` is the sum of the other probabilities, each row is pulled back at unit
    scale with its size applied in float64, and the row of the most probable class is minus the sum of the others.
    Every per-point value agrees with a float64 reference built the same way to 4e-5 relative or better on
    trained and confident MLPs and CNNs (logit margins 10 to 25, norms down to 1e-23); the projection rows are
    formed the same way.

    **Cost.** ``method="exact"`` takes one forward pass and :math:`C - 1` vector-Jacobian products for the
    softmax (its rows sum to zero), :math:`C` for the logits, batched over the points and grouped by rows into
    vectorized backward passes (``torch.func.vmap`` over ``autograd.grad``, whose batching rules fold the rows
    into each operator's batch). When the input's first use in the model is a linear layer :math:`h = W x + b`
    with fewer outputs than inputs (found by watching the forward pass, so it works for any ``forward``, not only
    ``nn.Sequential``), the products stop at :math:`h` and the norm is completed with the precomputed
    :math:`G = W W^\top`: :math:`\lVert A W \rVert_F^2 = \operatorname{tr}(A G A^\top)` with
    :math:`A = \partial p / \partial h`. When the logits come out of a last linear layer :math:`z = V u + b` with
    fewer features :math:`H` than rows (``resnet18`` at :math:`C = 1000`: :math:`H = 512`), :math:`H` rows
    :math:`L^\top` with :math:`L L^\top = V^\top A^\top A V` (float64) are pulled back from :math:`u` instead.
    On the CPU, a batch norm in eval mode (running statistics), the per-channel affine map
    :math:`s \odot h + t`, pulls its rows back as :math:`s \odot v` instead of through autograd's general
    batch-norm backward, and a 2-d convolution of the input itself into one channel or over non-overlapping patches
    as one matrix product with its kernel and a ``fold`` instead of a transposed convolution. Both keep the model's
    own forward pass, and neither is taken inside a region that activation checkpointing recomputes. Any other model
    takes the general path; all are exact. Where an operator's backward has no batching rule, the rows are pulled
    back one backward pass each, with a warning.
    A model that checkpoints part of its forward pass with ``torch.utils.checkpoint(..., use_reentrant=True)``, which
    ``torch.autograd.grad`` cannot differentiate, is measured by running its forward pass again on the points
    repeated once per row and one ``backward`` of that output, with the parameters not requiring grad meanwhile
    (no ``.grad`` is touched): the same values, at the cost of a forward pass per group of rows.
    No probe pass runs: the number of classes comes from the first chunk's forward pass. The measured times
    (``benchmarks/jacobian.py``: torchvision ``resnet18`` and MLPs against ``vmap(jacrev)`` and the per-class loop)
    are in ``docs/benchmarks.md``.

    ``method="projection"`` is the estimator of Hoffman, Roberts and Yaida (2019),
    :math:`\lVert J\rVert_F^2 = n\, \mathbb{E}\,\lVert v^\top J \rVert^2` for :math:`v` uniform on the unit
    sphere of :math:`\mathbb{R}^n`, at ``num_projections`` = :math:`K` vector-Jacobian products instead of
    :math:`C`. For the softmax, whose row :math:`c` is :math:`p_c (e_c - p)^\top J_z` and so is small for
    improbable classes, the rows of the :math:`\lfloor K/2 \rfloor` most probable classes are computed
    exactly and the estimator is applied to the other :math:`n = C - \lfloor K/2 \rfloor` rows only; for the
    logits, to all :math:`n = C` rows. The directions of each point are orthonormal (columns of a random
    rotation), which keeps the estimate of :math:`\lVert J\rVert_F^2` unbiased with less variance than
    independent draws, and makes it exact at :math:`K = C`. Its square root is biased low for :math:`s(x)`;
    ``benchmarks/jacobian.py`` prints how far the mean over a validation set lands from the exact mean.

    Args:
        model: an ``nn.Module`` or any callable mapping a batch ``[B, ...]`` to logits ``[B, C]``.
        x: the points, ``[B, ...]``, floating point. Labels are not needed.
        output: ``"softmax"`` (the paper's measure, for a model that returns logits or log-probabilities),
            ``"logits"`` (the Jacobian of the output itself), or ``"probabilities"`` (the model returns probabilities:
            the Jacobian of its output, a single column read as :math:`(1 - p, p)`).
        method: ``"exact"`` or ``"projection"``.
        num_projections: vector-Jacobian products per point for ``method="projection"``; default
            ``max(4, ceil(sqrt(C)))`` (32 at :math:`C = 1000`), at most :math:`C`.
        chunk_size: points measured together (one forward pass). The vector-Jacobian products of a chunk are
            taken in groups of rows, so that never more than ``max(2**24, chunk_size * D)`` Jacobian entries
            (points x rows x input entries, and at most ``chunk_size * C * D``) are alive at once; on the CPU also so
            that the gradient of the model's largest activation, for all the rows of a group, takes at most 16 MiB
            where one row allows it (larger blocks are page-faulted in again at every allocation). Default: as
            many points as leave room for 64 rows under :math:`2^{24}` entries.
        generator: the ``torch.Generator`` for the projection directions; the global random state is never
            used. Default: a new generator seeded with 0. A sequence of ``B`` generators gives each point its own
            (point ``b`` draws from ``generator[b]``), so that a point's directions do not depend on the points
            measured with it.
        return_logits: also return the model's output ``[B, C]`` from the measurement's own forward pass (in
            the spirit of ``has_aux``), so that a caller who also wants predictions or losses needs no second
            forward pass.

    Returns:
        The per-point norms, shape ``[B]``, in the input's floating dtype (at least ``float32``); with
        ``return_logits=True``, the pair ``(norms, logits)``.

    Raises:
        TypeError: if ``x`` is not floating point (token ids: measure at the embeddings instead).
        ValueError: if the model's output is not ``[B, C]``, or an argument is out of range.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_sensitivity.functional import jacobian_norm
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> norms = jacobian_norm(model, x)
        >>> norms.shape
        torch.Size([5])
        >>> reference = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None]).softmax(-1)[0]))(x)
        >>> torch.allclose(norms, reference.flatten(1).norm(dim=1), atol=1e-6)
        True
    """
    if output not in ("softmax", "logits", "probabilities"):
        raise ValueError(f"`output` must be 'softmax', 'logits' or 'probabilities', got {output!r}.")
    if method not in ("exact", "projection"):
        raise ValueError(f"`method` must be 'exact' or 'projection', got {method!r}.")
    if num_projections is not None and num_projections < 1:
        raise ValueError(f"`num_projections` must be a positive integer, got {num_projections}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    if isinstance(generator, Sequence) and len(generator) != x.shape[0]:
        raise ValueError(f"`generator` holds {len(generator)} generators for {x.shape[0]} points: give one per point.")
    norms, logits = _norms_and_logits(model, x, output, method, num_projections, chunk_size, generator)
    return (norms, logits) if return_logits else norms


def _norms_and_logits(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    output: str = "softmax",
    method: str = "exact",
    num_projections: int | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`jacobian_norm` with its arguments checked: the norms and the logits of the measurement's forward
    pass."""
    _check_continuous(x)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=out_dtype, device=x.device), torch.zeros(0, 0, device=x.device)

    with measuring(model, x.device, grad=True) as model:
        plan = _Plan(model, output, method, num_projections, generator, x)
        num_points = x.shape[0]
        # The number of classes is not needed to size the chunks (the products are grouped by rows as well),
        # so no probe pass runs before the first chunk.
        step = chunk_size or max(1, _DEFAULT_MAX_ENTRIES // (_ROWS_PER_PASS * max(1, x[0].numel())))
        chunks = [plan.chunk_norms(x[start : start + step]) for start in range(0, num_points, step)]
    norms = torch.cat([norm for norm, _ in chunks])
    return norms.to(out_dtype), torch.cat([logits for _, logits in chunks])


class _RowPlan:
    """Which rows are pulled back from the logits: the output, the method, and the projection directions. Its
    rows are differentiable functions of the logits, for :func:`~lightning_sensitivity.functional.jacobian_penalty`
    (the measurement forms them without gradients)."""

    def __init__(
        self,
        output: str,
        method: str,
        num_projections: int | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> None:
        self.softmax = output == "softmax"
        self.probabilities = output == "probabilities"
        self.projection = method == "projection"
        self.num_projections = num_projections
        self.generator = generator
        self._drawn = 0  # points given directions so far, with one generator per point

    def _projections(self, z: Tensor) -> Tensor:
        """The rows of the projection estimator, ``[K, B, C]`` in float64, on the classes' probabilities (softmax)
        or on the logits."""
        batch, c = z.shape
        k = min(self.num_projections or max(4, math.isqrt(c - 1) + 1), c)  # ceil(sqrt(C))
        # Softmax rows p_c (e_c - p)^T J_z are small for improbable classes: the rows of the most probable
        # classes are taken exactly and only the others are projected, which keeps the estimate unbiased and
        # cuts its variance where a confident classifier puts it. Logits have no such ordering.
        num_exact = min(k // 2, c - 1) if self.softmax and k < c else 0
        order = z.argsort(dim=1, descending=True).cpu()
        rest = c - num_exact
        if isinstance(self.generator, Sequence):  # one per point, the chunks' points in their order
            generators = self.generator[self._drawn : self._drawn + batch]
            self._drawn += batch
            gaussian = torch.stack(
                [torch.randn(rest, k - num_exact, generator=g, dtype=torch.float64) for g in generators]
            )
        else:
            gaussian = torch.randn(batch, rest, k - num_exact, generator=self._generator(), dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)  # Haar-distributed orthonormal columns in the other classes' space
        rows = torch.zeros(k, batch, c, dtype=torch.float64)
        index = torch.arange(batch)
        for j in range(num_exact):
            rows[j, index, order[:, j]] = 1.0
        rows[num_exact:].scatter_(
            2,
            order[None, :, num_exact:].expand(k - num_exact, -1, -1),
            q.permute(2, 0, 1) * math.sqrt(rest / (k - num_exact)),
        )
        return rows.to(z.device)

    def _generator(self) -> torch.Generator:
        assert not isinstance(self.generator, Sequence)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        return self.generator

    def rows(self, z: Tensor, dtype: torch.dtype) -> tuple[int, _Rows, bool]:
        """The rows to pull back, as cotangents on the logits ``z`` (float64) of a model computing in ``dtype``:
        their number, a function that forms rows ``[j0, j1)`` (see :data:`_Rows`), and whether the row left out
        (the exact softmax's most probable class, minus the sum of the others) must be added back."""
        batch = z.shape[0]
        if self.probabilities and z.shape[1] == 1:
            # One probability p is the two classes' (1 - p, p): their rows are -dp/dx and dp/dx, one row of scale
            # sqrt(2).
            ones = torch.ones(1, batch, 1, dtype=z.dtype, device=z.device)
            root_two = torch.full((1, batch), math.sqrt(2), dtype=torch.float64, device=z.device)
            return 1, lambda j0, j1: (ones[j0:j1], root_two[j0:j1]), False
        single = self.softmax and z.shape[1] == 1
        if single:  # a single logit z is the binary softmax of (0, z)
            z = class_logits(z)
        c = z.shape[1]

        def on_logits(v: Tensor) -> tuple[Tensor, Tensor]:
            directions, scale = _unit_rows(_softmax_factor(z, v))
            return (directions[..., 1:] if single else directions), scale

        if self.projection:
            directions = self._projections(z)
            if not self.softmax:  # orthonormal columns times sqrt(n / K): no scale to keep apart
                return directions.shape[0], lambda j0, j1: (directions[j0:j1], None), False
            return directions.shape[0], lambda j0, j1: on_logits(directions[j0:j1]), False
        if not self.softmax:
            eye = torch.eye(c, dtype=z.dtype, device=z.device)
            return c, lambda j0, j1: (eye[j0:j1, None, :].expand(j1 - j0, batch, c), None), False
        # The rows of the softmax Jacobian sum to zero (the probabilities sum to one): the most probable class's
        # row, the one whose entries are differences of nearly equal numbers, is minus the sum of the others.
        # Row c of the others is p_c (e_c - p): its direction e_c - p has the entry 1 - p_c >= 1/2 (p_c is not
        # the largest probability), formed without loss, and its size p_c is kept apart in float64.
        p = z.softmax(dim=1)
        top = z.argmax(dim=1)
        p_model = p.to(dtype)

        def other_classes(j0: int, j1: int) -> tuple[Tensor, Tensor]:
            classes = torch.arange(j0, j1, device=z.device)[:, None]
            classes = classes + (classes >= top).long()  # [k, B]: the k classes after skipping the top one
            directions = torch.zeros(j1 - j0, batch, c, dtype=dtype, device=z.device)
            directions.scatter_(2, classes[..., None], 1.0).sub_(p_model)
            return (directions[..., 1:] if single else directions), p.gather(1, classes.T).T

        return c - 1, other_classes, True


class _Plan(_RowPlan):
    """What one call measures: the rows of :class:`_RowPlan`, pulled back from each chunk's forward pass (whose
    shortcuts the first chunk decides)."""

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        output: str,
        method: str,
        num_projections: int | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        x: Tensor,
    ) -> None:
        super().__init__(output, method, num_projections, generator)
        self._forwards = _Forwards(model, x)

    def chunk_norms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The norms of a chunk of points, and their logits."""
        fwd = self._forwards(x)
        z = fwd.logits
        batch = z.shape[0]
        work = torch.device("cpu") if z.device.type == "mps" else z.device  # MPS has no float64
        with torch.no_grad():
            z64 = z.detach().to(device=work, dtype=torch.float64)
            num_rows, rows, add_left_out = self.rows(z64, z.dtype)
            target = z
            per_pass = max(1, _DEFAULT_MAX_ENTRIES // (batch * max(fwd.wrt[0].numel(), z.shape[1])))
            # The gradient of the largest activation for all the rows of a pass (see _per_pass_on_device).
            per_pass = _per_pass_on_device(per_pass, batch * fwd.largest * z.element_size(), z.device)
            per_pass = _rows_per_pass(fwd, per_pass)
            last = fwd.last
            if last is not None and last.weight.shape[1] < num_rows + add_left_out:
                # Fewer features than rows: pull back a square root of the rows' Gram matrix at the features.
                num_rows, rows = _through_last_linear(
                    last.weight.to(work), num_rows, rows, add_left_out, per_pass
                )
                target, add_left_out = last.input, False
            passes = math.ceil(num_rows / per_pass)
            per_pass = math.ceil(num_rows / passes)  # as many rows in each pass: 9 rows at 5 a pass are 5 and 4
            squared = torch.zeros(batch, dtype=torch.float64, device=work)
            # Per pass, the weighted sums of its rows and of their images under G, and their float64 scale.
            left_out: list[tuple[Tensor, Tensor, Tensor]] = []
            for j0 in range(0, num_rows, per_pass):
                # Each row is pulled back at about unit size and its scale applied in float64: rows of improbable
                # classes can be far below the model dtype's smallest normal number.
                directions, scale = rows(j0, min(j0 + per_pass, num_rows))
                unit = directions.to(device=z.device, dtype=z.dtype)
                with torch.enable_grad():
                    if fwd.batching.reentrant:
                        pulled = self._forwards.repeated_pullback(x, unit, target is not z)
                    else:
                        pulled = _pullback(target, fwd.wrt, unit, fwd.batching)
                pulled = pulled.flatten(2)
                # The squared norm of a row r at the input is r . (G r) when the rows stop at the first layer.
                metric = pulled if fwd.gram is None else pulled @ fwd.gram
                if add_left_out:
                    assert scale is not None
                    weights, size = _relative(scale.to(z.device), pulled.dtype)
                    summed = _weighted_sum(pulled, weights)
                    left_out.append((summed, summed if metric is pulled else _weighted_sum(metric, weights), size))
                if metric is pulled:
                    row_squares = torch.linalg.vector_norm(pulled, dim=-1).square()
                else:
                    row_squares = metric.mul_(pulled).sum(dim=-1)
                row_squares = row_squares.to(work, torch.float64)
                squared += (row_squares if scale is None else row_squares * scale.square()).sum(dim=0)
            if add_left_out:  # the row left out, minus the sum of all the others
                if len(left_out) == 1:
                    [(summed, summed_metric, size)] = left_out
                else:
                    weights, size = _relative(torch.stack([size for _, _, size in left_out]), pulled.dtype)
                    summed = _weighted_sum(torch.stack([part for part, _, _ in left_out]), weights)
                    summed_metric = _weighted_sum(torch.stack([part for _, part, _ in left_out]), weights)
                squared += torch.linalg.vecdot(summed, summed_metric).to(work, torch.float64) * size.to(work).square()
            norms = squared.clamp_min(0).sqrt()
            return norms.to(z.device, torch.promote_types(x.dtype, torch.float32)), z.detach()


#: The rows of one pass, from ``[j0, j1)``: directions ``[j1 - j0, B, C]`` on the logits, of entries up to about
#: one (in float64, or already in the model's dtype), and their sizes ``[j1 - j0, B]`` in float64 (``None``: all
#: one), the rows being ``size * direction``.
_Rows = Callable[[int, int], tuple[Tensor, "Tensor | None"]]


def _unit_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``[K, B, C]`` as directions of largest entry one and their sizes."""
    scale = rows.abs().amax(dim=-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return rows / scale[..., None], scale


def _relative(sizes: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sizes ``[K, B]`` in float64 as weights of largest one in ``dtype``, and that largest size ``[B]``, so that
    rows weighted by them do not underflow."""
    top = sizes.amax(dim=0)
    top = torch.where(top > 0, top, torch.ones_like(top))  # all zero: probabilities that underflowed in float64
    return (sizes / top).to(dtype), top


def _weighted_sum(rows: Tensor, weights: Tensor) -> Tensor:
    """``sum_k weights[k, b] * rows[k, b]`` for rows ``[K, B, F]`` and weights ``[K, B]``, without a ``[K, B, F]``
    temporary: a batched matrix product for many rows, a running sum for few (faster there on the CPU)."""
    if rows.shape[0] > 16:
        return torch.einsum("kb,kbf->bf", weights, rows)
    total = rows[0] * weights[0, :, None]
    for k in range(1, rows.shape[0]):
        total.addcmul_(rows[k], weights[k, :, None])
    return total


def _softmax_factor(z: Tensor, v: Tensor) -> Tensor:
    r"""``(diag(p) - p p^T) v`` for rows ``v`` ``[K, B, C]`` and ``p = softmax(z)``, in float64, accurately.

    Entry :math:`i` is :math:`p_i (v_i - p^\top v)`. With :math:`m` the most probable class,
    :math:`v_i - p^\top v = (v_i - v_m) + \sum_j p_j (v_m - v_j)`: the sum has no term in :math:`p_m`, so
    :math:`1 - p_m` is never formed by a subtraction (it is the sum of the other probabilities), and it
    survives when :math:`p_m` is within rounding of 1.
    """
    p = z.softmax(dim=-1)
    top = z.argmax(dim=-1)
    v_top = v.gather(-1, top[None, :, None].expand(v.shape[0], -1, 1))
    gap = v_top - v
    return p * ((p * gap).sum(dim=-1, keepdim=True) - gap)


def _through_last_linear(
    weight: Tensor,
    num_rows: int,
    rows: _Rows,
    add_left_out: bool,
    per_pass: int,
) -> tuple[int, _Rows]:
    r"""Rows at the input :math:`h` of a last linear layer :math:`z = W h + b` with fewer features :math:`H` than
    rows: for rows :math:`r_k` on the logits, :math:`\sum_k \lVert r_k^\top W J_h \rVert^2 =
    \operatorname{tr}(L L^\top J_h J_h^\top)` with :math:`L L^\top = \sum_k W^\top r_k r_k^\top W`
    (:math:`H \times H`, float64), so the :math:`H` columns of :math:`L` replace the rows."""
    w = weight.detach().to(torch.float64)
    gram: Tensor | None = None
    total: Tensor | None = None
    for j0 in range(0, num_rows, per_pass):
        directions, scale = rows(j0, min(j0 + per_pass, num_rows))
        directions = directions.to(torch.float64)
        g = (directions if scale is None else directions * scale[..., None]) @ w  # [k, B, H]
        part = torch.einsum("kbh,kbi->bhi", g, g)
        gram = part if gram is None else gram + part
        if add_left_out:
            total = g.sum(dim=0) if total is None else total + g.sum(dim=0)
    assert gram is not None
    if total is not None:
        gram = gram + total[:, :, None] * total[:, None, :]
    factor, info = torch.linalg.cholesky_ex(gram)
    failed = info != 0
    if failed.any():  # singular: a symmetric square root from the eigendecomposition
        values, vectors = torch.linalg.eigh(gram[failed])
        factor[failed] = vectors * values.clamp_min(0).sqrt()[:, None, :]
    columns = factor.permute(2, 0, 1)  # [H, B, H]: column i of each point's factor
    return columns.shape[0], lambda j0, j1: _unit_rows(columns[j0:j1])
