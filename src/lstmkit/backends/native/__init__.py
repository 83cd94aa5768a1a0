"""The native backend: a layer-direction's whole recurrence in C++, forward and hand-written
backward, as the custom operators ``torch.ops.lstmkit.recurrence`` and
``torch.ops.lstmkit.recurrence_backward`` (``csrc/recurrence.cpp``), for the cells of the kinds
``lstm``, ``peephole``, ``cifg`` and ``layernorm`` with recurrent dropout and zoneout.

Where nothing will be differentiated and the input is float32 (inference), one operator runs the
whole layer instead, input products included: ``torch.ops.lstmkit.inference``
(``csrc/inference.cpp``), with the threads sharing the batch's rows, or the hidden units when
the batch is small, for the whole sequence. Training of the same float32 layers without masks
runs that kernel too, keeping every step's gates and cell state (and layer norm's normalised
values): ``torch.ops.lstmkit.training_forward``, whose backward is the recurrence's backward
operator and then the input half's gradients, the weights' on the same product kernel
(``torch.ops.lstmkit.weight_gradients``: without layer norm both together, from one dL/dz;
with it each from its own, W_hh's inside the backward operator). Otherwise the input half of
the gates is one product over all steps, ``torch.ops.lstmkit.linear`` on the same kernel for
the plain ``x W_ih^T + b`` in float32 (its autograd formula gives the input's gradient on that
kernel too, ``weight_ih``'s by ATen), else the cell's own
:meth:`~lstmkit.cells.Cell.project_input`; and the recurrence operator runs the steps.
Python adds what makes the operators behave like any PyTorch operator:
a fake (shape-only) implementation of each, for ``torch.compile`` and ``torch.export``, and the
forward's autograd formula, which calls the backward operator. When autograd asks for
higher-order gradients (``create_graph=True``) the formula differentiates the reference
equations instead (:func:`lstmkit.backends.common.reference_backward`), as the fused backend
does.

The operators are compiled once per machine and cached (:mod:`.build`); they are loaded the
first time a process asks whether this backend is :func:`available`. Where they cannot be
built, the backend says why and ``backend="auto"`` runs the Python backends.

Runs float32 and float64 on the CPU, with or without projection, lengths, given state and
biases.
"""

from __future__ import annotations

import contextlib
import math
import threading
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import reference
from lstmkit.backends.common import (
    needs_backward,
    opaque_refusal,
    reference_backward,
    rerun_reference,
)
from lstmkit.backends.contract import Masks
from lstmkit.backends.native import build

# the step's parameters, in the operators' order (None where a cell has none)
NAMES = (
    "weight_hh",
    "weight_hr",
    "weight_ch",
    "ln_hh_weight",
    "ln_hh_bias",
    "ln_c_weight",
    "ln_c_bias",
)
# the parameters of lstmkit::inference and lstmkit::training_forward, in their order
LAYER_NAMES = (
    "weight_ih",
    "weight_hh",
    "bias_ih",
    "bias_hh",
    "weight_hr",
    "weight_ch",
    "ln_ih_weight",
    "ln_ih_bias",
    "ln_hh_weight",
    "ln_hh_bias",
    "ln_c_weight",
    "ln_c_bias",
)
KINDS = frozenset({"lstm", "peephole", "cifg", "layernorm"})  # of the cells it runs
DTYPES = (torch.float32, torch.float64)
# Rows (T x B) from which training's input half runs on lstmkit::linear rather than ATen's GEMM:
# measured on an AMD EPYC Zen 4, training time with it / without, 2 threads: T1 (200 rows of
# 128 -> 512) 1.06, S (400 of 64 -> 256) 0.94-0.99, M, D, D2, L (3200-6400 rows) 0.92-0.98.
LINEAR_MIN_ROWS = 256

_status: tuple[bool, str] | None = None  # (available, how it was loaded or why not)
_library: ModuleType | None = None  # the loaded library's Python module (entry.cpp)
_loading = threading.Lock()  # one thread loads and registers; the others wait for its answer


# Under torch.compile the answer is taken as a constant: dynamo calls the function instead of
# tracing the build (files, hashes, subprocesses) it may run the first time.
@torch.compiler.assume_constant_result
def available() -> tuple[bool, str]:
    """``(True, how the operators were loaded)`` or ``(False, why not)``. The first call in a
    process loads the compiled operators, building them if this machine has no cached build
    (``LSTMKIT_NATIVE=0`` in the environment forces ``False``); threads calling at once wait for
    that one load."""
    global _status, _library
    if _status is None:
        with _loading:
            if _status is None:
                library, what = build.load()
                if library is not None:
                    _register()
                _library = library
                _status = library is not None, what
    return _status


