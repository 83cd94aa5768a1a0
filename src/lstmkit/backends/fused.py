"""The fused backend: a whole layer-direction as one ``torch.autograd.Function`` with a
hand-written backward (back-propagation through time).

Forward: the input projection for all steps is one matrix product; each step then adds one
recurrent product into its row of a preallocated gate buffer, applies the activations in
place and writes the cell state and output into preallocated buffers. Backward walks time in
reverse computing only the gate gradients and ``dh = dgates W_hh``; every weight gradient, the
bias gradient and the input gradient are then one matrix product or sum over all steps.

Inside this module the four gate blocks are kept in the order (i, f, o, g) instead of
``torch.nn.LSTM``'s (i, f, g, o), so that the three sigmoid gates are one contiguous block and
the activations are two operations per step. Weights are reordered on the way in (cached per
parameter) and gradients on the way out.

Pure tensor operations: the same code runs on CUDA tensors; on the CPU the products go to
oneDNN where that is faster (:mod:`lstmkit.backends.matmul`). Finished sequences
(``batch_sizes``) are row suffixes, so each step works on the running prefix of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import matmul


def _to_ifog(w: Tensor) -> Tensor:
    """Reorder the gate blocks (dim 0) from (i, f, g, o) to (i, f, o, g)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, f, o, g])


def _from_ifog(w: Tensor) -> Tensor:
    """Reorder the gate blocks (dim 0) from (i, f, o, g) back to (i, f, g, o)."""
    i, f, o, g = w.chunk(4, 0)
    return torch.cat([i, f, g, o])


def _ifog_transposed(w: Tensor) -> Tensor:
    return _to_ifog(w).t()


def _weight(param: Tensor, transform, rows: int) -> matmul.Weight:
    """``transform(param)`` ready for products with ``rows``-row inputs; the transformed and
    packed matrices are cached per parameter version, so a step reuses them."""
    w = matmul.cached(param, transform, transform)
    packed = None
    if matmul.uses_onednn(rows, w):
        packed = matmul.cached(param, (transform, rows), lambda p: matmul.pack(transform(p), rows))
    return matmul.Weight(w, rows, packed)


def _last_step(batch_sizes: list[int] | None, steps: int, batch: int, device) -> Tensor:
    """``(B,)`` index of each sequence's last step."""
    if batch_sizes is None:
        return torch.full((batch,), steps - 1, device=device)
    counts = torch.tensor(batch_sizes).unsqueeze(0) > torch.arange(batch).unsqueeze(1)  # (B, T)
    return (counts.sum(1) - 1).to(device)


