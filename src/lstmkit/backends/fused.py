"""The fused backend: a whole layer-direction as one ``torch.autograd.Function`` with a
hand-written backward (back-propagation through time).

Forward: step ``t`` is one matrix product ``[x_t, h_{t-1}] @ [W_ih, W_hh].T + b``, followed
by in-place element-wise updates of its output; ``h_t`` is
written straight into the next step's input row. Backward walks time in reverse computing
only the gate gradients and ``dh = dgates W_hh``; the gradients of both weight matrices are
then ONE product over all steps, the input gradient another, the bias gradient one sum.

Three layout choices, each measured (``docs/performance.md``):

- One product per step over the concatenated ``[x_t, h_{t-1}]`` instead of a separate input
  projection for all steps followed by a recurrent product per step: on the CPU the per-step
  products run near the matmul peak while the one huge projection does not.
- The gate blocks are kept in the order (i, f, o, g) instead of ``torch.nn.LSTM``'s (i, f, g, o)
  and the rows of the g block are doubled in the forward product, so that ONE sigmoid over the
  whole gate row serves all four gates: ``tanh(z) = 2 sigmoid(2 z) - 1``. The cell state's
  tanh is kept as ``s_t = sigmoid(-2 c_t) = (1 - tanh(c_t)) / 2``, which makes
  ``h_t = o_t - 2 o_t s_t`` one operation. PyTorch's CPU ``tanh`` is several times slower than
  its ``sigmoid``.
- Finished sequences (``batch_sizes``) are row suffixes, so each step works on the running
  prefix of the batch, and rows that are never written stay zero.

Weights are reordered (and packed for oneDNN, :mod:`lstmkit.backends.matmul`) at every call,
from the values the call is given; gradients are reordered back on the way out. When autograd
asks for higher-order gradients (``create_graph=True``), the backward differentiates the
reference equations instead (:func:`lstmkit.backends.common.reference_backward`). Pure tensor
operations: the same code runs on CUDA tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import fused_cells, matmul
from lstmkit.backends.common import (
    autocast_off,
    cast,
    last_step,
    needs_backward,
    opaque_refusal,
    reference_backward,
    rerun_reference,
    running_rows,
    step_weight,
)
from lstmkit.backends.contract import Masks

# d(activation) from its output; resolved overloads: torch.ops.aten.<op>(...) costs ~3 us more
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default
_sigmoid_backward_into = torch.ops.aten.sigmoid_backward.grad_input
_tanh_backward_into = torch.ops.aten.tanh_backward.grad_input


def _ifog(w: Tensor) -> Tensor:
    """Reorder the gate blocks (dim 0) from (i, f, g, o) to (i, f, o, g)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, f, o, g])


def _ifgo(w: Tensor) -> Tensor:
    """Reorder the gate blocks (dim 0) from (i, f, o, g) back to (i, f, g, o)."""
    i, f, o, g = w.chunk(4, 0)
    return torch.cat([i, f, g, o])


