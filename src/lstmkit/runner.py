"""The recurrence over time for one layer and one direction.

The runner owns everything about *time*: per-sequence lengths, running a direction in
reverse, the regularisers that act across steps (their masks are drawn here, once, so every
backend sees the same ones), and choosing the backend that executes the loop. It knows no gate
equation; those live in :mod:`lstmkit.cells`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import fused, native, reference, triton
from lstmkit.backends.common import needs_backward
from lstmkit.backends.contract import NO_MASKS, NO_REGULARIZERS, Backend, Masks, Regularizers

# every one a module that keeps the contract of lstmkit.backends.contract.Backend
BACKENDS: dict[str, Backend] = {
    "reference": reference,
    "fused": fused,
    "native": native,
    "triton": triton,
}
BACKEND_NAMES = ("auto", *BACKENDS)


def _keep(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Bernoulli(1 - p) draws as a float mask scaled by ``1 / (1 - p)``."""
    return torch.bernoulli(like.new_full(shape, 1.0 - p)) / (1.0 - p)


def draws_masks(reg: Regularizers, training: bool) -> bool:
    """Whether a forward pass in this mode draws masks for ``reg``: in training mode, with a
    regulariser switched on."""
    return training and any(vars(reg).values())


def draw_masks(reg: Regularizers, training: bool, steps: int, h0: Tensor, c0: Tensor) -> Masks:
    """The masks of one layer-direction's forward pass (in this order, from torch's RNG)."""
    if not training:
        return Masks(
            zoneout_h=reg.zoneout_h or None,
            zoneout_c=reg.zoneout_c or None,
        )
    recurrent = _keep(h0.shape, reg.recurrent_dropout, h0) if reg.recurrent_dropout else None
    zone_h = zone_c = None
    if reg.zoneout_h:
        zone_h = torch.bernoulli(h0.new_full((steps, *h0.shape), reg.zoneout_h)).bool()
    if reg.zoneout_c:
        zone_c = torch.bernoulli(c0.new_full((steps, *c0.shape), reg.zoneout_c)).bool()
    return Masks(recurrent, zone_h, zone_c)


def drop_weights(params: cells.Params, p: float, training: bool) -> cells.Params:
    """``params`` with ``weight_hh`` replaced by a DropConnect copy in training."""
    if not (training and p):
        return params
    w_hh = params["weight_hh"]
    return {**params, "weight_hh": w_hh * _keep(w_hh.shape, p, w_hh)}


def choose_backend(
    name: str,
    cell: cells.Cell,
    masks: Masks,
    x: Tensor | None = None,
    params: cells.Params | None = None,
) -> str:
    """The backend that runs a layer: ``name`` itself, or for ``"auto"`` the first that can
    run it of ``triton`` (CUDA tensors only), ``native`` (CPU tensors only), ``fused`` and
    ``reference``. Every backend is asked the same questions
    (:class:`lstmkit.backends.contract.Backend`): it can run a layer when it ``supports`` the
    cell (by its ``kind``) and regularisers and, given the layer's input ``x`` (``(T, B, I)``)
    and ``params``, its ``refusal`` gives no reason against them (device, dtype, sizes; and
    for the backends with a hand-written backward, a ``torch.func`` transform, forward-mode
    AD or ``torch.jit.trace`` around the call).

    While ``torch.compile`` or ``torch.export`` traces the model, ``"auto"`` is ``native``
    (a custom operator with a fake implementation and an autograd formula, which the compiler
    keeps as one opaque node) or else the reference backend: their graphs have no break,
    where the others would run eagerly behind one. Where the native backend cannot be built,
    ``"auto"`` warns once, saying why.

    Raises:
        ValueError: ``name`` is a backend that cannot run this configuration.
    """
    if name == "auto":
        cuda = x is not None and x.is_cuda
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            order = ("reference",) if cuda else ("native", "reference")
        elif cuda:
            order = ("triton", "fused", "reference")
        else:
            order = ("native", "fused", "reference") if _native_loads() else ("fused", "reference")
        return next(n for n in order if _refusal(n, cell, masks, x, params) is None)
    reason = _refusal(name, cell, masks, x, params)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run {reason}; use backend='auto'")
    return name


_warned = False


def _native_loads() -> bool:
    """Whether the native backend's operators are loaded; one warning per process if not."""
    global _warned
    ok, why = native.available()
    if not (ok or _warned):
        _warned = True
        warnings.warn(
            f"lstmkit: the native CPU backend is unavailable ({why}); using the Python backends",
            stacklevel=4,
        )
    return ok


def prepare(name: str, cell: cells.Cell, device: torch.device) -> None:
    """Load now what the first forward of a layer of ``cell`` on ``device`` with backend
    ``name`` would load: the native backend's operators (~5 ms; the build where none is
    cached), so that a server's first request does not pay for them."""
    if device.type == "cpu" and name in ("auto", "native") and native.supports(cell, NO_MASKS):
        native.available()