def _register() -> None:
    """The fake implementations and the autograd formula of the loaded operators."""
    torch.library.register_fake("lstmkit::recurrence", _forward_fake)
    torch.library.register_fake("lstmkit::recurrence_backward", _backward_fake)
    torch.library.register_fake("lstmkit::inference", _inference_fake)
    torch.library.register_fake("lstmkit::inference_stack", _inference_stack_fake)
    torch.library.register_autograd("lstmkit::recurrence", _backward, setup_context=_setup_context)
    torch.library.register_fake("lstmkit::training_forward", _training_fake)
    torch.library.register_autograd(
        "lstmkit::training_forward", _training_backward, setup_context=_training_setup_context
    )
    torch.library.register_fake("lstmkit::linear", _linear_fake)
    torch.library.register_fake("lstmkit::layer_norm_backward_", _layer_norm_backward_fake)
    torch.library.register_fake("lstmkit::weight_gradients", _weight_gradients_fake)
    torch.library.register_autograd(
        "lstmkit::linear", _linear_backward, setup_context=_linear_setup_context
    )


def _forward_fake(
    xp, h0, c0, w_hh, w_hr, w_ch, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, kind, recurrent, zone_h,
    zone_c, zone_h_p, zone_c_p, batch_sizes, training,
):  # fmt: skip
    steps, batch, rows = xp.shape
    hidden, proj = c0.shape[1], w_hh.shape[1]
    layernorm = kind == "layernorm"
    zoned_c = zone_c is not None or zone_c_p != 0
    kept = (
        (steps, batch, rows),  # activated gates
        (steps, batch, hidden),  # every c_t
        (steps, batch, hidden) if zoned_c else (0,),  # c' before zoneout
        (steps, batch, rows) if layernorm else (0,),  # LN_hh's normalised input
        (steps, batch, hidden) if layernorm else (0,),  # LN_c's normalised input
        (steps, batch, 2) if layernorm else (0,),  # 1 / std of both
    )
    # inference keeps nothing; no two outputs alias each other
    kept = (shape if training else (0,) for shape in kept)
    out = xp.new_empty(steps, batch, proj)
    return out, torch.empty_like(h0), torch.empty_like(c0), *(xp.new_empty(s) for s in kept)


def _inference_fake(x, h0, c0, w_ih, w_hh, *_rest):
    steps, batch, _ = x.shape
    return x.new_empty(steps, batch, w_hh.shape[1]), torch.empty_like(h0), torch.empty_like(c0)


