"""The Triton kernels of :mod:`lstmkit.backends.triton`: the recurrence of one LSTM
layer-direction, forward and backward, for a block of the batch and a slice of the hidden
units per program. Importing this module needs the ``triton`` package; it is imported on first
use only, so that ``TRITON_INTERPRET`` (read by ``triton.jit`` when a kernel is defined) can
still be set by then.

Shapes (B batch, H hidden, P = proj_size or H, G = 4H), every tensor contiguous:
``xp`` ``(T, B, G)``, ``w_hh`` ``(G, P)``, ``w_hr`` ``(P, H)``, ``out`` ``(T, B, P)``,
``gates`` ``(T, B, G)`` (activated, order i, f, g, o), ``cells`` ``(T, B, H)``. Program
``(pb, ps)`` owns rows ``pb * BLOCK_B + [0, BLOCK_B)`` and hidden units
``ps * BLOCK_H + [0, BLOCK_H)``, i.e. those units' rows in each of the four gate blocks.
``sizes[t]``: the rows still running at step ``t``; the others keep their state and output 0.
``extra``: the cell's own parameters, blocks of H. ``PEEPHOLE``: the peephole cell, whose
``extra`` ``(3H,)`` holds ``(p_i, p_f, p_o)``: ``i`` and ``f`` also see ``p_i c_{t-1}``,
``p_f c_{t-1}``, and ``o`` sees ``p_o c_t``. ``LAYERNORM`` (``"registers"`` only: its statistics
need every unit in one program): the layernorm cell, whose ``extra`` ``(10H,)`` holds the gain
and the bias of the recurrent LN (4H each), then those of the LN of ``c_t`` (H each); ``xp``
then already holds the layer-normalised input half with every bias, and
``z = xp + LN(h_{t-1} W_hh.T)``, ``h_t = o tanh(LN(c_t))``. Its forward also saves ``norms``
``(T, B, G)``, the recurrent pre-activations normalised (before the gain), and ``stats``
``(T, B, 3)``: per row, the reciprocal std of those, and the mean and reciprocal std of ``c_t``.

Both kernels run the steps ``[t0, t1)`` (the backward in reverse): the whole sequence in one
launch (persistent) or one step per launch. State that outlives a launch goes through
``*_state`` buffers: each program reads its tile at the start and writes it back at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)  # the kernels below are the interpreter's


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter now: defined for it, and
    ``TRITON_INTERPRET`` still set (the interpreter reads it while a kernel runs)."""
    return INTERPRETED and bool(triton.knobs.runtime.interpret)


# Only builtins of triton.language here, none of its @jit library functions (tl.sigmoid,
# tl.zeros): those are defined when triton.language is imported, which torch does early, and
# then do not run in the interpreter.
@triton.jit
def _sigmoid(v):
    return 1 / (1 + tl.exp(-v))


@triton.jit
def _tanh(v):
    return 2 * _sigmoid(2 * v) - 1


