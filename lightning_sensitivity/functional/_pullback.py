r"""How :func:`~lightning_sensitivity.functional.jacobian_norm` takes its vector-Jacobian products.

The math of the measurement (which rows are pulled back, and how their squared norms add up) lives in
:mod:`~lightning_sensitivity.functional.jacobian`. This module holds the machinery under it:

- the forward pass, watched (:class:`_Watcher`) for the input's first use, where the graph is cut when it is a
  linear layer with fewer outputs than inputs, and for a last linear layer that computes the logits;
  :class:`_Forwards` runs it chunk after chunk and remembers what the first chunk decided; the calls that have a
  cheaper backward go through it (:data:`~lightning_sensitivity.functional._backwards._SHORTCUTS`);
- the Gram matrix :math:`G = W W^\top` of a first layer (:func:`_gram`), cached while the weight is unchanged;
- the models whose cut failed (:data:`_NO_CUT`), so that the cut is not tried again;
- the vectorized backward pass (:func:`_pullback`), and its one fallback: one backward pass per row where an
  operator's backward cannot be batched (:func:`_no_batching_rule`);
- the pull-back of a model that runs part of its forward pass through a reentrant activation checkpoint
  (:meth:`_Forwards.repeated_pullback`), which ``torch.autograd.grad`` cannot differentiate.

A differentiable forward pass (``differentiable=True``, for :func:`~lightning_sensitivity.functional.jacobian_penalty`,
whose products are themselves differentiated with respect to the parameters) takes no shortcut (their backward gives
no gradient to the parameters they read) and keeps the cut at the first linear layer attached to the graph, with a
Gram matrix formed anew with autograd on, and only where that costs less than pulling the rows through the layer.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_sensitivity.functional._backwards import _through_shortcut
from lightning_sensitivity.functional.evaluation import _fresh_input, _held_modules, class_logits

# Calls that only read a tensor's metadata, and calls that only reorder or reshape its entries: neither
# changes the Frobenius norm of a Jacobian taken with respect to that tensor.
_METADATA_CALLS = frozenset(
    {"__get__", "size", "dim", "numel", "__len__", "is_floating_point", "is_contiguous", "stride"}
)
_REORDER_CALLS = frozenset(
    {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "to", "float"}
)
# Operators whose backward ``is_grads_batched`` runs once per row, where ``torch.func.vmap`` folds the rows into
# the batch (``docs/benchmarks.md`` has the measurement).
_FOLDED_BY_FUNC_VMAP = frozenset(
    {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.batch_norm}
)


@dataclass
class _LastLinear:
    """The model's last operation when it is ``F.linear``: logits ``z = h W^T + b``."""

    input: Tensor
    weight: Tensor


@dataclass
class _Batching:
    """How the rows of one measurement are pulled back: together, through ``torch.func.vmap`` over
    ``autograd.grad`` (``vmap``: a model with convolutions or batch norms, whose backward it folds into their batch)
    or through ``is_grads_batched``; or one by one (``per_row``), once an operator's backward could not be batched;
    or, for a model whose forward pass goes through a reentrant activation checkpoint (``reentrant``), by running
    the forward pass again on the points repeated once per row (:meth:`_Forwards.repeated_pullback`).
    """

    vmap: bool = False
    per_row: bool = False
    reentrant: bool = False


@dataclass
class _Forward:
    """One forward pass ready for vector-Jacobian products."""

    logits: Tensor
    wrt: Tensor  # the tensor to differentiate at: the input, or the output of its first linear layer
    gram: Tensor | None  # G = W W^T when ``wrt`` is the output of the input's first linear layer
    last: _LastLinear | None
    batching: _Batching
    largest: int  # entries per point of the largest gradient a backward pass to ``wrt`` forms
    activations: int  # entries per point of all the results of the forward pass (what a backward pass keeps)


