r"""A training penalty on the input-output Jacobian: the squared Frobenius norm that
:func:`~lightning_sensitivity.functional.jacobian_norm` measures, as a differentiable loss term.

.. math::

    R = \frac{1}{B} \sum_{b=1}^{B} \lVert J(x_b) \rVert_F^2 , \qquad
    J(x) = \frac{\partial\, \mathrm{softmax}(f(x))}{\partial x^\top} \ \text{or} \ \frac{\partial f(x)}{\partial x^\top},

added to a loss as ``loss + strength * jacobian_penalty(model, x)``. Its rows are those of the measurement (the
accurate softmax factor, the projection directions: :class:`~lightning_sensitivity.functional.jacobian._RowPlan`),
pulled back by the same vectorized backward pass, with ``create_graph=True`` so that the user's
``loss.backward()`` differentiates them with respect to the parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from lightning_sensitivity.functional._pullback import _Forward, _Forwards, _pullback
from lightning_sensitivity.functional.evaluation import _check_continuous, measuring
from lightning_sensitivity.functional.jacobian import _relative, _RowPlan, _weighted_sum

__all__ = ["jacobian_penalty"]

#: The directions of calls that pass no generator: the penalty's own stream, seeded with 0 when first used, which
#: goes on from call to call (each training step draws new directions; the global stream is never read).
_DEFAULT_GENERATOR: torch.Generator | None = None


@overload
def jacobian_penalty(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    output: Literal["softmax", "logits"] = ...,
    method: Literal["projection", "exact"] = ...,
    num_projections: int = ...,
    generator: torch.Generator | None = ...,
    return_logits: Literal[False] = ...,
) -> Tensor: ...


@overload
def jacobian_penalty(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    output: Literal["softmax", "logits"] = ...,
    method: Literal["projection", "exact"] = ...,
    num_projections: int = ...,
    generator: torch.Generator | None = ...,
    return_logits: Literal[True],
) -> tuple[Tensor, Tensor]: ...


def jacobian_penalty(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    output: Literal["softmax", "logits"] = "softmax",
    method: Literal["projection", "exact"] = "projection",
    num_projections: int = 1,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The mean squared Frobenius norm of the input-output Jacobian over a batch, as a differentiable loss term.

    .. math::

        R = \frac{1}{B} \sum_{b=1}^{B} \lVert J_b \rVert_F^2 , \qquad
        J_b = \frac{\partial\, \mathrm{softmax}(f(x_b))}{\partial x_b^\top}
        \quad\text{or, with ``output="logits"``,}\quad \frac{\partial f(x_b)}{\partial x_b^\top} ,

    the square of what :func:`~lightning_sensitivity.functional.jacobian_norm` measures, averaged over the points.
    Add it to the loss; the gradient with respect to the parameters comes from the same ``loss.backward()``, which
    is the only thing that touches their ``.grad`` (the penalty itself differentiates with respect to the input
    only). In a ``LightningModule``, one line in ``training_step``:

    .. code-block:: python

        loss = F.cross_entropy(self(x), y) + 0.01 * jacobian_penalty(self, x)

    **What runs.** The model as every measurement runs it (:func:`~lightning_sensitivity.functional.measuring`):
    its eager form (the original of a ``torch.compile``-d module, with the same parameters: a compiled graph does
    not support double backward), every submodule in eval mode (dropout off, batch norm on its running statistics,
    which are neither updated nor synchronized across processes) and autocast off (the products and their
    derivatives in the parameters' precision under ``bf16-mixed``). So the penalty trains against exactly the
    quantity that ``JacobianNormMonitor`` measures, each point's Jacobian independent of the rest of the batch.
    It is one forward pass of its own beside the loss's; ``return_logits=True`` returns that pass's logits, which
    can serve as the loss's logits for a model with no dropout or batch norm (there eval and train modes agree).
    The global random stream, the buffers and the modules' modes are left as they were.

    **Accuracy.** The softmax rows are formed as the measurement forms them: the factor
    :math:`\operatorname{diag}(p) - p p^\top` in float64 from the logits, with :math:`1 - p_c` as the sum of the
    other probabilities, each row pulled back at unit scale with its size applied in float64, the exact softmax's
    most probable row as minus the sum of the others; only the logits are differentiated. At confident points the
    penalty and its gradient keep their digits where a backward pass through the softmax loses :math:`1 - p_c`.

    **The estimator** (``method="projection"``, Hoffman, Roberts and Yaida 2019). With :math:`K` =
    ``num_projections`` vector-Jacobian products per point: for the softmax, the rows of the
    :math:`t = \lfloor K/2 \rfloor` most probable classes are taken exactly (:math:`t = 0` for the logits), and the
    other :math:`n = C - t` rows, :math:`J_\text{rest} \in \mathbb{R}^{n \times D}`, through :math:`m = K - t`
    orthonormal directions :math:`q_1, \dots, q_m` (the columns of a Haar-random :math:`n \times m` frame, drawn
    anew per point from ``generator``):

    .. math::

        \hat R_b = \sum_{c \in T_b} \lVert J_b^{(c)} \rVert^2
            + \frac{n}{m} \sum_{j=1}^{m} \lVert q_j^\top J_{b,\text{rest}} \rVert^2 ,
        \qquad \mathbb{E}\, \hat R_b = \lVert J_b \rVert_F^2 ,

    unbiased for every :math:`K`, and so is its gradient (the directions do not depend on the parameters; the set
    :math:`T_b` of most probable classes is locally constant in them). With :math:`M_b = J_{b,\text{rest}}
    J_{b,\text{rest}}^\top` (:math:`n \times n`), its variance is

    .. math::

        \operatorname{Var} \hat R_b = \frac{2\, n\, (n - m)}{m\, (n - 1)\, (n + 2)}
            \Big( \operatorname{tr} M_b^2 - \frac{(\operatorname{tr} M_b)^2}{n} \Big) ,
        \qquad \operatorname{Var} \hat R = \frac{1}{B^2} \sum_b \operatorname{Var} \hat R_b ,

    zero at :math:`m = n` (exact at :math:`K = C`), and at :math:`m = 1` that of one direction uniform on the sphere,
    :math:`2 (n \operatorname{tr} M_b^2 - (\operatorname{tr} M_b)^2) / (n + 2)`: the estimator of JacobianReg at
    ``n=1``. Orthonormal directions lower it by :math:`(n - m) / (n - 1)` against :math:`m` independent ones, and
    for a confident softmax the exact rows take most of the norm. ``method="exact"`` is the value itself.

    **Cost.** One forward pass, then :math:`K` vector-Jacobian products (exact: :math:`C - 1` for the softmax,
    :math:`C` for the logits) in one vectorized backward pass with ``create_graph=True``, kept for the loss's
    backward pass, which then differentiates them (about twice their cost again). When the input's first use is a
    linear layer :math:`h = W x + b` with fewer outputs :math:`H` than inputs :math:`D`, and (projection) than the
    :math:`K B` rows of the batch, the products stop at :math:`h` and the norm is completed with :math:`W W^\top`,
    formed in the graph at every call (:math:`H^2 D` products, against :math:`K B H D` to pull the rows through
    :math:`W`). The measurement's other shortcuts (a last linear layer,
    the CPU's batch-norm and first-convolution backward) are not taken: they give no gradient to the parameters they
    read. ``benchmarks/penalty.py`` measures a training step with the penalty against one without and against
    JacobianReg's algorithm; the figures are in ``docs/benchmarks.md``.

    Args:
        model: an ``nn.Module`` or any callable mapping a batch ``[B, ...]`` to logits ``[B, C]`` (``[B, 1]``: a
            binary classifier, the softmax of the logits :math:`(0, z)`); in a ``LightningModule``, ``self``.
        x: the points, ``[B, ...]``, floating point (labels are not needed).
        output: ``"softmax"`` (the measured quantity) or ``"logits"`` (JacobianReg's).
        method: ``"projection"`` or ``"exact"``.
        num_projections: :math:`K`, the vector-Jacobian products per point of ``method="projection"`` (at most
            :math:`C` are used); ignored by ``method="exact"``.
        generator: the ``torch.Generator`` (on the CPU) of the projection directions. Default: the penalty's own,
            seeded with 0 when first used in this process, which goes on from call to call. Pass one seeded per run
            (and per process under DDP: ``manual_seed(seed + rank)``) for draws that are independent across
            processes and reproducible.
        return_logits: also return the logits ``[B, C]`` of the penalty's forward pass (eval mode, autocast off),
            in the graph.

    Returns:
        The penalty, a scalar in the input's floating dtype (at least ``float32``) that requires grad; with
        ``return_logits=True``, the pair ``(penalty, logits)``.

    Raises:
        TypeError: if ``x`` is not floating point.
        ValueError: if the model's output is not ``[B, C]``, or an argument is out of range.
        RuntimeError: if the forward pass goes through a reentrant activation checkpoint
            (``torch.utils.checkpoint(..., use_reentrant=True)``) in eval mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_sensitivity.functional import jacobian_norm, jacobian_penalty
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x = torch.randn(5, 4)
        >>> penalty = jacobian_penalty(model, x, method="exact")
        >>> torch.allclose(penalty, jacobian_norm(model, x).square().mean())
        True
        >>> penalty.backward()  # as part of a loss: the parameters' gradients
        >>> model[0].weight.grad.shape
        torch.Size([8, 4])
    """
    if output not in ("softmax", "logits"):
        raise ValueError(f"`output` must be 'softmax' or 'logits', got {output!r}.")
    if method not in ("exact", "projection"):
        raise ValueError(f"`method` must be 'exact' or 'projection', got {method!r}.")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"`num_projections` must be a positive integer, got {num_projections!r}.")
    _check_continuous(x)
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.shape[0] == 0:
        empty = torch.zeros((), dtype=out_dtype, device=x.device)
        return (empty, torch.zeros(0, 0, device=x.device)) if return_logits else empty
    plan = _RowPlan(output, method, num_projections, generator if generator is not None else _own_generator())
    with measuring(model, x.device, grad=True) as net:
        rows = num_projections if method == "projection" else None  # exact: C - 1 or C, known after the pass
        fwd = _Forwards(net, x, differentiable=True, rows=rows)(x)
        if fwd.batching.reentrant:
            raise RuntimeError(
                "jacobian_penalty cannot differentiate a model that runs part of its forward pass through "
                "torch.utils.checkpoint with use_reentrant=True in eval mode, where the penalty runs it: its backward "
                "cannot be differentiated again. Checkpoint with use_reentrant=False, or only while training "
                "(`if self.training:`)."
            )
        penalty = _squared_norms(plan, fwd).mean().to(out_dtype)
    return (penalty, fwd.logits) if return_logits else penalty