def _inference_stack_fake(x, h0, c0, params, kind, zone_h_p, zone_c_p, directions=1):
    steps, batch, _ = x.shape
    if h0 is None:  # zeros (L D, B, P) and (L D, B, H), from W_hh (4H or 3H, P)
        w_hh, count = params[1], len(params) // len(LAYER_NAMES)
        h0 = x.new_empty(count, batch, w_hh.shape[1])
        c0 = x.new_empty(count, batch, w_hh.shape[0] // cells.CELLS[kind].gates)
    output = x.new_empty(steps, batch, directions * h0.shape[-1])
    return output, torch.empty_like(h0), torch.empty_like(c0)


def _linear_fake(a, weight, bias):
    return a.new_empty(*a.shape[:-1], weight.shape[0])


def _layer_norm_backward_fake(grad, input, stats, weight):
    return torch.empty_like(weight)


def _linear_setup_context(ctx, inputs, output) -> None:
    a, weight, bias = inputs
    ctx.save_for_backward(a, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    """``F.linear``'s gradients."""
    a, weight = ctx.saved_tensors
    return _linear_gradients(grad, a, weight, ctx.has_bias, ctx.needs_input_grad)


def _linear_gradients(grad, a, weight, has_bias: bool, needs):
    """The gradients of ``a W^T + b`` by ``a``, ``W`` and ``b`` (``None`` where not ``needs``):
    by the input on lstmkit::linear from :data:`LINEAR_MIN_ROWS` rows (the weight's transpose
    packed as it lies), by the weight and the bias by ATen."""
    count = math.prod(a.shape[:-1])  # rows
    rows = grad.reshape(count, grad.shape[-1])
    da = None
    if needs[0] and count < LINEAR_MIN_ROWS:
        da = F.linear(grad, weight.t(), None)
    elif needs[0]:
        # create_graph=True needs the differentiable operator; otherwise its kernel below the
        # autograd keys (see _direct): through the registered autograd, its Python wrapper made
        # S's training step (B = 8, T = 50, H = 64; 1 thread, AMD EPYC Zen 4) 2-3.5% slower
        below = contextlib.nullcontext() if torch.is_grad_enabled() else _below_autograd()
        with below:
            da = torch.ops.lstmkit.linear(grad, weight.t(), None)
    dw = rows.t().mm(a.reshape(count, a.shape[-1])) if needs[1] else None
    db = rows.sum(0) if has_bias and needs[2] else None
    return da, dw, db


def _training_fake(x, h0, c0, w_ih, w_hh, *rest):
    steps, batch, _ = x.shape
    gates, hidden = w_hh.shape[0], c0.shape[-1]
    layernorm = rest[-2] == "layernorm"
    kept = (
        (steps, batch, gates),  # activated gates
        (steps, batch, hidden),  # every c_t
        (steps, batch, gates) if layernorm else (0,),  # LN_hh's normalised input
        (steps, batch, hidden) if layernorm else (0,),  # LN_c's normalised input
        (steps, batch, 2) if layernorm else (0,),  # 1 / std of both
        (steps, batch, gates) if layernorm else (0,),  # x W_ih^T
        (2, steps, batch, 1) if layernorm else (0,),  # its mean and 1 / std
    )
    out = x.new_empty(steps, batch, w_hh.shape[1])
    return out, torch.empty_like(h0), torch.empty_like(c0), *(x.new_empty(s) for s in kept)


def _training_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:15], output[0], *output[3:])
    ctx.kind, ctx.batch_sizes = inputs[15], list(inputs[16])
    ctx.set_materialize_grads(False)  # as lstmkit::recurrence's: unused outputs' stay None


def _training_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_kept):
    """lstmkit::training_forward's gradients: recurrence_backward from the kept values (dL/dxp,
    the states' and the step's parameters'), then the input half's from dL/dxp (layernorm: the
    input's layer norm backward first); with ``create_graph=True``, the reference equations'
    (as lstmkit::recurrence's)."""
    inputs, saved = ctx.saved_tensors[:15], ctx.saved_tensors[15:]
    x, h0, c0, w_ih, w_hh, b_ih, _, w_hr, w_ch, ln_ih_w, _, *ln_step = inputs
    output, gates, kept_cells, hhat, chat, rstd, products_ih, stats_ih = saved
    needs = ctx.needs_input_grad[:15]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        rerun = rerun_reference(
            cells.CELLS[ctx.kind], LAYER_NAMES, ctx.batch_sizes or None, Masks()
        )
        grads = reference_backward(rerun, inputs, (grad_output, grad_h_n, grad_c_n), needs)
        return *grads, None, None
    # layer norm's W_hh sees LN_hh's gradient of dL/dz: recurrence_backward takes its gradient
    layernorm = ctx.kind == "layernorm"
    dxp, dh0, dc0, dw_hh, dw_hr, dw_ch, dln_hh_w, dln_hh_b, dln_c_w, dln_c_b = (
        torch.ops.lstmkit.recurrence_backward(
            grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, w_ch, *ln_step, ctx.kind, None,
            None, None, 0.0, 0.0, output, gates, kept_cells, gates.new_empty(0), hhat, chat, rstd,
            ctx.batch_sizes, layernorm,
        )
    )  # fmt: skip
    if layernorm:  # xp = LN(x W_ih^T) + b_ih + b_hh: LN_ih's backward first
        # every shift and bias added to the pre-activations has the gradient sum(dL/dz)
        db = dln_ih_b = dln_hh_b
        # dxp (this backward's own buffer) becomes the gradient of x W_ih^T
        dln_ih_w = torch.ops.lstmkit.layer_norm_backward_(dxp, products_ih, stats_ih, ln_ih_w)
        dx, _, _ = _linear_gradients(dxp, x, w_ih, False, (needs[0], False, False))
        # W_ih's on the product kernel (W_hh's: recurrence_backward's, from LN_hh's gradient)
        dw_ih = torch.ops.lstmkit.weight_gradients(dxp, x, None, None)[0] if needs[3] else None
    else:
        dln_ih_w = dln_ih_b = None
        biases = needs[5] or needs[6]
        dx, _, db = _linear_gradients(dxp, x, w_ih, b_ih is not None, (needs[0], False, biases))
        # dL/dz is both products' (dxp): weight_gradients takes both weights' gradients on this
        # backend's product kernel, dL/dz^T transposed a block at a time for both. Training time
        # with it / with ATen's two GEMMs, alternated, on an AMD EPYC Zen 4, 1 thread: L 0.985,
        # M 0.98, S 0.96; 2 threads: L 1.00, M 0.96.
        dw_ih = dw_hh = None
        if needs[3] or needs[4]:
            dw_ih, dw_hh = torch.ops.lstmkit.weight_gradients(
                dxp, x if needs[3] else None, h0, output
            )
    grads = (dx, dh0, dc0, dw_ih, dw_hh, db, db, dw_hr, dw_ch, dln_ih_w, dln_ih_b, dln_hh_w,
             dln_hh_b, dln_c_w, dln_c_b)  # fmt: skip
    return *(g if n else None for g, n in zip(grads, needs, strict=True)), None, None


