"""The native backend: a layer-direction's whole time loop in C++, forward and hand-written
backward, as the custom operators ``torch.ops.lstmkit.lstm_forward`` and
``torch.ops.lstmkit.lstm_backward`` (``csrc/lstm.cpp``).

Python adds what makes them behave like any PyTorch operator: a fake (shape-only)
implementation of each, for ``torch.compile`` and ``torch.export``, and the forward's autograd
formula, which calls the backward operator. When autograd asks for higher-order gradients
(``create_graph=True``) the formula differentiates the reference equations instead
(:func:`lstmkit.backends.common.reference_backward`), as the fused backend does.

The operators are compiled once per machine and cached (:mod:`.build`); they are loaded the
first time a process asks whether this backend is :func:`available`. Where they cannot be
built, the backend says why and ``backend="auto"`` runs the Python backends.

Runs the standard LSTM cell (``lstmkit.cells.LSTM``) with or without projection, lengths,
given state and biases, in float32 and float64 on the CPU, without in-loop regularisers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends.common import (
    needs_backward,
    opaque_refusal,
    reference_backward,
    rerun_reference,
)
from lstmkit.backends.contract import NO_MASKS, Masks
from lstmkit.backends.native import build

KINDS = frozenset({"lstm"})  # of the cells this backend runs
NAMES = cells.NN_PARAMETERS
DTYPES = (torch.float32, torch.float64)

_status: tuple[bool, str] | None = None  # (available, how it was loaded or why not)


# Under torch.compile the answer is taken as a constant: dynamo calls the function instead of
# tracing the build (files, hashes, subprocesses) it may run the first time.
@torch.compiler.assume_constant_result
def available() -> tuple[bool, str]:
    """``(True, how the operators were loaded)`` or ``(False, why not)``. The first call in a
    process loads the compiled operators, building them if this machine has no cached build
    (``LSTMKIT_NATIVE=0`` in the environment forces ``False``)."""
    global _status
    if _status is None:
        ok, what = build.load()
        if ok:
            _register()
        _status = ok, what
    return _status


def _register() -> None:
    """The fake implementations and the autograd formula of the loaded operators."""
    torch.library.register_fake("lstmkit::lstm_forward", _forward_fake)
    torch.library.register_fake("lstmkit::lstm_backward", _backward_fake)
    torch.library.register_autograd(
        "lstmkit::lstm_forward", _backward, setup_context=_setup_context
    )


def _forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, training):
    steps, batch = x.shape[:2]
    gate_rows, proj = w_hh.shape  # (4H, P)
    hidden = gate_rows // 4
    return (
        x.new_empty(steps, batch, proj),  # output
        x.new_empty(batch, proj),  # h_n
        x.new_empty(batch, hidden),  # c_n
        x.new_empty(steps, batch, gate_rows) if training else x.new_empty(0),  # gates
        x.new_empty(steps, batch, hidden) if training else x.new_empty(0),  # cell states
    )


def _backward_fake(
    grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, output, gates, cell_states,
    batch_sizes, has_bias, input_grad,
):  # fmt: skip
    return (
        torch.empty_like(x) if input_grad else x.new_empty(0),
        torch.empty_like(h0),
        torch.empty_like(c0),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        x.new_empty(w_hh.size(0)) if has_bias else x.new_empty(0),
        x.new_empty(0) if w_hr is None else torch.empty_like(w_hr),
    )


def _setup_context(ctx, inputs, output) -> None:
    *tensors, batch_sizes, _ = inputs  # x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
    out, _, _, gates, cell_states = output
    ctx.save_for_backward(*tensors, out, gates, cell_states)
    ctx.batch_sizes = list(batch_sizes)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    *inputs, out, gates, cell_states = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        rerun = rerun_reference(cells.CELLS["lstm"], NAMES, ctx.batch_sizes or None, NO_MASKS)
        grads = (grad_output, grad_h_n, grad_c_n)
        return *reference_backward(rerun, inputs, grads, needs[:8]), None, None
    x, h0, c0, w_ih, w_hh, b_ih, _, w_hr = inputs
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = torch.ops.lstmkit.lstm_backward(
        grad_output, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, out, gates, cell_states,
        ctx.batch_sizes, b_ih is not None, needs[0],
    )  # fmt: skip
    return (
        dx if needs[0] else None,
        dh0 if needs[1] else None,
        dc0 if needs[2] else None,
        dw_ih if needs[3] else None,
        dw_hh if needs[4] else None,
        db if needs[5] else None,
        db.clone() if needs[6] else None,
        dw_hr if needs[7] else None,
        None,
        None,
    )


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """A cell of a kind in :data:`KINDS` without recurrent dropout or zoneout (weight drop is
    applied to the weights before the loop)."""
    return cell.kind in KINDS and not masks.active()


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
    """Why this backend cannot run a layer on ``x`` with ``params`` now, or ``None``."""
    if x.device.type != "cpu":
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
    """Same contract as :func:`lstmkit.backends.reference.run`; one operator call. The forward
    keeps what the backward needs only when autograd will differentiate it."""
    tensors = (x, h, c, *(params[name] for name in NAMES))
    training = needs_backward(tensors)
    output, h_n, c_n, _, _ = torch.ops.lstmkit.lstm_forward(*tensors, batch_sizes or [], training)
    return output, h_n, c_n