def _own_generator() -> torch.Generator:
    global _DEFAULT_GENERATOR
    if _DEFAULT_GENERATOR is None:
        _DEFAULT_GENERATOR = torch.Generator().manual_seed(0)
    return _DEFAULT_GENERATOR


def _squared_norms(plan: _RowPlan, fwd: _Forward) -> Tensor:
    """The squared norm of each point's Jacobian (or its estimate), ``[B]`` in float64, in the graph: the rows of
    ``plan``, formed from the logits with autograd on, pulled back in one pass with ``create_graph=True``."""
    z = fwd.logits
    work = torch.device("cpu") if z.device.type == "mps" else z.device  # MPS has no float64
    z64 = z.to(device=work, dtype=torch.float64)
    num_rows, rows, add_left_out = plan.rows(z64, z.dtype)
    directions, scale = rows(0, num_rows)
    unit = directions.to(device=z.device, dtype=z.dtype)
    pulled = _pullback(z, fwd.wrt, unit, fwd.batching, create_graph=True).flatten(2)
    # The squared norm of a row r at the input is r . (G r) when the products stop at the first layer.
    metric = pulled if fwd.gram is None else pulled @ fwd.gram
    squares = (metric * pulled).sum(dim=-1).to(work, torch.float64)
    squared = (squares if scale is None else squares * scale.square()).sum(dim=0)
    if add_left_out:  # the exact softmax's most probable row, minus the sum of the others
        assert scale is not None
        weights, size = _relative(scale.to(z.device), pulled.dtype)
        summed = _weighted_sum(pulled, weights)
        summed_metric = summed if fwd.gram is None else summed @ fwd.gram
        left_out = torch.linalg.vecdot(summed, summed_metric).to(work, torch.float64)
        squared = squared + left_out * size.to(work).square()
    return squared