def _backward_fake(
    grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, w_ch, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
    kind, recurrent, zone_h, zone_c, zone_h_p, zone_c_p, output, gates, cells, cells_new, hhat,
    chat, rstd, batch_sizes, weight_hh_grad=True,
):  # fmt: skip
    weights = (w_hh if weight_hh_grad else None, w_hr, w_ch, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b)
    return (
        torch.empty_like(gates),  # dxp
        torch.empty_like(h0),
        torch.empty_like(c0),
        *(h0.new_empty(0) if w is None else torch.empty_like(w) for w in weights),
    )


def _weight_gradients_fake(dz, x, h0, output):
    gates = dz.shape[2]
    dw_ih = dz.new_empty(0) if x is None else dz.new_empty(gates, x.shape[2])
    return dw_ih, dz.new_empty(0) if h0 is None else dz.new_empty(gates, h0.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    xp, h0, c0, *weights = inputs[:10]
    kind, recurrent, zone_h, zone_c, zone_h_p, zone_c_p, batch_sizes, _ = inputs[10:]
    ctx.save_for_backward(xp, h0, c0, *weights, recurrent, zone_h, zone_c, *output[:1], *output[3:])
    ctx.kind, ctx.zone_p, ctx.batch_sizes = kind, (zone_h_p, zone_c_p), list(batch_sizes)
    # the saved outputs have no gradient; unused outputs' gradients stay None (the backward
    # operator takes them as optional) instead of zeros of (T, B, 4H) filled at every backward
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_saved):
    xp, h0, c0, *weights = ctx.saved_tensors[:10]
    recurrent, zone_h, zone_c, output, *saved = ctx.saved_tensors[10:]
    needs = ctx.needs_input_grad[:10]
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        grads = reference_backward(
            _rerun(ctx.kind, ctx.batch_sizes, recurrent, (zone_h, zone_c), ctx.zone_p),
            (xp, h0, c0, *weights),
            (grad_output, grad_h_n, grad_c_n),
            needs,
        )
    else:
        grads = torch.ops.lstmkit.recurrence_backward(
            grad_output, grad_h_n, grad_c_n, h0, c0, *weights, ctx.kind, recurrent, zone_h,
            zone_c, *ctx.zone_p, output, *saved, ctx.batch_sizes,
        )  # fmt: skip
    return *(g if n else None for g, n in zip(grads, needs, strict=True)), *[None] * 8


def _rerun(kind: str, batch_sizes: list[int], recurrent, zones, zone_p):
    """``(xp, h0, c0, *weights) -> (output, h_n, c_n)`` by the reference equations, with the
    masks that the operator received (zoneout's as 0 / 1 or as the probability)."""
    zoneout = [
        (zone.bool() if zone is not None else p or None)
        for zone, p in zip(zones, zone_p, strict=True)
    ]
    masks = Masks(recurrent, *zoneout)
    return rerun_reference(cells.CELLS[kind], NAMES, batch_sizes or None, masks, reference.recur)


def _below_autograd():
    """The dispatcher's guard for "autograd is handled": a custom operator called inside it
    runs its kernel, skipping its registered autograd (what torch.library's wrapper does)."""
    return torch._C._AutoDispatchBelowAutograd()