def _doubled_cell_gate(w: Tensor) -> Tensor:
    """``_ifog(w)`` with the g block doubled: sigmoid of it gives ``(tanh + 1) / 2``."""
    w = _ifog(w)
    w[3 * (w.size(0) // 4) :] *= 2
    return w


def _back_weight(w_hh: Tensor, rows: int) -> matmul.Weight:
    """``dgates -> dgates @ W_hh`` with ``dgates`` in (i, f, o, g) order."""
    return matmul.Weight(_ifog(w_hh).t().contiguous(), rows)


class FusedLSTM(torch.autograd.Function):
    """One LSTM layer-direction over a whole sequence; see the module docstring."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, training, dtype, rerun):
        steps, batch, inp = x.shape
        hidden, out_size = w_hh.size(0) // 4, w_hh.size(1)
        sizes = batch_sizes or [batch] * steps
        step = step_weight(w_ih, w_hh, b_ih, b_hh, batch, _doubled_cell_gate, dtype)
        project = None if w_hr is None else matmul.Weight(cast(w_hr, dtype), batch)

        # Rows of finished sequences are never written again; where there are any, buffers
        # start zeroed, so those rows read as zero (outputs past a sequence's end).
        new = x.new_zeros if batch_sizes else x.new_empty
        # xh[t] = [x_t, h_{t-1}], the input of step t's product; step t writes h_t into xh[t + 1].
        xh = new(steps + 1, batch, inp + out_size)
        xh[:steps, :, :inp] = x
        xh[0, :, inp:] = h0
        # Backward needs every step's gates and cell state; inference only the latest ones.
        kept = steps if training else 1
        gates = []  # in training, each step's activated gates, (n, 4H) in (i, f, o, g) order
        cell = x.new_empty(steps if training else 2, batch, hidden)  # c_t
        sig_cell = new(kept, batch, hidden)  # s_t = sigmoid(-2 c_t) = (1 - tanh(c_t)) / 2
        m = x.new_empty(batch, hidden) if project is not None else None  # o * tanh(c)
        one, two = x.new_tensor(1.0), x.new_tensor(2.0)  # 0-d: cheaper than Python scalars

        # Per-step views, made before the loop: at small sizes indexing inside the loop costs
        # more than the math. Inference alternates two cell slots and reuses one for s_t.
        slots = range(steps) if training else [0] * steps
        c_slots = range(steps) if training else [t % 2 for t in range(steps)]
        cs = running_rows(cell.unbind(0), c_slots, sizes)
        c_prev = running_rows((c0, *(cell[k] for k in c_slots[:-1])), range(steps), sizes)
        per_step = zip(
            running_rows(xh.unbind(0), range(steps), sizes),  # [x_t, h_{t-1}]
            cs,
            c_prev,
            running_rows(sig_cell.unbind(0), slots, sizes),
            running_rows(xh[:, :, inp:].unbind(0), range(1, steps + 1), sizes),  # h_t
            strict=True,
        )
        for x_t, c_t, c_prev_t, s_t, h_t in per_step:
            # The product allocates its own output: copying it into a preallocated (T, B, 4H)
            # buffer cost 10-35 us a step at B=32, H=256, more than the allocation and views.
            g = step(x_t).sigmoid_()  # (n, 4H)
            i_t, f_t, o_t, cand_t = g.split(hidden, 1)
            cand_t.mul_(two).sub_(one)  # tanh of the g pre-activation
            torch.mul(f_t, c_prev_t, out=c_t)
            c_t.addcmul_(i_t, cand_t)
            torch.mul(c_t, -two, out=s_t).sigmoid_()
            if project is None:
                torch.addcmul(o_t, o_t, s_t, value=-2, out=h_t)  # o * tanh(c)
            else:
                project(torch.addcmul(o_t, o_t, s_t, value=-2, out=m[: h_t.size(0)]), out=h_t)
            if training:
                gates.append(g)

        last = last_step(batch_sizes, steps, batch, x.device)
        rows = torch.arange(batch, device=x.device)
        h_n = xh[last + 1, rows, inp:]  # (B, P), a copy
        c_n = cell[last if training else last % 2, rows]  # (B, H), a copy
        ctx.batch_sizes = sizes
        ctx.batch_sizes_given = batch_sizes is not None
        ctx.has_bias = b_ih is not None
        ctx.rerun = rerun
        if training:
            inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
            ctx.save_for_backward(*inputs, xh, cell, sig_cell, *gates)
        return xh[1:, :, inp:].contiguous(), h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        inputs, (xh, cell, sig_cell, *gates) = ctx.saved_tensors[:8], ctx.saved_tensors[8:]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = (grad_output, grad_h_n, grad_c_n)
            return *reference_backward(ctx.rerun, inputs, grads, ctx.needs_input_grad[:8]), *(
                (None,) * 4
            )
        _, _, c0, w_ih, w_hh, _, _, w_hr = inputs
        steps, batch, hidden = cell.shape
        inp = w_ih.size(1)
        # The state gradients flowing back in time start as those of (h_n, c_n): a finished
        # sequence's rows wait untouched until the step where it ended.
        dh = grad_h_n.clone() if grad_h_n is not None else xh.new_zeros(batch, w_hh.size(1))
        dc = grad_c_n.clone() if grad_c_n is not None else c0.new_zeros(c0.shape)
        if grad_output is None:
            grad_output = xh.new_zeros(steps, batch, w_hh.size(1))
        # Every step writes all its running rows: only finished sequences' rows need zeros
        # (zeroing 16 MB costs ~2 ms at B=32, T=128, H=256).
        new = xh.new_zeros if ctx.batch_sizes_given else xh.new_empty
        dgates = new(steps, batch, 4 * hidden)  # gradients of the pre-activations, (i, f, o, g)
        back = _back_weight(w_hh, batch)
        unproject = projected = None
        if w_hr is not None:
            unproject = matmul.Weight(w_hr.t(), batch)
            dh_seq = new(steps, batch, w_hh.size(1))  # gradient of each h_t
            projected = new(steps, batch, hidden)  # o * tanh(c), the projection's input

        # Per-step views (running rows only), made before the loop.
        sizes, every = ctx.batch_sizes, range(steps)
        dgs, di_s, df_s, do_s, dcand_s, ss, grads, dhs, dcs = (
            running_rows(buffer, every, sizes)
            for buffer in (
                dgates.unbind(0),
                *(block.unbind(0) for block in dgates.split(hidden, 2)),  # i, f, o, g
                sig_cell.unbind(0),
                grad_output.unbind(0),
                [dh] * steps,
                [dc] * steps,
            )
        )
        c_prevs = running_rows((c0, *cell[:-1].unbind(0)), every, sizes)
        for t in range(steps - 1, -1, -1):
            g, s_t = gates[t], ss[t]
            i, f, o, cand = g.split(hidden, 1)
            dg, di, df, do, dcand = dgs[t], di_s[t], df_s[t], do_s[t], dcand_s[t]
            dh_t, dc_t, grad_t, c_prev_t = dhs[t], dcs[t], grads[t], c_prevs[t]
            dh_t.add_(grad_t)  # (n, P): everything that reaches h_t
            dm = dh_t  # gradient of o * tanh(c_t)
            if unproject is not None:
                n = dh_t.size(0)
                dh_seq[t, :n] = dh_t
                torch.addcmul(o, o, s_t, value=-2, out=projected[t, :n])
                dm = unproject(dh_t)  # (n, H)
            dc_t.add_(_sigmoid_backward(dm * o, s_t), alpha=4)  # 1 - tanh^2 = 4 s (1 - s)
            torch.addcmul(dm, dm, s_t, value=-2, out=do)  # dm * tanh(c)
            torch.mul(dc_t, cand, out=di)
            torch.mul(dc_t, c_prev_t, out=df)
            torch.mul(dc_t, i, out=dcand)
            sig, dsig = g[:, : 3 * hidden], dg[:, : 3 * hidden]
            _sigmoid_backward_into(dsig, sig, grad_input=dsig)
            _tanh_backward_into(dcand, cand, grad_input=dcand)
            dc_t.mul_(f)
            back(dg, out=dh_t)

        needs = ctx.needs_input_grad
        flat = dgates.view(steps * batch, 4 * hidden)
        dw = _ifgo(matmul.mm_t(flat, xh[:steps].view(steps * batch, xh.size(2))))  # (4H, I + P)
        dx = None
        if needs[0]:
            dx = matmul.mm(flat, _ifog(w_ih)).view(steps, batch, inp)
        db = _ifgo(flat.sum(0)) if ctx.has_bias else None
        dw_hr = None
        if unproject is not None and needs[7]:
            dw_hr = matmul.mm_t(
                dh_seq.view(steps * batch, dh_seq.size(2)), projected.view(steps * batch, hidden)
            )
        return (
            dx,
            dh if needs[1] else None,
            dc if needs[2] else None,
            dw[:, :inp] if needs[3] else None,
            dw[:, inp:] if needs[4] else None,
            db if needs[5] else None,
            db.clone() if needs[6] else None,
            dw_hr,
            None,
            None,
            None,
            None,
        )


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """The cells of kind lstm, layernorm and peephole with any regulariser (weight drop is
    applied to the weights before the loop; the rest by :mod:`lstmkit.backends.fused_cells`)."""
    return fused_cells.supports(cell, masks)


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
    """Why this backend cannot run a layer on ``x`` with ``params`` now (a ``torch.func``
    transform, forward-mode AD, ``torch.jit.trace``: :func:`common.opaque_refusal`), or
    ``None``; its sizes and dtypes never stop it."""
    return opaque_refusal((x, *params.values()))


# Dynamo cannot trace the Functions' bodies (oneDNN ops, Python loops over per-step views):
# without this it breaks the graph several times inside them and warns. Under torch.compile
# the runner's "auto" picks the reference backend, which dynamo traces whole; an explicit
# backend="fused" stays one clean graph break per layer-direction that runs eagerly.
@torch.compiler.disable
def run(
    cell: cells.Cell,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    params: cells.Params,
    batch_sizes: list[int] | None,
    masks: Masks,
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`lstmkit.backends.contract.Backend.run`: :class:`FusedLSTM` for a cell of kind
    lstm without in-loop regularisers, :mod:`lstmkit.backends.fused_cells` for everything
    else.

    Inside ``torch.autocast`` the forward's matrix products take operands in the autocast
    dtype, as the reference backend's do (:func:`lstmkit.cells.linear`); everything else,
    backward included, runs in float32, with autocast itself off."""
    dtype = cells.autocast_dtype(x)
    with autocast_off(x):
        if cell.kind != "lstm" or masks.active():
            return fused_cells.run(cell, x, h, c, params, batch_sizes, masks, dtype)
        tensors = (x, h, c, *(params[name] for name in cells.NN_PARAMETERS))
        rerun = rerun_reference(cell, cells.NN_PARAMETERS, batch_sizes, masks)
        return FusedLSTM.apply(*tensors, batch_sizes, needs_backward(tensors), dtype, rerun)