def _refusal(name, cell: cells.Cell, masks: Masks, x: Tensor | None, params) -> str | None:
    """Why backend ``name`` cannot run this layer, or ``None``."""
    backend = BACKENDS[name]
    if not backend.supports(cell, masks):
        what = f"cell={cell.name!r}"
        if cell.kind is None:  # a custom cell, or a subclass that did not declare its kind
            what += f" of class {type(cell).__qualname__}, which sets no kind"
        elif backend.supports(cell, NO_MASKS):
            what += " with recurrent_dropout or zoneout"
        return f"{what} (backend='reference' runs every cell and regulariser)"
    reason = None if x is None else backend.refusal(cell, x, params)
    return None if reason is None else f"this layer: {reason}"


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse ``x`` (``(T, B, ...)``) along time, each sequence within its own length.

    Sequence ``b`` of length ``L_b`` has its steps ``0 .. L_b - 1`` reversed; its padding
    steps stay where they are. Applying the function twice gives ``x`` back.
    """
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.size(0), device=x.device).unsqueeze(1)  # (T, 1)
    lengths = lengths.unsqueeze(0)  # (1, B)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


def run_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: cells.Params,
    *,
    cell: cells.Cell = cells.CELLS["lstm"],
    reverse: bool = False,
    lengths: Tensor | None = None,
    backend: str = "auto",
    regularizers: Regularizers = NO_REGULARIZERS,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one layer in one direction over a whole (padded) batch of sequences.

    Args:
        x: ``(T, B, I)`` time-major input.
        h0, c0: ``(B, P)`` and ``(B, H)`` initial state.
        params: the layer-direction's parameters, by name (see :mod:`lstmkit.cells`).
        cell: the step to run.
        reverse: run from each sequence's last valid step to its first.
        lengths: ``(B,)`` int64 valid length of each sequence, or ``None`` when all are
            ``T`` long. Steps past a length neither change that sequence's state nor produce
            output (their output is zero).
        backend: one of :data:`BACKEND_NAMES`.
        regularizers: in-layer regularisers; their masks are drawn here.
        training: whether dropout-style regularisers are active.

    Returns:
        ``(output, h_n, c_n)``: ``(T, B, P)``, and each sequence's state after its last
        valid step, ``(B, P)`` and ``(B, H)``.
    """
    steps = x.size(0)
    order = batch_sizes = None
    if lengths is not None and not bool((lengths == steps).all()):
        # Sort by decreasing length, so that the sequences still running at step t are the
        # first batch_sizes[t] rows: backends then work on row prefixes instead of masks.
        lengths, order = lengths.sort(descending=True, stable=True)
        x, h0, c0 = x.index_select(1, order), h0.index_select(0, order), c0.index_select(0, order)
        running = torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths  # (T, B)
        batch_sizes = running.sum(1).tolist()
    else:
        lengths = None
    if reverse:
        x = reverse_within_lengths(x, lengths)
    masks = draw_masks(regularizers, training, steps, h0, c0)
    params = drop_weights(params, regularizers.weight_drop, training)
    run = BACKENDS[choose_backend(backend, cell, masks, x, params)].run
    output, h_n, c_n = run(cell, x, h0, c0, params, batch_sizes, masks)
    if reverse:
        output = reverse_within_lengths(output, lengths)
    if order is not None:
        restore = order.argsort()
        output = output.index_select(1, restore)
        h_n, c_n = h_n.index_select(0, restore), c_n.index_select(0, restore)
    return output, h_n, c_n