@triton.jit
def _dot(a, b, acc_ty: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in ``acc_ty``. ``UPCAST``: multiply as float32 (exact for
    bfloat16 operands), for Triton's interpreter, which multiplies bfloat16 as raw bits."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=acc_ty)


@triton.jit
def _tile(ptr, rows, cols, row_stride, col_stride, row_ok, col_ok):
    """``ptr[rows * row_stride + cols * col_stride]`` as a ``(len(rows), len(cols))`` tile,
    zero outside ``row_ok x col_ok``."""
    offsets = rows[:, None] * row_stride + cols[None, :] * col_stride
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _put(ptr, rows, cols, row_stride, row_ok, col_ok, value):
    """Store ``value`` into the ``(rows, cols)`` tile of a row-major matrix."""
    offsets = rows[:, None] * row_stride + cols[None, :]
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _per_unit(ptr, block, hidden, units, unit_ok, acc_ty: tl.constexpr):
    """``ptr[block H + units]`` in ``acc_ty``, as a ``(1, len(units))`` row (zero past H)."""
    return tl.load(ptr + block * hidden + units, mask=unit_ok, other=0.0).to(acc_ty)[None, :]


@triton.jit
def _peepholes(extra, hidden, units, unit_ok, acc_ty: tl.constexpr):
    """The peephole cell's ``(p_i, p_f, p_o)`` of these units, as ``(1, len(units))`` rows."""
    p_i = _per_unit(extra, 0, hidden, units, unit_ok, acc_ty)
    p_f = _per_unit(extra, 1, hidden, units, unit_ok, acc_ty)
    p_o = _per_unit(extra, 2, hidden, units, unit_ok, acc_ty)
    return p_i, p_f, p_o


@triton.jit
def _layer_norm_gains(extra, hidden, units, unit_ok, acc_ty: tl.constexpr):
    """The layernorm cell's recurrent LN gains of these units, per gate (i, f, g, o), then the
    gain and the bias of its LN of ``c``, as ``(1, len(units))`` rows."""
    gain_i = _per_unit(extra, 0, hidden, units, unit_ok, acc_ty)
    gain_f = _per_unit(extra, 1, hidden, units, unit_ok, acc_ty)
    gain_g = _per_unit(extra, 2, hidden, units, unit_ok, acc_ty)
    gain_o = _per_unit(extra, 3, hidden, units, unit_ok, acc_ty)
    gain_c = _per_unit(extra, 8, hidden, units, unit_ok, acc_ty)
    shift_c = _per_unit(extra, 9, hidden, units, unit_ok, acc_ty)
    return gain_i, gain_f, gain_g, gain_o, gain_c, shift_c


@triton.jit
def _add(a, b):
    """What :func:`_row_mean` reduces with (``tl.sum`` is a library function, see above)."""
    return a + b


@triton.jit
def _row_mean(v, count):
    """The mean of each row of ``v`` over its first ``count`` columns (zero past them)."""
    return tl.reduce(v, 1, _add) / count


@triton.jit
def _centred(v, mean, ok):
    """``v - mean`` (``mean`` per row), zero outside ``ok``."""
    return tl.where(ok, v - mean[:, None], 0.0)


@triton.jit
def _norm_grad(dn, n, mean_dn, mean_dn_n, rstd, ok):
    """LayerNorm's backward: the gradient of ``v`` from that of ``n = (v - mean(v)) rstd``,
    given the row means of ``dn`` and ``dn n`` over all the normalised columns."""
    return tl.where(ok, rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dn_n[:, None]), 0.0)