class FusedLSTM(torch.autograd.Function):
    """One LSTM layer-direction over a whole sequence; see the module docstring."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
        steps, batch, _ = x.shape
        hidden = w_hh.size(0) // 4
        out_size = w_hh.size(1)
        sizes = batch_sizes or [batch] * steps
        # Gate buffer: the input half for every step at once, (T, B, 4H) in (i, f, o, g) order.
        w_in = matmul.cached(w_ih, _to_ifog, _to_ifog)
        gates = matmul.mm(x.reshape(steps * batch, x.size(2)), w_in.t())
        if b_ih is not None:
            gates.add_(_to_ifog(b_ih + b_hh))
        gates = gates.view(steps, batch, 4 * hidden)
        # Rows of finished sequences are never written; those read after the loop are zeroed.
        new = x.new_zeros if batch_sizes else x.new_empty
        cell = x.new_empty(steps, batch, hidden)  # c_t
        tanh_cell = new(steps, batch, hidden)  # tanh(c_t)
        output = new(steps, batch, out_size)  # h_t, zero once a sequence has finished
        # o * tanh(c) before the projection; without one it is the output itself
        hidden_seq = new(steps, batch, hidden) if w_hr is not None else output
        recurrent = _weight(w_hh, _to_ifog, batch)
        project = matmul.Weight(w_hr, batch) if w_hr is not None else None

        h, c = h0, c0
        for t, n in enumerate(sizes):
            g = gates[t, :n]  # (n, 4H)
            recurrent(h[:n], add=g, out=g)
            g[:, : 3 * hidden].sigmoid_()
            g[:, 3 * hidden :].tanh_()
            i, f, o, cand = g.split(hidden, 1)
            c_t, tc_t, m_t = cell[t, :n], tanh_cell[t, :n], hidden_seq[t, :n]
            torch.mul(f, c[:n], out=c_t)
            c_t.addcmul_(i, cand)
            torch.tanh(c_t, out=tc_t)
            torch.mul(o, tc_t, out=m_t)
            if project is not None:
                project(m_t, out=output[t, :n])
            h, c = output[t], cell[t]

        last = _last_step(batch_sizes, steps, batch, x.device)
        rows = torch.arange(batch, device=x.device)
        h_n, c_n = output[last, rows], cell[last, rows]  # (B, P), (B, H): copies
        ctx.batch_sizes = sizes
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, gates, cell, tanh_cell, output)
        ctx.has_bias = b_ih is not None
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused backend's backward is not itself differentiable (create_graph=True, "
                "double backward); use LSTM(..., backend='reference') for higher-order gradients"
            )
        x, h0, c0, w_ih, w_hh, w_hr, gates, cell, tanh_cell, output = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = cell.size(2)
        sizes = ctx.batch_sizes
        # The state gradients flowing back in time start as those of (h_n, c_n): a finished
        # sequence's rows wait untouched until the step where it ended.
        dh = grad_h_n.clone() if grad_h_n is not None else h0.new_zeros(h0.shape)
        dc = grad_c_n.clone() if grad_c_n is not None else c0.new_zeros(c0.shape)
        if grad_output is None:
            grad_output = output.new_zeros(output.shape)
        dgates = torch.zeros_like(gates)  # (T, B, 4H) in (i, f, o, g) order
        dh_seq = grad_output.new_zeros(grad_output.shape) if w_hr is not None else None
        back = _weight(w_hh, _ifog_transposed, batch)
        unproject = matmul.Weight(w_hr.t(), batch) if w_hr is not None else None
        grad = torch.ops.aten

        for t in range(steps - 1, -1, -1):
            n = sizes[t]
            g, dg = gates[t, :n], dgates[t, :n]
            i, f, o, cand = g.split(hidden, 1)
            di, df, do, dcand = dg.split(hidden, 1)
            tc = tanh_cell[t, :n]
            c_prev = cell[t - 1, :n] if t > 0 else c0[:n]
            dh_t = dh[:n].add_(grad_output[t, :n])  # (n, P)
            if unproject is not None:
                dh_seq[t, :n] = dh_t
                dh_t = unproject(dh_t)  # (n, H): gradient of o * tanh(c)
            dc_t = dc[:n].add_(grad.tanh_backward(dh_t * o, tc))
            torch.mul(dh_t, tc, out=do)
            torch.mul(dc_t, cand, out=di)
            torch.mul(dc_t, c_prev, out=df)
            torch.mul(dc_t, i, out=dcand)
            grad.sigmoid_backward(
                dg[:, : 3 * hidden], g[:, : 3 * hidden], grad_input=dg[:, : 3 * hidden]
            )
            grad.tanh_backward(dcand, cand, grad_input=dcand)
            dc_t.mul_(f)
            back(dg, out=dh[:n])

        flat = dgates.view(steps * batch, 4 * hidden)
        needs = ctx.needs_input_grad
        dx = (
            matmul.mm(flat, matmul.cached(w_ih, _to_ifog, _to_ifog)).view(x.shape)
            if needs[0]
            else None
        )
        dw_ih = (
            _from_ifog(matmul.mm(flat.t(), x.reshape(steps * batch, x.size(2))))
            if needs[3]
            else None
        )
        dw_hh = None
        if needs[4]:
            h_prev = torch.cat([h0.unsqueeze(0), output[:-1]]).view(steps * batch, h0.size(1))
            dw_hh = _from_ifog(matmul.mm(flat.t(), h_prev))
        db = _from_ifog(flat.sum(0)) if ctx.has_bias else None
        dw_hr = None
        if w_hr is not None and needs[7]:
            o = gates[..., 2 * hidden : 3 * hidden]
            m = (o * tanh_cell).view(steps * batch, hidden)
            dw_hr = matmul.mm(dh_seq.view(steps * batch, h0.size(1)).t(), m)
        return (
            dx,
            dh if needs[1] else None,
            dc if needs[2] else None,
            dw_ih,
            dw_hh,
            db if needs[5] else None,
            db.clone() if needs[6] else None,
            dw_hr,
            None,
        )


def run(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: cells.LSTMWeights,
    batch_sizes: list[int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`lstmkit.backends.reference.run`."""
    return FusedLSTM.apply(x, h, c, *weights, batch_sizes)