def infer_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    layers: list[cells.Params],
    *,
    cell: cells.Cell,
    backend: str,
    regularizers: Regularizers,
    training: bool,
    directions: int = 1,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A stack of layers of one or two directions over whole sequences (no lengths), in
    evaluation mode or in training mode with no in-layer regulariser on, where nothing will be
    differentiated and the native backend runs float32 inference: one call of its stack
    operator for all the layers, without :func:`run_layer`'s choice of backend, masks and
    reversal for each layer-direction (~50 us each, a tenth of a small model's forward; a
    bidirectional layer's two directions at once, where the operator chooses it). ``None``
    wherever :func:`run_layer` has anything else to decide; the caller then runs the layers
    through it, which gives the same numbers where this runs.

    Args:
        x: ``(T, B, I)``; h0, c0: ``(num_layers * directions, B, P)`` and
            ``(num_layers * directions, B, H)``, or both ``None`` for zeros.
        layers: each layer-direction's parameters, as :func:`run_layer` takes them, in
            ``h0``'s order (a layer's reverse direction after its forward one).
        cell, backend, regularizers, training: as for :func:`run_layer` (evaluation: zoneout
            moves each unit by its expectation, the other regularisers are off). Dropout
            between layers is the caller's: it asks only where there is none.
        directions: 2 for bidirectional layers (the second direction reversed in time).

    Returns:
        ``(output, h_n, c_n)``: the top layer's ``(T, B, directions * P)`` output and the
        layer-directions' final states, as ``h0`` and ``c0``, or ``None``.
    """
    if backend not in ("auto", "native") or x.dtype != torch.float32:
        return None
    if draws_masks(regularizers, training):
        return None
    if not native.supports(cell, NO_MASKS) or torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()  # else nothing to gather: needs_backward would say no
    if grad and needs_backward((x, h0, c0, *(t for params in layers for t in params.values()))):
        return None
    if native.refusal(cell, x, layers[0]) is not None:
        return None
    zoneout = (regularizers.zoneout_h, regularizers.zoneout_c)
    return native.infer_stack(cell, x, h0, c0, layers, zoneout, directions)


def infer_whole(
    input: object,
    hx: object,
    parameters: dict[str, Tensor | None],
    names: list[list[str]],
    *,
    sizes: tuple[int, int, int],
    batch_first: bool,
    one_step: bool,
    cell: cells.Cell,
    backend: str,
    regularizers: Regularizers,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:class:`lstmkit.LSTM`'s forward (or with ``one_step`` its ``step``) of a unidirectional
    stack drawing no masks (evaluation mode, or training mode without regularisers or dropout
    between layers) on whole sequences (no lengths), where it runs as
    :func:`infer_stack` would run it, in one call to the native backend that checks ``input``,
    ``hx`` and the parameters itself; ``None`` wherever anything else is to be decided or an
    error to be raised (then the caller's full path runs, and gives the same numbers). Cold,
    between other programs' work, that path's Python costs 100-200 us before the operator
    starts (an AMD EPYC Zen 4, T = 200, H = 128; 15 us warm).

    Args:
        input: what forward was given, ``(L, N, H_in)`` (with ``batch_first`` ``(N, L, H_in)``),
            or step, ``(N, H_in)``.
        hx: ``None`` for zeros or a tuple ``(h_0, c_0)`` of ``(num_layers, N, H_out)`` and
            ``(num_layers, N, H_cell)``.
        parameters, names: the module's parameter registry and its parameter names as built,
            one list per layer; any of those missing from the registry (a parametrization) and
            this declines.
        sizes: the module's ``(input_size, hidden_size, proj_size or hidden_size)``.
        batch_first, cell, backend: the module's.
        regularizers: the module's (evaluation: zoneout moves each unit by its expectation).

    Returns:
        ``(output, h_n, c_n)`` (output ``(N, H_out)`` for a step), or ``None``.
    """
    if backend not in ("auto", "native") or torch.compiler.is_compiling():
        return None
    library = native.library()
    if library is None or not native.supports(cell, NO_MASKS):
        return None
    # lstmkit_native.infer_whole (csrc/entry.cpp) asks in C++ what the full path asks before
    # infer_stack, and runs the stack operator or answers None
    return library.infer_whole(
        input,
        hx,
        parameters,
        names,
        native.LAYER_NAMES,
        *sizes,
        batch_first,
        one_step,
        cell.kind,
        regularizers.zoneout_h,
        regularizers.zoneout_c,
    )


def step_layer(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    params: cells.Params,
    *,
    cell: cells.Cell = cells.CELLS["lstm"],
    backend: str = "auto",
    regularizers: Regularizers = NO_REGULARIZERS,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """One time step of one layer in the forward direction, for streaming.

    The step is a sequence of one step, run through the same contract as :func:`run_layer`:
    :func:`choose_backend` picks the backend from ``backend`` and its ``run`` executes it,
    so it equals one step of :func:`run_layer` on that backend, zoneout included as its
    expectation in evaluation. In training the in-layer regularisers are not supported: their
    masks belong to a whole sequence, which a single step does not know.

    Args:
        x: ``(B, I)`` input at this step.
        h, c: ``(B, P)`` and ``(B, H)`` state before it.
        params, cell, backend, regularizers, training: as for :func:`run_layer`.

    Returns:
        ``(h_t, c_t)``, ``(B, P)`` and ``(B, H)``.

    Raises:
        ValueError: ``training`` with a regulariser switched on, or a ``backend`` that cannot
            run this layer.
    """
    if draws_masks(regularizers, training):
        raise ValueError(
            "step() supports recurrent_dropout, weight_drop and zoneout only in evaluation "
            f"mode (call .eval()), got {regularizers} in training mode"
        )
    masks = draw_masks(regularizers, False, 1, h, c)  # evaluation: zoneout's expectation
    x = x.unsqueeze(0)  # (1, B, I)
    run = BACKENDS[choose_backend(backend, cell, masks, x, params)].run
    _, h_t, c_t = run(cell, x, h, c, params, None, masks)
    return h_t, c_t