@triton.jit
def _put_row(ptr, rows, row_ok, value):
    """Store the per-row ``value`` into ``ptr[3 rows]``, one column of a ``(rows, 3)`` matrix."""
    tl.store(ptr + rows * 3, value.to(ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _grid_barrier(counter, target):
    """Arrive at, then wait on, the barrier ``counter`` shared by the programs of one batch
    block until ``target`` arrivals in all. Needs every such program resident at once (the host
    launches at most one program per SM); the release / acquire pair makes the stores issued
    before the barrier visible to the loads after it, across SMs."""
    tl.debug_barrier()  # every thread of this program has issued its stores
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gate_weight(w_hh, gate, hidden, out_size, k, units, k_ok, unit_ok):
    """``W_hh[gate H + units, k]`` transposed: the ``(len(k), len(units))`` right operand of
    ``h @ W_hh.T`` for one gate block."""
    return _tile(w_hh + gate * hidden * out_size, k, units, 1, out_size, k_ok, unit_ok)


# Step bounds and sizes change between launches: specialising on them would only recompile.
@triton.jit(do_not_specialize=["t0", "t1", "batch", "hidden", "out_size"])
def lstm_forward(
    xp,
    bias,
    w_hh,
    w_hr,
    extra,
    h0,
    h_state,
    c_state,
    out,
    gates,
    cells,
    norms,
    stats,
    sizes,
    counters,
    t0,
    t1,
    batch,
    hidden,
    out_size,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    RECURRENT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROJ: tl.constexpr,
    PEEPHOLE: tl.constexpr,
    LAYERNORM: tl.constexpr,
    EPS: tl.constexpr,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Steps ``[t0, t1)`` of the forward.

    ``RECURRENT`` says where ``h_{t-1} W_hh.T`` comes from. ``"registers"``: one program holds
    all H units (``BLOCK_H >= H``) and every row of ``W_hh``; ``h`` and ``c`` stay in registers
    from step to step, and with ``PROJ`` ``W_hr`` stays on chip too. ``"barrier"`` (no
    projection, P = H): each program holds its units' rows of ``W_hh``, computes
    ``BLOCK_OUT = BLOCK_H`` columns of ``h_t`` and reads the whole of ``h_{t-1}`` back from
    ``out[t - 1]`` (``h0`` at t = 0); a grid barrier per step orders those reads after every
    program's writes. ``"host"``: a launch is one step and ``xp`` already holds the product
    (the caller added it); no weight is loaded.

    ``xp``: ``x W_ih.T`` in the product dtype; ``bias`` ``(G,)``: ``b_ih + b_hh`` in the
    accumulation dtype; ``h_state`` ``(B, P)``, ``c_state`` ``(B, H)``: the state in the
    accumulation dtype, in and out. ``SAVE``: write ``gates`` and ``cells`` (and ``norms``,
    ``stats``) for the backward. ``EPS``: the LN epsilon.
    """
    pb = tl.program_id(0)
    ps = tl.program_id(1)
    slices = tl.num_programs(1)
    rows = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < batch
    units = ps * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < hidden
    k = tl.arange(0, BLOCK_K)  # h_{t-1}'s columns, as the input of the product
    k_ok = k < out_size
    cols = ps * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # this program's columns of h_t
    col_ok = cols < out_size
    dot_ty = w_hh.dtype.element_ty
    acc_ty = c_state.dtype.element_ty
    gate_stride = 4 * hidden

    # On chip for the whole launch: this program's W_hh rows of each gate (and W_hr).
    if RECURRENT != "host":
        w_i = _gate_weight(w_hh, 0, hidden, out_size, k, units, k_ok, unit_ok)
        w_f = _gate_weight(w_hh, 1, hidden, out_size, k, units, k_ok, unit_ok)
        w_g = _gate_weight(w_hh, 2, hidden, out_size, k, units, k_ok, unit_ok)
        w_o = _gate_weight(w_hh, 3, hidden, out_size, k, units, k_ok, unit_ok)
    if PROJ:
        w_r = _tile(w_hr, units, cols, 1, hidden, unit_ok, col_ok)  # W_hr.T, (BLOCK_H, BLOCK_OUT)
    zero = tl.full((BLOCK_B, BLOCK_H), 0, acc_ty)
    b_i, b_f, b_g, b_o = zero, zero, zero, zero
    if HAS_BIAS:
        b_i += _per_unit(bias, 0, hidden, units, unit_ok, acc_ty)
        b_f += _per_unit(bias, 1, hidden, units, unit_ok, acc_ty)
        b_g += _per_unit(bias, 2, hidden, units, unit_ok, acc_ty)
        b_o += _per_unit(bias, 3, hidden, units, unit_ok, acc_ty)
    if PEEPHOLE:
        p_i, p_f, p_o = _peepholes(extra, hidden, units, unit_ok, acc_ty)
    if LAYERNORM:
        gains = _layer_norm_gains(extra, hidden, units, unit_ok, acc_ty)
        gain_i, gain_f, gain_g, gain_o, gain_c, shift_c = gains
        b_i += _per_unit(extra, 4, hidden, units, unit_ok, acc_ty)
        b_f += _per_unit(extra, 5, hidden, units, unit_ok, acc_ty)
        b_g += _per_unit(extra, 6, hidden, units, unit_ok, acc_ty)
        b_o += _per_unit(extra, 7, hidden, units, unit_ok, acc_ty)
    ok = unit_ok[None, :]

    h = _tile(h_state, rows, cols, out_size, 1, in_batch, col_ok)
    c = _tile(c_state, rows, units, hidden, 1, in_batch, unit_ok)
    for t in range(t0, t1):
        keep = (rows < tl.load(sizes + t))[:, None]  # the rows still running
        step = tl.cast(t, tl.int64) * batch
        x_t = xp + step * gate_stride
        z_i = _tile(x_t, rows, units, gate_stride, 1, in_batch, unit_ok).to(acc_ty) + b_i
        z_f = _tile(x_t + hidden, rows, units, gate_stride, 1, in_batch, unit_ok).to(acc_ty) + b_f
        z_g = (
            _tile(x_t + 2 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok).to(acc_ty) + b_g
        )
        z_o = (
            _tile(x_t + 3 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok).to(acc_ty) + b_o
        )
        if RECURRENT != "host":
            if RECURRENT == "registers":
                h_in = h
            elif t == 0:
                h_in = _tile(h0, rows, k, out_size, 1, in_batch, k_ok)
            else:
                # .cg: read through L2, where the other programs' writes are, not a stale L1
                offsets = (step - batch) * out_size + rows[:, None] * out_size + k[None, :]
                mask = in_batch[:, None] & k_ok[None, :]
                h_in = tl.load(out + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            h_in = h_in.to(dot_ty)
            r_i = _dot(h_in, w_i, acc_ty, PRECISION, UPCAST)
            r_f = _dot(h_in, w_f, acc_ty, PRECISION, UPCAST)
            r_g = _dot(h_in, w_g, acc_ty, PRECISION, UPCAST)
            r_o = _dot(h_in, w_o, acc_ty, PRECISION, UPCAST)
            if LAYERNORM:  # over the whole 4H row: this program owns every unit
                mean = _row_mean(r_i + r_f + r_g + r_o, 4 * hidden)
                r_i = _centred(r_i, mean, ok)
                r_f = _centred(r_f, mean, ok)
                r_g = _centred(r_g, mean, ok)
                r_o = _centred(r_o, mean, ok)
                squares = r_i * r_i + r_f * r_f + r_g * r_g + r_o * r_o
                rstd = tl.rsqrt(_row_mean(squares, 4 * hidden) + EPS)
                r_i *= rstd[:, None]
                r_f *= rstd[:, None]
                r_g *= rstd[:, None]
                r_o *= rstd[:, None]
                if SAVE:
                    normed = norms + step * gate_stride
                    _put(normed, rows, units, gate_stride, in_batch, unit_ok, r_i)
                    _put(normed + hidden, rows, units, gate_stride, in_batch, unit_ok, r_f)
                    _put(normed + 2 * hidden, rows, units, gate_stride, in_batch, unit_ok, r_g)
                    _put(normed + 3 * hidden, rows, units, gate_stride, in_batch, unit_ok, r_o)
                    _put_row(stats + step * 3, rows, in_batch, rstd)
                r_i *= gain_i
                r_f *= gain_f
                r_g *= gain_g
                r_o *= gain_o
            z_i += r_i
            z_f += r_f
            z_g += r_g
            z_o += r_o
        if PEEPHOLE:
            z_i += p_i * c
            z_f += p_f * c
        i = _sigmoid(z_i)
        f = _sigmoid(z_f)
        g = _tanh(z_g)
        c_new = f * c + i * g
        if PEEPHOLE:
            z_o += p_o * c_new
        o = _sigmoid(z_o)
        y = c_new
        if LAYERNORM:
            mean_c = _row_mean(c_new, hidden)
            c_hat = _centred(c_new, mean_c, ok)
            rstd_c = tl.rsqrt(_row_mean(c_hat * c_hat, hidden) + EPS)
            y = c_hat * rstd_c[:, None] * gain_c + shift_c
            if SAVE:
                _put_row(stats + step * 3 + 1, rows, in_batch, mean_c)
                _put_row(stats + step * 3 + 2, rows, in_batch, rstd_c)
        h_new = o * _tanh(y)
        if PROJ:
            h_new = _dot(h_new.to(dot_ty), w_r, acc_ty, PRECISION, UPCAST)
        c = tl.where(keep, c_new, c)
        h = tl.where(keep, h_new, h)
        _put(out + step * out_size, rows, cols, out_size, in_batch, col_ok, tl.where(keep, h, 0.0))
        if SAVE:
            saved = gates + step * gate_stride
            _put(saved, rows, units, gate_stride, in_batch, unit_ok, tl.where(keep, i, 0.0))
            _put(
                saved + hidden, rows, units, gate_stride, in_batch, unit_ok, tl.where(keep, f, 0.0)
            )
            _put(
                saved + 2 * hidden,
                rows,
                units,
                gate_stride,
                in_batch,
                unit_ok,
                tl.where(keep, g, 0.0),
            )
            _put(
                saved + 3 * hidden,
                rows,
                units,
                gate_stride,
                in_batch,
                unit_ok,
                tl.where(keep, o, 0.0),
            )
            _put(cells + step * hidden, rows, units, hidden, in_batch, unit_ok, c)
        if RECURRENT == "barrier":  # noqa: SIM102 (this test is a compile-time one, that not)
            if t + 1 < t1:
                _grid_barrier(counters + pb, slices * (t + 1 - t0))
    _put(h_state, rows, cols, out_size, in_batch, col_ok, h)
    _put(c_state, rows, units, hidden, in_batch, unit_ok, c)


@triton.jit(do_not_specialize=["t0", "t1", "batch", "hidden", "out_size"])
def lstm_backward(
    grad_out,
    w_hh,
    w_hr,
    extra,
    c0,
    gates,
    cells,
    norms,
    stats,
    dh_state,
    dc_state,
    dz,
    dhs,
    dr,
    dys,
    sizes,
    counters,
    t0,
    t1,
    batch,
    hidden,
    out_size,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_ALL: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    RECURRENT: tl.constexpr,
    PROJ: tl.constexpr,
    PEEPHOLE: tl.constexpr,
    LAYERNORM: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Steps ``t1 - 1`` down to ``t0`` of the backward: the gate gradients ``dz`` of every
    step, and the gradients reaching the state.

    ``dh_state`` ``(B, P)``, ``dc_state`` ``(B, H)``: in, the gradients of ``h_{t1-1}`` and
    ``c_{t1-1}`` from later steps; out, those of ``h_{t0-1}`` and ``c_{t0-1}``. ``dz``
    ``(T, B, G)``: the pre-activation gradients (zero in finished rows); ``dhs`` ``(T, B, P)``
    (``PROJ``): everything reaching ``h_t``, for ``dW_hr``. ``c0`` ``(B, H)``: the initial cell
    state; the others as saved by :func:`lstm_forward`. ``LAYERNORM``: ``dz`` is the gradient
    of ``z`` (so of ``xp``), ``dr`` ``(T, B, G)`` that of ``h_{t-1} W_hh.T`` (through the
    recurrent LN), ``dys`` ``(T, B, H)`` that of ``LN(c_t)``.

    ``dh_{t-1} = dz_t @ W_hh`` (each program its ``BLOCK_OUT`` columns) is computed by
    ``RECURRENT``: ``"registers"``, one program holds every unit (``BLOCK_ALL = BLOCK_H``);
    ``"barrier"``, each program reads every unit's ``dz_t`` back after a grid barrier;
    ``"host"``, not here: a launch is one step and the caller does the product after it (the
    kernel then leaves ``dh_state`` to the caller).
    """
    pb = tl.program_id(0)
    ps = tl.program_id(1)
    rows = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = rows < batch
    units = ps * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = units < hidden
    every = tl.arange(0, BLOCK_ALL)  # all H units, as the input of dz @ W_hh
    every_ok = every < hidden
    cols = ps * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col_ok = cols < out_size
    dot_ty = w_hh.dtype.element_ty
    acc_ty = dc_state.dtype.element_ty
    gate_stride = 4 * hidden

    # On chip for the whole launch: the W_hh columns of this program's part of dh (and W_hr).
    if RECURRENT != "host":
        w_i = _tile(w_hh, every, cols, out_size, 1, every_ok, col_ok)
        w_f = _tile(w_hh + hidden * out_size, every, cols, out_size, 1, every_ok, col_ok)
        w_g = _tile(w_hh + 2 * hidden * out_size, every, cols, out_size, 1, every_ok, col_ok)
        w_o = _tile(w_hh + 3 * hidden * out_size, every, cols, out_size, 1, every_ok, col_ok)
    if PROJ:
        w_r = _tile(w_hr, cols, units, hidden, 1, col_ok, unit_ok)  # (BLOCK_OUT, BLOCK_H)
    if PEEPHOLE:
        p_i, p_f, p_o = _peepholes(extra, hidden, units, unit_ok, acc_ty)
    if LAYERNORM:
        gains = _layer_norm_gains(extra, hidden, units, unit_ok, acc_ty)
        gain_i, gain_f, gain_g, gain_o, gain_c, shift_c = gains
    ok = unit_ok[None, :]

    dh = _tile(dh_state, rows, cols, out_size, 1, in_batch, col_ok)
    dc = _tile(dc_state, rows, units, hidden, 1, in_batch, unit_ok)
    for s in range(0, t1 - t0):
        t = t1 - 1 - s
        keep = (rows < tl.load(sizes + t))[:, None]
        step = tl.cast(t, tl.int64) * batch
        saved = gates + step * gate_stride
        i = _tile(saved, rows, units, gate_stride, 1, in_batch, unit_ok)
        f = _tile(saved + hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
        g = _tile(saved + 2 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
        o = _tile(saved + 3 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
        c_t = _tile(cells + step * hidden, rows, units, hidden, 1, in_batch, unit_ok)
        if t == 0:
            c_prev = _tile(c0, rows, units, hidden, 1, in_batch, unit_ok)
        else:
            c_prev = _tile(
                cells + (step - batch) * hidden, rows, units, hidden, 1, in_batch, unit_ok
            )
        grad_t = _tile(grad_out + step * out_size, rows, cols, out_size, 1, in_batch, col_ok)
        dh_t = dh + grad_t.to(acc_ty)
        if PROJ:
            _put(
                dhs + step * out_size,
                rows,
                cols,
                out_size,
                in_batch,
                col_ok,
                tl.where(keep, dh_t, 0.0),
            )
            dm = _dot(dh_t.to(dot_ty), w_r, acc_ty, PRECISION, UPCAST)
        else:
            dm = dh_t
        row_stats = stats + (step + rows) * 3
        if LAYERNORM:
            mean_c = tl.load(row_stats + 1, mask=in_batch, other=0.0)
            rstd_c = tl.load(row_stats + 2, mask=in_batch, other=0.0)
            c_hat = _centred(c_t, mean_c, ok) * rstd_c[:, None]
            tanh_c = _tanh(c_hat * gain_c + shift_c)
        else:
            tanh_c = _tanh(c_t)
        dz_o = tl.where(keep, dm * tanh_c * o * (1 - o), 0.0)
        dy = tl.where(keep, dm * o * (1 - tanh_c * tanh_c), 0.0)
        if LAYERNORM:
            _put(dys + step * hidden, rows, units, hidden, in_batch, unit_ok, dy)
            dn = dy * gain_c
            mean_dn = _row_mean(dn, hidden)
            dy = _norm_grad(dn, c_hat, mean_dn, _row_mean(dn * c_hat, hidden), rstd_c, ok)
        dc_t = dc + dy
        if PEEPHOLE:
            dc_t += p_o * dz_o
        dz_i = tl.where(keep, dc_t * g * i * (1 - i), 0.0)
        dz_f = tl.where(keep, dc_t * c_prev * f * (1 - f), 0.0)
        dz_g = tl.where(keep, dc_t * i * (1 - g * g), 0.0)
        dc_prev = dc_t * f
        if PEEPHOLE:
            dc_prev += p_i * dz_i + p_f * dz_f
        dc = tl.where(keep, dc_prev, dc)
        dz_t = dz + step * gate_stride
        _put(dz_t, rows, units, gate_stride, in_batch, unit_ok, dz_i)
        _put(dz_t + hidden, rows, units, gate_stride, in_batch, unit_ok, dz_f)
        _put(dz_t + 2 * hidden, rows, units, gate_stride, in_batch, unit_ok, dz_g)
        _put(dz_t + 3 * hidden, rows, units, gate_stride, in_batch, unit_ok, dz_o)
        if RECURRENT == "barrier":
            _grid_barrier(counters + pb, tl.num_programs(1) * (s + 1))
            offsets = rows[:, None] * gate_stride + every[None, :]
            mask = in_batch[:, None] & every_ok[None, :]
            dz_i = tl.load(dz_t + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            dz_f = tl.load(dz_t + hidden + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            dz_g = tl.load(dz_t + 2 * hidden + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            dz_o = tl.load(dz_t + 3 * hidden + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        if LAYERNORM:  # dz_t -> the gradient of h_{t-1} W_hh.T, through the recurrent LN
            rstd = tl.load(row_stats, mask=in_batch, other=0.0)
            normed = norms + step * gate_stride
            n_i = _tile(normed, rows, units, gate_stride, 1, in_batch, unit_ok)
            n_f = _tile(normed + hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
            n_g = _tile(normed + 2 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
            n_o = _tile(normed + 3 * hidden, rows, units, gate_stride, 1, in_batch, unit_ok)
            dz_i *= gain_i
            dz_f *= gain_f
            dz_g *= gain_g
            dz_o *= gain_o
            mean_dn = _row_mean(dz_i + dz_f + dz_g + dz_o, 4 * hidden)
            mean_dn_n = _row_mean(dz_i * n_i + dz_f * n_f + dz_g * n_g + dz_o * n_o, 4 * hidden)
            dz_i = _norm_grad(dz_i, n_i, mean_dn, mean_dn_n, rstd, ok)
            dz_f = _norm_grad(dz_f, n_f, mean_dn, mean_dn_n, rstd, ok)
            dz_g = _norm_grad(dz_g, n_g, mean_dn, mean_dn_n, rstd, ok)
            dz_o = _norm_grad(dz_o, n_o, mean_dn, mean_dn_n, rstd, ok)
            dr_t = dr + step * gate_stride
            _put(dr_t, rows, units, gate_stride, in_batch, unit_ok, dz_i)
            _put(dr_t + hidden, rows, units, gate_stride, in_batch, unit_ok, dz_f)
            _put(dr_t + 2 * hidden, rows, units, gate_stride, in_batch, unit_ok, dz_g)
            _put(dr_t + 3 * hidden, rows, units, gate_stride, in_batch, unit_ok, dz_o)
        if RECURRENT != "host":
            dh_prev = _dot(dz_i.to(dot_ty), w_i, acc_ty, PRECISION, UPCAST)
            dh_prev += _dot(dz_f.to(dot_ty), w_f, acc_ty, PRECISION, UPCAST)
            dh_prev += _dot(dz_g.to(dot_ty), w_g, acc_ty, PRECISION, UPCAST)
            dh_prev += _dot(dz_o.to(dot_ty), w_o, acc_ty, PRECISION, UPCAST)
            # the mask spelled out to (BLOCK_B, BLOCK_OUT): with the (BLOCK_B, 1) one, LLVM's
            # SLP vectorizer aborts on sm_90 when the products are full-precision float32
            # (benchmarks/gpu-compile); padding columns keep their zeros either way
            dh = tl.where(keep & col_ok[None, :], dh_prev, dh)
    if RECURRENT != "host":
        _put(dh_state, rows, cols, out_size, in_batch, col_ok, dh)
    _put(dc_state, rows, units, hidden, in_batch, unit_ok, dc)