class _Watcher(TorchFunctionMode):
    """Watches a forward pass for the input's first use, and cuts the graph there if it is ``F.linear``; also
    remembers the last ``F.linear`` call, so that logits computed by a final linear layer can be recognized.

    The input may be reshaped or reordered first (``flatten``, ``view``, ...). Any other use of the input,
    before or after the linear layer (a skip connection, a slice, an elementwise op), disables the cut.
    """

    def __init__(
        self, x: Tensor, cut_first: bool, differentiable: bool = False, cut_below: int | None = None
    ) -> None:
        super().__init__()
        self._tracked: list[Tensor] = [x]
        self._cut_first = cut_first
        self._differentiable = differentiable
        self._cut_below = cut_below  # cut only a layer with fewer outputs than this (None: any narrower one)
        self.valid = True
        self.weight: Tensor | None = None
        self.cut: Tensor | None = None
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        self.convolutional = False  # a convolution or batch norm ran (see ``_pullback``)
        self.largest = 0  # entries of the largest result in the graph (each has a gradient of that size)
        # Entries of all the results, those computed without a graph included (a reentrant checkpoint's, which its
        # backward pass computes again with one): what a backward pass through a fresh forward pass keeps alive.
        self.activations = 0

    def _is_tracked(self, value: Any) -> bool:
        return isinstance(value, Tensor) and any(value is t for t in self._tracked)

    def last_linear(self, z: Tensor) -> _LastLinear | None:
        if self._last is None or self._last[2] is not z:
            return None
        h, weight, _ = self._last
        if h.ndim != 2 or h.shape[0] != z.shape[0] or weight.shape != (z.shape[1], h.shape[1]):
            return None
        return _LastLinear(h, weight) if h.requires_grad else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = None if self._differentiable else _through_shortcut(func, args, kwargs, self._is_tracked)
        if result is None:
            result = func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func in _FOLDED_BY_FUNC_VMAP:
            self.convolutional = True
        if isinstance(result, Tensor) and result.requires_grad:
            self.largest = max(self.largest, result.numel())
        if isinstance(result, Tensor) and (result.requires_grad or not torch.is_grad_enabled()):
            self.activations += result.numel()
        if func is F.linear and isinstance(weight, Tensor) and isinstance(args[0], Tensor):
            self._last = (args[0], weight, result)
        if not self._cut_first:
            return result
        flat, _ = tree_flatten((args, kwargs))
        if not any(self._is_tracked(a) for a in flat):
            return result
        name = getattr(func, "__name__", "")
        if name in _METADATA_CALLS:
            return result
        if name in _REORDER_CALLS and self._is_tracked(args[0]) and self.cut is None:
            self._tracked.append(result)
            return result
        if (
            func is F.linear
            and self.cut is None
            and torch.is_grad_enabled()  # not where the forward pass builds no graph (a reentrant checkpoint)
            and self._is_tracked(args[0])
            and isinstance(weight, Tensor)
            and not self._is_tracked(weight)
            and weight.shape[0] < weight.shape[1]
            and (self._cut_below is None or weight.shape[0] < self._cut_below)
            and result.shape[:-1] == args[0].shape[:-1]
            and args[0].ndim == 2
        ):
            self.weight = weight
            # Differentiable: the cut stays a function of the first layer's weight and bias.
            self.cut = result if self._differentiable else result.detach().requires_grad_(True)
            # The products stop at the cut: the results before it (views of the input) get no gradient.
            self.largest = self.cut.numel()
            self._last = None  # the first layer is never the last one we stop at: its input is the input
            return self.cut
        self.valid = False
        return result


