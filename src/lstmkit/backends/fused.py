"""The fused backend: a whole layer-direction of a cell of kind ``lstm``, ``layernorm`` or
``peephole``, with or without the in-loop regularisers (recurrent dropout, zoneout), as ONE
``torch.autograd.Function`` with a hand-written backward (back-propagation through time). It
is the fallback where nothing compiled can run (no native build, autocast, float16, CUDA
where the triton backend refuses), and pure tensor operations: the same code runs on CUDA.

Layout choices, each measured (``docs/performance.md``, ``benchmarks/fused-one-bptt.md``):

- Step ``t`` is ONE matrix product ``[x_t, a_{t-1}] @ [W_ih, W_hh].T + b`` (but for the
  layernorm cell, whose two halves are normalised apart), followed by in-place element-wise
  updates of its output; ``h_t`` is written straight into the next step's input row. On the
  CPU the per-step products run near the matmul peak while one huge input projection for all
  steps does not. Backward walks time in reverse computing only the gate gradients and
  ``dh = dz W_hh``; the gradients of both weight matrices are then ONE product over all
  steps, the input gradient another, the bias gradient one sum.
- The gate blocks stay in ``torch.nn.LSTM``'s order (i, f, g, o), with the g rows of the
  weights (or of the LN gain and bias) multiplied by -2, so that ONE sigmoid over the gate
  row gives ``i``, ``f``, ``o`` and ``s_g = sigmoid(-2 z_g) = (1 - tanh(z_g)) / 2``; no tanh
  is ever computed (PyTorch's CPU tanh is several times slower than its sigmoid). Likewise
  ``s = sigmoid(-2 y) = (1 - tanh(y)) / 2`` stands for the tanh of the cell output.
- Finished sequences (``batch_sizes``) are row suffixes, so each step works on the running
  prefix of the batch, and rows that are never written stay zero. Every per-step view is
  made before the loop: at small sizes indexing inside the loop costs more than the math.

Weights are rearranged (and packed for oneDNN, :mod:`lstmkit.backends.matmul`) at every call,
from the values the call is given (:mod:`lstmkit.backends.common`). When autograd asks for
higher-order gradients (``create_graph=True``), the backward differentiates the reference
equations instead (:func:`lstmkit.backends.common.reference_backward`).

Forward, step ``t``, on the rows of the sequences still running. ``r`` is the recurrent
dropout mask; ``w^h_t``, ``w^c_t`` the zoneout weights (the masks as 0 / 1 in training, ``p``
in evaluation); ``[...]`` marks what only some cells have::

    a_{t-1} = h_{t-1} r                                           recurrent input
    z = [x_t, a_{t-1}] @ [W_ih, W_hh].T + b                       lstm, peephole
    z = LN(x_t W_ih.T; g_ih, b_ih) + LN(a_{t-1} W_hh.T; g_hh, b_hh) + b      layernorm
    i = sigmoid(z_i [+ p_i c_{t-1}]),  f = sigmoid(z_f [+ p_f c_{t-1}]),  g = 1 - 2 s_g
    c' = f c_{t-1} + i g                                          the new cell state
    o = sigmoid(z_o [+ p_o c'])
    y = c', or LN(c'; g_c, b_c) for layernorm
    m = o tanh(y) = o (1 - 2 s),  h' = m [@ W_hr.T]               the new hidden state
    h_t = lerp(h', h_{t-1}, w^h_t),  c_t = lerp(c', c_{t-1}, w^c_t)

The input half of the layernorm cell, LN(x W_ih.T) with every bias, does not depend on the
state: it is computed for all steps in one call before the loop. Backward walks ``t`` down
from ``T - 1`` with ``dh``, ``dc``, the gradients reaching ``h_t`` and ``c_t``::

    dh' = dh (1 - w^h),  dc' = dc (1 - w^c)         dh w^h and dc w^c pass to step t - 1
    dm = dh' [@ W_hr]
    dc' += 4 sigmoid'(s) dm o, the gradient through tanh(y) = 1 - 2 s (via LN's backward
        for layernorm)
    dz_o = sigmoid'(o) dm tanh(y)                   [peephole: dc' += p_o dz_o]
    dz_i = sigmoid'(i) dc' g,  dz_f = sigmoid'(f) dc' c_{t-1},  dz_g = sigmoid'(s_g) 4 dc' i
    dc_{t-1} = dc' f + dc w^c                       [peephole: + p_i dz_i + p_f dz_f]
    dh_{t-1} = (dz @ W_hh) r + dh w^h               layernorm: LN_hh's backward of dz, @ W_hh

``sigmoid'(v) = v (1 - v)`` from the saved activations (``sigmoid_backward``), and
``1 - g^2 = 4 s_g (1 - s_g)``: one ``sigmoid_backward`` over the gate row gives every ``dz``.
After the loop every parameter gradient is one product or reduction over all steps:
``d[W_ih, W_hh] = dz.T @ [x, a]``, ``db = sum dz``, ``dp = sum dz c``, ``dW_hr = dh'.T @ m``;
for layernorm ``dW_hh`` from the per-step LN backward, ``dW_ih`` and ``dx`` from LN_ih's
backward of all ``dz`` at once, the LN gains and biases from ``native_layer_norm_backward``
over all steps.

Weight drop needs nothing here: the runner passes an already dropped ``weight_hh``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import matmul
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

KINDS = frozenset({"lstm", "layernorm", "peephole"})  # of the cells this module runs
_EPS = cells.LAYER_NORM_EPS
# Resolved overloads: torch.ops.aten.<op>(..., grad_input=...) costs ~3 us more per call.
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default
_INPUT_GRAD = (True, False, False)  # output_mask of _layer_norm_backward: the input's only


@dataclass(frozen=True)
class _Config:
    kind: str  # the cell's, one of KINDS
    names: tuple[str, ...]  # of the weights: torch.nn.LSTM's, then the cell's extra ones
    batch_sizes: list[int] | None  # as in reference.run
    training: bool  # backward will run: keep every step's values
    dtype: torch.dtype | None  # of the forward's products (autocast, see run)
    rerun: Callable  # the reference equations, for higher-order gradients (common.rerun_reference)


def _sigmoid_gates(w: Tensor) -> Tensor:
    """A copy of ``w`` (four gate blocks along dim 0) with the g block times -2: the sigmoid
    of the g pre-activation is then ``(1 - tanh) / 2``."""
    w = w.clone()
    w[w.size(0) // 2 : 3 * w.size(0) // 4] *= -2
    return w


def _stack(per_step: list[Tensor], sizes: list[int]) -> Tensor:
    """Per-step ``(n_t, ...)`` tensors as one ``(T, B, ...)``, zero in the rows of finished
    sequences (every sequence runs at step 0: ``n_0 = B``)."""
    if sizes[-1] == sizes[0]:
        return torch.stack(per_step)
    first = per_step[0]
    stacked = first.new_zeros(len(sizes), *first.shape)
    running = torch.arange(sizes[0]) < torch.tensor(sizes).unsqueeze(1)  # (T, B)
    stacked[running.to(first.device)] = torch.cat(per_step)
    return stacked


def _per_step(values: Tensor, sizes: list[int]) -> list[Tensor]:
    """``(T, B, ...)`` -> for each step the rows still running; a 0-d tensor -> itself."""
    if values.dim() == 0:
        return [values] * len(sizes)
    return running_rows(values.unbind(0), range(len(sizes)), sizes)


def _zone_weight(zone: Tensor | float, like: Tensor) -> Tensor:
    """Zoneout as the weight ``w`` of the previous state in ``lerp(new, previous, w)``: the
    ``(T, B, ...)`` training mask as 0 / 1, or the evaluation probability as a 0-d tensor."""
    return zone.to(like.dtype) if isinstance(zone, Tensor) else like.new_tensor(zone)


class FusedCell(torch.autograd.Function):
    """One layer-direction of a cell of kind lstm, layernorm or peephole, with recurrent
    dropout and zoneout where their masks are given; see the module docstring."""

    @staticmethod
    def forward(ctx, config, x, h0, c0, recurrent, zone_h, zone_c, *weights):
        w_ih, w_hh, b_ih, b_hh, w_hr, *extra = weights
        layernorm, peephole = config.kind == "layernorm", config.kind == "peephole"
        batch_sizes, training = config.batch_sizes, config.training
        steps, batch, inp = x.shape
        hidden, out_size = w_hh.size(0) // 4, w_hh.size(1)
        sizes, every = batch_sizes or [batch] * steps, range(steps)
        # Rows of finished sequences are never written; where there are any, buffers start
        # zeroed, so that those rows read as zero (in the output and in sums over all steps).
        new = x.new_zeros if batch_sizes else x.new_empty
        # Backward needs every step's values; inference keeps one slot of each.
        kept, slots = (steps, every) if training else (1, [0] * steps)

        def views(buffer: Tensor, at=slots) -> list[Tensor]:
            """For each step ``t``, the running rows of ``buffer[at[t]]``."""
            return running_rows(buffer.unbind(0), at, sizes)

        # ins[t] holds the recurrent input a_{t-1} = h_{t-1} r, after x_t where a step is one
        # product over [x_t, a_{t-1}]; hs[t + 1] holds h_t.
        if layernorm:
            ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b = extra
            x_rows = x.reshape(steps * batch, inp)
            u = matmul.Weight(cast(w_ih, config.dtype), steps * batch)(x_rows)
            u = u.view(steps, batch, 4 * hidden)  # x W_ih.T
            shift = ln_ih_b + ln_hh_b if b_ih is None else ln_ih_b + ln_hh_b + b_ih + b_hh
            xp, mean_u, rstd_u = torch.native_layer_norm(
                u, (4 * hidden,), _sigmoid_gates(ln_ih_w), _sigmoid_gates(shift), _EPS
            )  # (T, B, 4H): the input half, every bias included
            recur = matmul.Weight(cast(w_hh, config.dtype), batch)
            gain_hh = _sigmoid_gates(ln_hh_w)
            gain_c, shift_c = ln_c_w * -2, ln_c_b * -2  # LN(c'; -2 g_c, -2 b_c) = -2 y
            xps = views(xp, every)
            # for backward: each step's (a W_hh.T, mean, rstd) of its LN, (mean, rstd) of c''s
            rec_stats, cell_stats = [], []
            ins = a = new(steps + 1, batch, out_size)
        else:
            step = step_weight(w_ih, w_hh, b_ih, b_hh, batch, _sigmoid_gates, config.dtype)
            ins = new(steps + 1, batch, inp + out_size)
            ins[:steps, :, :inp] = x
            a = ins[:, :, inp:]
        hs = a if recurrent is None else new(steps + 1, batch, out_size)
        hs[0] = h0
        ins_t, h_next = views(ins, every), views(hs[1:], every)
        if recurrent is not None:
            torch.mul(h0, recurrent, out=a[0])
            rs, a_next = running_rows((recurrent,), [0] * steps, sizes), views(a[1:], every)

        gates = new(kept, batch, 4 * hidden)  # activated: i, f, s_g, o
        zs = views(gates)
        sigs = views(gates[..., : 3 * hidden]) if peephole else zs  # what one sigmoid covers
        i_s, f_s, sg_s, o_s = (views(block) for block in gates.split(hidden, 2))
        if peephole:
            (weight_ch,) = extra
            p_if, p_o = weight_ch[: 2 * hidden].view(2, hidden), weight_ch[2 * hidden :]
            z_if = views(gates[..., : 2 * hidden].unflatten(-1, (2, hidden)))  # (n, 2, H)
        # cell[c_slots[t]] holds c_{t-1} (after zoneout), cell[c_slots[t + 1]] holds c_t;
        # inference alternates two slots after c0.
        c_slots = range(steps + 1) if training else [0] + [1 + t % 2 for t in every]
        cell = new(max(c_slots) + 1, batch, hidden)
        cell[0] = c0
        c_prev, c_now = views(cell, c_slots[:-1]), views(cell, c_slots[1:])
        if peephole:
            c_prev_col = views(cell.unsqueeze(2), c_slots[:-1])  # (n, 1, H)
        cell_new = None if zone_c is None else new(kept, batch, hidden)  # c', before zoneout
        c_new = c_now if cell_new is None else views(cell_new)
        sig_cell = new(kept, batch, hidden)  # s = sigmoid(-2 y) = (1 - tanh(y)) / 2
        ss = views(sig_cell)
        project = None if w_hr is None else matmul.Weight(cast(w_hr, config.dtype), batch)
        if project is not None:
            ms = views(x.new_empty(1, batch, hidden), [0] * steps)  # m = o tanh(y)
        # h' goes to a temporary under zoneout, else straight to h_t
        h_out = h_next if zone_h is None else views(x.new_empty(1, batch, out_size), [0] * steps)
        if zone_h is not None:
            zone_hs, h_prev = _per_step(_zone_weight(zone_h, x), sizes), views(hs, every)
        if zone_c is not None:
            zone_cs = _per_step(_zone_weight(zone_c, x), sizes)
        two = x.new_tensor(2.0)  # 0-d: cheaper than a Python scalar

        for t in every:
            z, i, c, o, s = zs[t], i_s[t], c_new[t], o_s[t], ss[t]
            if layernorm:
                rec = recur(ins_t[t])  # (n, 4H)
                normed, *stats = torch.native_layer_norm(rec, (4 * hidden,), gain_hh, None, _EPS)
                if training:
                    rec_stats.append((rec, *stats))
                torch.add(xps[t], normed, out=z)
            else:
                step(ins_t[t], out=z)
            if peephole:
                z_if[t].addcmul_(p_if, c_prev_col[t])
            sigs[t].sigmoid_()  # i, f, s_g and, but for peephole, o
            torch.mul(f_s[t], c_prev[t], out=c)
            c.add_(i).addcmul_(i, sg_s[t], value=-2)  # c' = f c + i (1 - 2 s_g)
            if peephole:
                o.addcmul_(p_o, c).sigmoid_()
            if layernorm:
                normed, *stats = torch.native_layer_norm(c, (hidden,), gain_c, shift_c, _EPS)
                if training:
                    cell_stats.append(stats)
                torch.sigmoid(normed, out=s)
            else:
                torch.mul(c, -two, out=s).sigmoid_()
            if project is None:
                torch.addcmul(o, o, s, value=-2, out=h_out[t])  # o tanh(y)
            else:
                project(torch.addcmul(o, o, s, value=-2, out=ms[t]), out=h_out[t])
            if zone_h is not None:
                torch.lerp(h_out[t], h_prev[t], zone_hs[t], out=h_next[t])
            if zone_c is not None:
                torch.lerp(c, c_prev[t], zone_cs[t], out=c_now[t])
            if recurrent is not None:
                torch.mul(h_next[t], rs[t], out=a_next[t])

        last = last_step(batch_sizes, steps, batch, x.device)
        rows = torch.arange(batch, device=x.device)
        h_n = hs[last + 1, rows]  # (B, P), a copy
        c_n = cell[torch.tensor(c_slots, device=x.device)[last + 1], rows]  # (B, H), a copy
        ctx.config = config
        if training:
            ctx.zone_p = [None if isinstance(z, Tensor) else z for z in (zone_h, zone_c)]
            saved = [x, h0, c0, *weights, ins, gates, cell, cell_new, sig_cell, recurrent]
            saved += [z if isinstance(z, Tensor) else None for z in (zone_h, zone_c)]
            if layernorm:
                stats = [
                    _stack(list(s), sizes)
                    for s in (*zip(*rec_stats, strict=True), *zip(*cell_stats, strict=True))
                ]  # a W_hh.T (T, B, 4H), the means and rstds of it and of c' (T, B, 1)
                saved += [x_rows, u, mean_u, rstd_u, *stats]
            ctx.save_for_backward(*saved)
        # a copy: an output that is a view of a buffer could not be modified in place
        return hs[1:].clone(memory_format=torch.contiguous_format), h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        config = ctx.config
        needs = ctx.needs_input_grad  # (config, x, h0, c0, three masks, *weights)
        count = 3 + len(config.names)  # x, h0, c0, weights
        inputs, saved = ctx.saved_tensors[:count], ctx.saved_tensors[count:]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            grads = (grad_output, grad_h_n, grad_c_n)
            grads = reference_backward(config.rerun, inputs, grads, needs[1:4] + needs[7:])
            return None, *grads[:3], None, None, None, *grads[3:]
        layernorm, peephole = config.kind == "layernorm", config.kind == "peephole"
        _, _, _, w_ih, w_hh, _, _, w_hr, *extra = inputs
        ins, gates, cell, cell_new, sig_cell, recurrent, *rest = saved
        zone_h, zone_c = (p if z is None else z for z, p in zip(rest[:2], ctx.zone_p, strict=True))
        steps, batch, hidden = sig_cell.shape
        out_size = w_hh.size(1)
        sizes, every = config.batch_sizes or [batch] * steps, range(steps)
        if cell_new is None:
            cell_new = cell[1:]
        # The state gradients flowing back in time start as those of (h_n, c_n): a finished
        # sequence's rows wait untouched until the step where it ended.
        dh = grad_h_n.clone() if grad_h_n is not None else gates.new_zeros(batch, out_size)
        dc = grad_c_n.clone() if grad_c_n is not None else gates.new_zeros(batch, hidden)
        if grad_output is None:
            grad_output = gates.new_zeros(steps, batch, out_size)
        # zeroed where rows of finished sequences are never written
        new = gates.new_zeros if config.batch_sizes else gates.new_empty
        dgates = new(gates.shape)  # (T, B, 4H), gradients of the pre-activations

        def same(tensor: Tensor) -> list[Tensor]:
            """The running rows of ``tensor`` at every step."""
            return running_rows((tensor,), [0] * steps, sizes)

        dhs, dcs, d_outs = same(dh), same(dc), _per_step(grad_output, sizes)
        i_s, f_s, sg_s, o_s = (_per_step(block, sizes) for block in gates.split(hidden, 2))
        di_s, df_s, dg_s, do_s = (_per_step(block, sizes) for block in dgates.split(hidden, 2))
        dzs = _per_step(dgates, sizes)
        sig = slice(0, (3 if peephole else 4) * hidden)  # o's own when peephole
        sigs, dsigs = _per_step(gates[..., sig], sizes), _per_step(dgates[..., sig], sizes)
        c_prev, ss = _per_step(cell[:-1], sizes), _per_step(sig_cell, sizes)
        if layernorm:
            ln_ih_w, _, ln_hh_w, _, ln_c_w, ln_c_b = extra
            x_rows, u, mean_u, rstd_u, rec, *stats = rest[2:]
            mean_r, rstd_r, mean_c, rstd_c = stats
            recs, mean_rs, rstd_rs, c_new, mean_cs, rstd_cs = (
                _per_step(b, sizes) for b in (rec, mean_r, rstd_r, cell_new, mean_c, rstd_c)
            )
            # dv = sigmoid'(s) dm o is the gradient of -2 y = LN(c'; -2 g_c, -2 b_c) over -2:
            # LN's backward of it with gain 4 g_c gives c''s, and 4 dv is that of y.
            gain_c = ln_c_w * 4
            dv_all = new(steps, batch, hidden)
            drs = []  # each step's gradient of a W_hh.T (before its LN), last step first
        else:
            dv_all = gates.new_empty(1, batch, hidden)
        dvs = running_rows(dv_all.unbind(0), every if layernorm else [0] * steps, sizes)
        if peephole:
            p_i, p_f, p_o = extra[0].chunk(3)
        unproject = None if w_hr is None else matmul.Weight(w_hr.t(), batch)
        if unproject is not None:
            dh_new_all = new(steps, batch, out_size)  # gradients of h'
            dh_new = _per_step(dh_new_all, sizes)
        if zone_h is not None:
            w = _zone_weight(zone_h, dh)
            carry_h, keep_h = _per_step(w, sizes), _per_step(1 - w, sizes)
            carried_h = same(dh.new_empty(batch, out_size))
        if zone_c is not None:
            w = _zone_weight(zone_c, dc)
            carry_c, keep_c = _per_step(w, sizes), _per_step(1 - w, sizes)
            carried_c = same(dc.new_empty(batch, hidden))
        if recurrent is not None:
            rs = same(recurrent)
        back = matmul.Weight(w_hh.t().contiguous(), batch)
        zero = gates.new_zeros(())

        for t in reversed(every):
            dh_t, dc_t, o, s, dz = dhs[t], dcs[t], o_s[t], ss[t], dzs[t]
            dh_t.add_(d_outs[t])  # (n, P): everything that reaches h_t
            if zone_h is not None:
                torch.mul(dh_t, carry_h[t], out=carried_h[t])
                dh_t.mul_(keep_h[t])
            if zone_c is not None:
                torch.mul(dc_t, carry_c[t], out=carried_c[t])
                dc_t.mul_(keep_c[t])
            dm = dh_t  # gradient of m = o tanh(y)
            if unproject is not None:
                dh_new[t].copy_(dh_t)
                dm = unproject(dh_t)  # (n, H)
            dv = _sigmoid_backward(torch.mul(dm, o, out=dvs[t]), s, grad_input=dvs[t])
            if layernorm:
                dc_t.add_(
                    _layer_norm_backward(
                        dv, c_new[t], (hidden,), mean_cs[t], rstd_cs[t], gain_c, None, _INPUT_GRAD
                    )[0]
                )
            else:
                dc_t.add_(dv, alpha=4)  # 1 - tanh^2 = 4 s (1 - s)
            do = torch.addcmul(dm, dm, s, value=-2, out=do_s[t])  # dm tanh(y)
            if peephole:
                dc_t.addcmul_(_sigmoid_backward(do, o, grad_input=do), p_o)
            torch.addcmul(dc_t, dc_t, sg_s[t], value=-2, out=di_s[t])  # dc g
            torch.mul(dc_t, c_prev[t], out=df_s[t])
            torch.addcmul(zero, dc_t, i_s[t], value=4, out=dg_s[t])  # 1 - g^2 = 4 s_g (1 - s_g)
            _sigmoid_backward(dsigs[t], sigs[t], grad_input=dsigs[t])
            if zone_c is None:
                dc_t.mul_(f_s[t])
            else:
                torch.addcmul(carried_c[t], dc_t, f_s[t], out=dc_t)
            if peephole:
                dc_t.addcmul_(di_s[t], p_i).addcmul_(df_s[t], p_f)
            if layernorm:
                dz = _layer_norm_backward(
                    dz, recs[t], (4 * hidden,), mean_rs[t], rstd_rs[t], ln_hh_w, None, _INPUT_GRAD
                )[0]
                drs.append(dz)
            back(dz, out=dh_t)
            if recurrent is not None:
                dh_t.mul_(rs[t])
            if zone_h is not None:
                dh_t.add_(carried_h[t])

        # After the loop: every parameter's gradient as one product or reduction.
        need = dict(zip(config.names, needs[7:], strict=True))
        flat = dgates.view(steps * batch, 4 * hidden)
        db = flat.sum(0)  # the gradient of every bias added to the pre-activations
        dx = dw_ih = dw_hh = dw_hr = None
        d_extra = []
        if layernorm:
            du, d_ln_ih_w, _ = _layer_norm_backward(
                dgates,
                u,
                (4 * hidden,),
                mean_u,
                rstd_u,
                ln_ih_w,
                None,
                (needs[1] or need["weight_ih"], need["ln_ih_weight"], False),
            )
            if du is not None:
                du = du.view(steps * batch, 4 * hidden)
                dw_ih = matmul.mm_t(du, x_rows) if need["weight_ih"] else None
                dx = matmul.mm(du, w_ih).view(steps, batch, -1) if needs[1] else None
            if need["weight_hh"]:
                a = torch.cat(_per_step(ins[:steps], sizes))  # running rows, step by step
                dw_hh = matmul.mm_t(torch.cat(drs[::-1]), a)
            d_ln_hh_w = _layer_norm_backward(
                dgates, rec, (4 * hidden,), mean_r, rstd_r, ln_hh_w, None, (False, True, False)
            )[1]
            _, d_ln_c_w, d_ln_c_b = _layer_norm_backward(
                dv_all, cell_new, (hidden,), mean_c, rstd_c, ln_c_w, ln_c_b, (False, True, True)
            )
            d_extra = [d_ln_ih_w, db.clone(), d_ln_hh_w, db.clone(), d_ln_c_w * 4, d_ln_c_b * 4]
        else:
            dw = matmul.mm_t(flat, ins[:steps].view(steps * batch, ins.size(2)))
            inp = w_ih.size(1)
            dw_ih, dw_hh = dw[:, :inp], dw[:, inp:]
            if needs[1]:
                dx = matmul.mm(flat, w_ih).view(steps, batch, inp)
            if peephole:
                d_if = dgates[..., : 2 * hidden].unflatten(-1, (2, hidden)) * cell[:-1, :, None]
                d_o = dgates[..., 3 * hidden :] * cell_new
                d_extra = [torch.cat([d_if.sum((0, 1)).flatten(), d_o.sum((0, 1))])]
        if unproject is not None and need["weight_hr"]:
            o = gates[..., 3 * hidden :]
            m = torch.addcmul(o, o, sig_cell, value=-2).view(steps * batch, hidden)
            dw_hr = matmul.mm_t(dh_new_all.view(steps * batch, out_size), m)
        grads = (dw_ih, dw_hh, db, db.clone(), dw_hr, *d_extra)
        return (
            None,
            dx,
            dh if needs[2] else None,
            dc if needs[3] else None,
            None,
            None,
            None,
            *(g if n else None for g, n in zip(grads, needs[7:], strict=True)),
        )


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """A cell of a kind in :data:`KINDS` (``cell.kind``), with any regulariser (weight drop is
    applied to the weights before the loop)."""
    return cell.kind in KINDS


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
    """Why this backend cannot run a layer on ``x`` with ``params`` now (a ``torch.func``
    transform, forward-mode AD, ``torch.jit.trace``: :func:`common.opaque_refusal`), or
    ``None``; its sizes and dtypes never stop it."""
    return opaque_refusal((x, *params.values()))


# Dynamo cannot trace the Function's body (oneDNN ops, Python loops over per-step views):
# without this it breaks the graph several times inside it and warns. Under torch.compile
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
    """:meth:`lstmkit.backends.contract.Backend.run` for what :func:`supports`: one
    :class:`FusedCell`.

    Inside ``torch.autocast`` the forward's matrix products take operands in the autocast
    dtype, as the reference backend's do (:func:`lstmkit.cells.linear`); everything else,
    backward included, runs in float32, with autocast itself off."""
    dtype = cells.autocast_dtype(x)
    names = (*cells.NN_PARAMETERS, *cell.extra)
    weights = tuple(params[name] for name in names)
    training = needs_backward((x, h, c, *weights))
    rerun = rerun_reference(cell, names, batch_sizes, masks)
    config = _Config(cell.kind, names, batch_sizes, training, dtype, rerun)
    with autocast_off(x):
        return FusedCell.apply(
            config, x, h, c, masks.recurrent, masks.zoneout_h, masks.zoneout_c, *weights
        )