def _direct(name: str, setup_context, backward) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` that calls ``torch.ops.lstmkit.<name>``'s kernel with the
    autograd formula :func:`_register` gives that operator (its ``setup_context`` and
    ``backward``): what :func:`run` calls to train outside ``torch.compile`` and
    ``torch.export``. Above the kernel's own time (training_forward, B = 8, T = 50, H = 64; AMD
    EPYC Zen 4, 1 thread, medians of 1000 interleaved calls), a call through the operator's
    registration costs 245 us: torch.library's wrapper rebuilds the schema's argument list once
    per argument (``torch._library.utils.fill_defaults``, torch 2.13) and passes through Python
    on its way to the kernel even with autograd off. This function calls the kernel below the
    autograd dispatch keys, as that wrapper does in the end, in the ``forward(ctx, ...)`` form:
    45 us. With a separate ``setup_context`` it cost 110 us (``torch.autograd.Function.apply``
    binds the arguments to ``forward``'s signature by ``inspect`` at every call). That form is
    what ``torch.func``'s transforms need; :func:`refusal` keeps this backend out of them."""

    def forward(ctx, *args):
        with _below_autograd():
            result = getattr(torch.ops.lstmkit, name)(*args)
        setup_context(ctx, args, result)
        return result

    return type(
        f"Direct_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


_TrainingForward = _direct("training_forward", _training_setup_context, _training_backward)
_Recurrence = _direct("recurrence", _setup_context, _backward)


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """A cell of a kind in :data:`KINDS`, with any regulariser."""
    return cell.kind in KINDS


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
    """Why this backend cannot run a layer on ``x`` with ``params`` now, or ``None``."""
    if not x.is_cpu:
        return f"it runs on the CPU, got a {x.device.type} input"
    if x.dtype not in DTYPES:
        return f"it runs float32 and float64, got {x.dtype}"
    if torch.is_autocast_enabled("cpu"):
        return "inside torch.autocast"
    ok, why = available()
    if not ok:
        return why
    if torch.compiler.is_compiling():  # the compiler sees the operator through its fake
        return None
    return opaque_refusal((x, *params.values()))


def run(
    cell: cells.Cell,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    params: cells.Params,
    batch_sizes: list[int] | None,
    masks,
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`lstmkit.backends.contract.Backend.run`: float32 inference in one operator call;
    else the cell's input half, then one recurrence call, which keeps what the backward needs
    only when autograd will differentiate it."""
    (zone_h, zone_h_p), (zone_c, zone_c_p) = (
        _zone(z, x) for z in (masks.zoneout_h, masks.zoneout_c)
    )
    training = needs_backward((x, h, c, *params.values()))
    drawn = (masks.recurrent, zone_h, zone_c)  # training masks
    if not training and x.dtype == torch.float32 and all(m is None for m in drawn):
        return _infer(cell, x, h, c, params, (zone_h_p, zone_c_p), batch_sizes)
    masked = any(m is not None for m in drawn) or zone_h_p or zone_c_p
    # as runner.choose_backend sees tracing: the tracer takes the registered operators
    direct = training and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
    if x.dtype == torch.float32 and not masked:
        weights = [params.get(name) for name in LAYER_NAMES]
        forward = _TrainingForward.apply if direct else torch.ops.lstmkit.training_forward
        output, h_n, c_n, *_ = forward(x, h, c, *weights, cell.kind, batch_sizes or [])
        return output, h_n, c_n
    xp = _input_half(cell, x, params)  # (T, B, GH)
    weights = [params.get(name) for name in NAMES]
    forward = _Recurrence.apply if direct else torch.ops.lstmkit.recurrence
    output, h_n, c_n, *_ = forward(
        xp, h, c, *weights, cell.kind, masks.recurrent, zone_h, zone_c, zone_h_p, zone_c_p,
        batch_sizes or [], training,
    )  # fmt: skip
    return output, h_n, c_n


def infer_stack(
    cell: cells.Cell,
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    layers: list[cells.Params],
    zoneout: tuple[float, float],
    directions: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """float32 inference of a stack of layers of ``directions`` directions
    (:func:`lstmkit.runner.infer_stack` decides where) in one call of
    ``lstmkit::inference_stack``: each layer on the output of the one below (a bidirectional
    layer's two directions side by side, the second reversed in time), layer-direction ``k``
    (``layers[k]``) from its state ``h0[k]``, ``c0[k]`` (zeros where both are ``None``), with
    zoneout's evaluation probabilities ``zoneout``. Returns the top layer's output and the final
    states ``(L D, B, *)``."""
    weights = [params.get(name) for params in layers for name in LAYER_NAMES]
    # the overload itself: the packet's Python __call__ is one more frame (~4 us when cold)
    return torch.ops.lstmkit.inference_stack.default(
        x, h0, c0, weights, cell.kind, *zoneout, directions
    )


def library() -> ModuleType | None:
    """The loaded library's Python module, ``lstmkit_native`` (``csrc/entry.cpp``), loading it
    first as :func:`available` does; ``None`` where it is not available."""
    if _status is None:
        available()
    return _library


class MemoryPool(NamedTuple):
    """The training buffers' pool (:func:`memory_pool`), in bytes."""

    limit: int  # what it may keep in freed blocks
    kept: int  # what it keeps now, freed and waiting for reuse
    in_use: int  # its blocks that tensors hold now


def memory_pool(limit: int | None = None) -> MemoryPool:
    """The pool that this backend's training buffers (every step's gates and cell states, their
    gradients; 1 MB each and up) come from, and with ``limit`` its new limit in bytes.

    A block freed by a tensor stays in the pool, its memory pages with it, for the next request
    of about its size, where glibc would give any block over 32 MB back to the kernel and the
    next step's first touch of each page would fault (150 ms of a 1.19 s layernorm training
    step at B = 64, T = 100, H = 512 on an AMD EPYC Zen 4). The pool keeps memory only, never
    values. It keeps at most ``limit`` bytes (at first an eighth of the machine's memory, at most
    1 GiB), giving back the blocks freed longest ago first; ``limit=0`` turns it off and gives
    back everything it keeps, as does :func:`empty_cache` (without turning it off).

    Returns the pool's state before ``limit`` is set (zeros where the backend is unavailable).

    Raises:
        ValueError: ``limit`` is not a whole number of bytes, 0 or more.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a whole number of bytes >= 0 or None, got {limit!r}")
    native = library()
    if native is None:
        return MemoryPool(0, 0, 0)
    state = MemoryPool(native.pool_limit(), native.pool_kept(), native.pool_in_use())
    if limit is not None:
        native.pool_limit(limit)
    return state


def empty_cache() -> int:
    """Give back to the C library every block the training buffers' pool (:func:`memory_pool`)
    keeps, as ``torch.cuda.empty_cache`` does for CUDA's; returns how many bytes. The pool goes
    on with its limit."""
    limit, kept, _ = memory_pool(0)
    memory_pool(limit)
    return kept


def _infer(cell, x, h, c, params, zoneout: tuple[float, float], batch_sizes: list[int] | None):
    """One layer-direction's float32 inference: one call of the inference operator."""
    weights = [params.get(name) for name in LAYER_NAMES]
    return torch.ops.lstmkit.inference(x, h, c, *weights, cell.kind, *zoneout, batch_sizes or [])


def _input_half(cell: cells.Cell, x: Tensor, params: cells.Params) -> Tensor:
    """The cell's input half; where it is the plain ``x W_ih^T + b_ih + b_hh`` in float32 over
    :data:`LINEAR_MIN_ROWS` rows or more, on this backend's product kernel (``lstmkit::linear``):
    MKL's GEMM took 1.2-1.6x as long on an AMD EPYC Zen 4 at 1 thread, 1.07-1.18x at 2 (6400 x
    512 x 2048 and 3200 x 256 x 1024, and the shapes of their gradient by the input)."""
    rows = x.numel() // max(x.shape[-1], 1)
    # a cell's kind names its equations, input half included (lstmkit.cells.Cell): every kind
    # but layernorm has the plain one
    if x.dtype != torch.float32 or cell.kind == "layernorm" or rows < LINEAR_MIN_ROWS:
        return cell.project_input(x, params)
    b_ih, b_hh = params["bias_ih"], params["bias_hh"]
    bias = None if b_ih is None else b_ih + b_hh
    return torch.ops.lstmkit.linear(x, params["weight_ih"], bias)


def _zone(zone: Tensor | float | None, like: Tensor) -> tuple[Tensor | None, float]:
    """A zoneout mask as the operator takes it: the training mask as 0 / 1 in ``like``'s dtype,
    or the evaluation probability."""
    if isinstance(zone, Tensor):
        return zone.to(like.dtype), 0.0
    return None, zone or 0.0