class _Forwards:
    """The forward passes of one measurement, one per chunk of points. The first chunk decides whether the input
    is cut at its first linear layer; the later ones follow that decision and reuse its Gram matrix."""

    def __init__(
        self, model: Callable[[Tensor], Tensor], x: Tensor, differentiable: bool = False, rows: int | None = None
    ) -> None:
        self.model = model
        self.differentiable = differentiable
        # A differentiable pass forms W W^T anew (H^2 D products), where pulling its rows through W takes
        # rows x B x H x D: it cuts only a first layer narrower than its rows (None: rows not known, any narrower).
        self.rows = rows
        self._key = _model_key(model, x)
        # None: not known yet (decided on the first chunk). A model seen before whose input cut failed is not
        # cut again: a failed cut costs a second forward pass.
        self.use_shortcut: bool | None = False if _NO_CUT.known(self._key) else None
        self.gram: Tensor | None = None
        self.batching = _Batching()

    def __call__(self, x: Tensor) -> _Forward:
        leaf = _fresh_input(x).requires_grad_(True)
        cut_first = self.use_shortcut is not False
        cut_below = self.rows * x.shape[0] if self.differentiable and self.rows is not None else None
        watcher = _Watcher(leaf, cut_first, self.differentiable, cut_below)
        with watcher:
            z = self.model(leaf)
        _check_output(z, x.shape[0])
        wrt, gram = leaf, None
        if cut_first:
            if watcher.cut is not None and watcher.valid:
                self.use_shortcut = True
                if self.differentiable:  # a function of the weight, formed anew: never cached with its graph
                    assert watcher.weight is not None
                    wrt, gram = watcher.cut, watcher.weight @ watcher.weight.T
                else:
                    if self.gram is None:
                        self.gram = _gram(watcher.weight)
                    wrt, gram = watcher.cut, self.gram
            else:
                self.use_shortcut = False
            if watcher.cut is not None and not watcher.valid:  # the input has other uses: the whole graph again
                _NO_CUT.add(self._key, self.model)
                watcher = _Watcher(leaf, cut_first=False, differentiable=self.differentiable)
                with watcher:
                    z = self.model(leaf)
                _check_output(z, x.shape[0])
        self.batching.vmap = watcher.convolutional  # convolutions and batch norms: their rows through vmap
        self.batching.reentrant = _through_reentrant_checkpoint(z)
        activations = watcher.activations // max(1, x.shape[0])
        return _Forward(z, wrt, gram, watcher.last_linear(z), self.batching, _per_point(watcher, wrt), activations)

    def repeated_pullback(self, x: Tensor, cotangents: Tensor, at_features: bool) -> Tensor:
        """``cotangents[k] @ d out / d wrt`` for every row k, for a model whose forward pass goes through a reentrant
        activation checkpoint (``torch.utils.checkpoint(..., use_reentrant=True)``).

        PyTorch refuses ``torch.autograd.grad`` through such a checkpoint (its backward recomputes the region and
        calls ``torch.autograd.backward`` over it), but takes ``torch.autograd.backward(out, grad)``. In eval mode
        the points of a batch do not interact, so the forward pass runs again on the points ``x`` repeated once per
        row (row k's copy of point b at position ``k * B + b``), the rows are the gradient of that one output, and
        they are read from the input's ``.grad``. ``out`` is the logits, or with ``at_features`` the input of the
        last linear layer; ``wrt`` is the input, or the output of its first linear layer where the first forward
        pass cut there. The parameters of the modules the model holds do not require grad for the pass (and
        require it again afterwards), so no parameter's ``.grad`` and no hook on it (a DDP reducer's) is touched:
        the only leaf that gets a gradient is the measurement's own input.

        Cost: one forward and one backward pass over ``K * B`` points per call, where the other paths take one
        forward pass per chunk and vectorized backward passes; the caller bounds ``K`` (:func:`_rows_per_pass`).
        """
        rows, batch = cotangents.shape[:2]
        repeated = x.repeat(rows, *[1] * (x.ndim - 1))
        with _parameters_not_requiring_grad(self.model):
            leaf = _fresh_input(repeated).requires_grad_(True)
            watcher = _Watcher(leaf, bool(self.use_shortcut))
            with watcher:
                z = self.model(leaf)
            wrt = watcher.cut if self.use_shortcut else leaf
            last = watcher.last_linear(z)
            out = last.input if at_features and last is not None else z
            assert wrt is not None and (last is not None or not at_features), "the same model decides the same"
            torch.autograd.backward(out, cotangents.reshape(out.shape))
        assert wrt.grad is not None
        return wrt.grad.view(rows, batch, *wrt.shape[1:])


#: The most entries (points x rows x activations per point) that one repeated forward pass through a reentrant
#: checkpoint keeps alive for its backward pass (256 MiB in float32).
_REPEATED_MAX_ENTRIES = 2**26


def _rows_per_pass(fwd: _Forward, rows: int) -> int:
    """How many of ``rows`` rows one pass takes: all of them, except through a reentrant checkpoint, where a pass runs
    the forward pass on the points repeated once per row and keeps its activations (at most
    :data:`_REPEATED_MAX_ENTRIES` entries, and at least one row)."""
    if not fwd.batching.reentrant:
        return rows
    points = fwd.logits.shape[0]
    return max(1, min(rows, _REPEATED_MAX_ENTRIES // max(1, points * fwd.activations)))


def _through_reentrant_checkpoint(z: Tensor) -> bool:
    """Whether the graph of ``z`` holds a reentrant activation checkpoint: the backward node of PyTorch's
    ``CheckpointFunction`` (``torch.utils.checkpoint(..., use_reentrant=True)``), or of a library's function of that
    name built the same way (DeepSpeed's), whose backward recomputes its region and calls ``torch.autograd.backward``
    over it. The graph is walked once per forward pass (its nodes, not its tensors)."""
    seen: set[int] = set()
    stack = [z.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


@contextlib.contextmanager
def _parameters_not_requiring_grad(model: object) -> Iterator[None]:
    """The parameters of the modules ``model`` computes with do not require grad inside the block; each one that did
    requires it again afterwards (a parameter frozen by the user stays frozen)."""
    parameters = {
        id(p): p for module in _held_modules(model) for p in module.parameters() if p.requires_grad
    }.values()
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def _per_point(watcher: _Watcher, wrt: Tensor) -> int:
    """Entries per point of the largest gradient a backward pass to ``wrt`` forms."""
    return max(wrt[0].numel(), watcher.largest // max(1, wrt.shape[0]))


def _check_output(z: object, batch_size: int) -> None:
    try:
        class_logits(z, batch_size)
    except ValueError as error:
        raise ValueError(
            f"{error} Pass a model that returns the classifier's logits, or wrap it in one that picks them out."
        ) from None


# G = W W^T of recently measured first layers, reused while the weight is unchanged: training updates weights
# in place, which bumps the tensor's version counter. Keyed by ``id`` (tensors compare elementwise), with a
# weak reference that tells a live weight from a new tensor that reuses a freed one's id.
_GRAM_CACHE: dict[int, tuple[weakref.ref[Tensor], tuple[int, int], Tensor]] = {}
_GRAM_CACHE_SIZE = 8


def _gram(weight: Tensor) -> Tensor:
    cached = _GRAM_CACHE.get(id(weight))
    version = (weight._version, weight.data_ptr())
    if cached is not None and cached[0]() is weight and cached[1] == version:
        return cached[2]
    with torch.no_grad():
        gram = weight.detach() @ weight.detach().T
    if len(_GRAM_CACHE) >= _GRAM_CACHE_SIZE:
        _GRAM_CACHE.pop(next(iter(_GRAM_CACHE)))
    _GRAM_CACHE[id(weight)] = (weakref.ref(weight), version, gram)
    return gram


_ModelKey = tuple[int, tuple[int, ...], torch.dtype, torch.device]


def _model_key(model: object, x: Tensor) -> _ModelKey:
    return id(model), tuple(x.shape[1:]), x.dtype, x.device


class _ModelMemo:
    """Models (with an input shape, dtype and device) seen recently, held by weak reference, so that a freed
    model's id reused by a new one is not mistaken for it."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._seen: dict[_ModelKey, weakref.ref[Any]] = {}

    def known(self, key: _ModelKey) -> bool:
        ref = self._seen.get(key)
        return ref is not None and ref() is not None

    def add(self, key: _ModelKey, model: object) -> None:
        try:
            ref = weakref.ref(model)
        except TypeError:
            return
        if len(self._seen) >= self._size:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = ref


#: Models whose input reaches its first linear layer and something else too: the cut is not tried again.
_NO_CUT = _ModelMemo()


def _pullback(
    out: Tensor, wrt: Tensor, cotangents: Tensor, batching: _Batching, create_graph: bool = False
) -> Tensor:
    """``cotangents[k] @ d out / d wrt`` for every k, as one vectorized backward pass unless ``batching`` says
    otherwise; with ``create_graph``, as a differentiable function of the parameters, of ``wrt`` and of the
    cotangents.

    ``is_grads_batched`` runs the backward of a convolution or a batch norm once per row; ``torch.func.vmap`` over
    ``autograd.grad`` folds the rows into their batch instead, and is taken for models that have them (for matrix
    products ``is_grads_batched`` is a little faster). Where an operator's backward cannot be batched (the error
    :func:`_no_batching_rule` recognizes), the rows are pulled back one by one, for the rest of the measurement,
    with a warning; every other error, out-of-memory included, propagates as it is."""
    if cotangents.shape[0] == 1:  # one row: a plain backward pass, without the batching machinery
        (row,) = torch.autograd.grad(
            out, wrt, grad_outputs=cotangents[0], retain_graph=True, create_graph=create_graph
        )
        return row[None]
    if not batching.per_row:
        try:
            if batching.vmap:
                return torch.func.vmap(
                    lambda v: torch.autograd.grad(
                        out, wrt, grad_outputs=v, retain_graph=True, create_graph=create_graph
                    )[0]
                )(cotangents)
            (rows,) = torch.autograd.grad(
                out,
                wrt,
                grad_outputs=cotangents,
                is_grads_batched=True,
                retain_graph=True,
                create_graph=create_graph,
            )
            return rows
        except RuntimeError as error:
            if not _no_batching_rule(error):
                raise
            batching.per_row = True
            _warn_per_row(error)
    return torch.stack(
        [
            torch.autograd.grad(out, wrt, grad_outputs=v, retain_graph=True, create_graph=create_graph)[0]
            for v in cotangents
        ]
    )


def _no_batching_rule(error: RuntimeError) -> bool:
    """Whether ``error`` is the one a vectorized backward pass raises on an operator it cannot batch: in torch
    2.14, a plain ``RuntimeError`` whose message starts with ``vmap:`` (``.item()``, an in-place write into an
    unbatched tensor, data-dependent shapes) or names a missing batching rule (``Batching rule not implemented for
    aten::item. We could not generate a fallback.``). Operators without a rule that can be run row by row are
    already run so by torch itself, with its own performance warning."""
    message = str(error)
    return type(error) is RuntimeError and (
        message.startswith("vmap:") or "Batching rule not implemented" in message
    )


#: The errors already warned about (their first line): a model measured again does not warn again.
_WARNED_PER_ROW: set[str] = set()


def _warn_per_row(error: RuntimeError) -> None:
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    if cause in _WARNED_PER_ROW:
        return
    _WARNED_PER_ROW.add(cause)
    warnings.warn(
        "jacobian_norm: an operator's backward in this model cannot be vectorized over the rows of the Jacobian "
        f"({cause}), so the rows are pulled back one at a time: the same values, at the cost of one backward "
        "pass per row.",
        stacklevel=2,
    )
