"""The triton backend: a whole layer-direction of the standard LSTM cell, of the peephole
cell or of the layernorm cell, as persistent Triton kernels on the GPU (``docs/gpu.md``).

Forward: ``x W_ih.T`` for every step is one matrix product (cuBLAS, on tensor cores), then
ONE launch of :func:`~lstmkit.backends.triton_kernels.lstm_forward` runs every step: each
program owns a block of the batch and a slice of the hidden units, keeps its rows of ``W_hh``
on chip for the whole sequence, and fuses the recurrent product, the bias and the gate math.
Backward: one reverse-time launch of :func:`~lstmkit.backends.triton_kernels.lstm_backward`
computes the gate gradients ``dz`` and ``dh = dz W_hh`` with ``W_hh`` on chip; then ``dW_ih``,
``dW_hh``, ``dW_hr``, the biases, ``dx`` and the peepholes' ``dp`` are each one large product
or sum over all steps.

The layernorm cell's input half, ``LN(x W_ih.T) + b_ih + b_hh``, is computed for all steps
before the launch with autograd (its backward is autograd's); the kernels normalise the
recurrent half and ``c_t`` (forward and backward) and save what the gains' gradients need, which
are sums over all steps after the launch. Its statistics need every unit in one program: it
runs in ``"registers"`` only.

How the hidden units are divided (:func:`_plan`), by the mode of :class:`Plan`:

- ``"registers"``: one program can hold all of ``W_hh`` (within :data:`ON_CHIP_BYTES`): it
  owns every unit, and ``h``, ``c`` never leave its registers.
- ``"barrier"``: the units are split across programs that each hold their slice of ``W_hh``
  and exchange ``h_t`` (forward) and ``dz_t`` (backward) through global memory with a grid
  barrier per step, which needs every program resident at once: at most one per SM.
- ``"host"``: where that many programs do not suffice, each step is one launch of the fused
  gate math, after a cuBLAS product for the recurrent half (``h W_hh.T`` forward,
  ``dz W_hh`` backward); the launch boundary is the barrier.

A projection needs the whole ``h_t`` in one program: it runs in ``"registers"`` or not at all,
like the layernorm cell.

Float32 (TF32 products when ``torch.backends.cuda.matmul.allow_tf32``), bfloat16 and float16
inputs; every product accumulates in float32 and the cell state, the gates and the gradients
of the state stay float32. Float64 only under Triton's interpreter (``TRITON_INTERPRET=1``),
where the kernels also run on CPU tensors: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends.common import (
    autocast_off,
    needs_backward,
    opaque_refusal,
    reference_backward,
    rerun_reference,
)
from lstmkit.backends.contract import Masks

AVAILABLE = importlib.util.find_spec("triton") is not None
# Bytes of weights one program keeps on chip (registers / shared memory) for a whole launch.
# Not measured yet (no GPU in the session that wrote this): benchmarks/gpu.py is the way to.
ON_CHIP_BYTES = 96 * 1024
# Rows of the batch per program: 16, the smallest side of tl.dot. Compiled for sm_90 and sm_80
# (python -m lstmkit.backends.triton_check, benchmarks/gpu-compile), tiles of 64 rows spilled
# in most kernels that loop over time and their backward asked for 186-402 KB of shared memory,
# more than a program may have; at 16 rows neither.
BLOCK_B = 16
_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAMES = (*cells.NN_PARAMETERS, "weight_ch")
KINDS = frozenset({"lstm", "peephole", "layernorm"})  # of the cells this backend runs
# The layernorm cell's parameters inside the kernels, in the order of their ``extra`` vector.
_LAYERNORM = ("ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias")


def kernels():
    """The kernel module, imported on first use (see :mod:`lstmkit.backends.triton_kernels`)."""
    from lstmkit.backends import triton_kernels

    return triton_kernels


@dataclass(frozen=True)
class Plan:
    """How a layer is divided among programs: ``(cdiv(B, block_b), slices)`` of them, each
    owning ``block_h`` hidden units and ``block_out`` columns of ``h``; ``block_k`` is ``P``
    rounded up (the width of ``h_{t-1}`` in the product). ``mode``: ``"registers"``,
    ``"barrier"`` or ``"host"``, see the module docstring."""

    block_b: int
    block_h: int
    block_k: int
    block_out: int
    slices: int
    mode: str

    @property
    def persistent(self) -> bool:
        """One launch for the whole sequence (else one per step)."""
        return self.mode != "host"

    @property
    def num_warps(self) -> int:
        return 8 if self.mode != "host" and self.block_k * self.block_h >= 64 * 64 else 4


def _pow2(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (the smallest side of ``tl.dot``)."""
    return max(16, 1 << (n - 1).bit_length())


def _plan(batch: int, hidden: int, out_size: int, proj: bool, itemsize: int, programs: int):
    """The :class:`Plan` of a layer, or ``None`` when it cannot run (a projection whose weights
    do not fit one program). ``itemsize``: bytes of a weight element; ``programs``: how many
    can be resident at once (the SM count)."""
    block_b = BLOCK_B
    block_k, block_all = _pow2(out_size), _pow2(hidden)
    if (4 + proj) * block_k * block_all * itemsize <= ON_CHIP_BYTES:
        return Plan(block_b, block_all, block_k, block_k, 1, "registers")
    if proj:
        return None
    block_h = 16
    while block_h < block_all and 8 * block_k * block_h * itemsize <= ON_CHIP_BYTES:
        block_h *= 2
    slices = -(-hidden // block_h)
    fits = 4 * block_k * block_h * itemsize <= ON_CHIP_BYTES
    if fits and -(-batch // block_b) * slices <= programs:
        return Plan(block_b, block_h, block_k, block_h, slices, "barrier")
    block_h = min(block_all, 64)  # element-wise only: any slice works
    return Plan(block_b, block_h, block_k, block_h, -(-hidden // block_h), "host")


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs that can be resident at once: one per SM (any number in the interpreter,
    which runs them one after another; it never waits at a barrier with one slice)."""
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layer_plan(x: Tensor, params: cells.Params, dtype: torch.dtype | None) -> Plan | None:
    w_hh = params["weight_hh"]
    itemsize = (dtype or x.dtype).itemsize
    hidden, out_size = w_hh.size(0) // 4, w_hh.size(1)
    proj = params["weight_hr"] is not None
    return _plan(x.size(1), hidden, out_size, proj, itemsize, _programs(x.device))


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """The cells of kind lstm, peephole and layernorm (:data:`KINDS`) without in-loop
    regularisers (weight drop is applied to the weights before the loop). What else a layer
    needs is :func:`refusal`'s."""
    return cell.kind in KINDS and not masks.active()


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
    """Why this backend cannot run a layer on ``x`` (``(T, B, I)``) with ``params``, or
    ``None`` when it can."""
    if not AVAILABLE:
        return "the triton package is not installed (pip install triton)"
    opaque = opaque_refusal((x, *params.values()))
    if opaque is not None:
        return opaque
    interpreted = kernels().interpreting()
    if x.device.type != "cuda" and not interpreted:
        return (
            f"its tensors are on {x.device.type!r}, not CUDA (TRITON_INTERPRET=1 runs the "
            "kernels on CPU tensors, slowly, for tests)"
        )
    if x.dtype not in _GPU_DTYPES and not (interpreted and x.dtype == torch.float64):
        return f"dtype {x.dtype} is not supported (float32, bfloat16, float16)"
    plan = _layer_plan(x, params, cells.autocast_dtype(x))
    if plan is None:
        hidden, out_size = params["weight_hr"].shape[1], params["weight_hr"].shape[0]
        return (
            f"proj_size={out_size} with hidden_size={hidden}: a projection needs all of W_hh "
            f"and W_hr in one program, which holds at most {ON_CHIP_BYTES} bytes of weights"
        )
    if cell.kind == "layernorm" and plan.mode != "registers":
        return (
            f"cell={cell.name!r} with hidden_size={params['weight_hh'].size(0) // 4}: its layer "
            "norms need all 4H recurrent pre-activations in one program, which holds at most "
            f"{ON_CHIP_BYTES} bytes of weights (this layer would need mode {plan.mode!r})"
        )
    if interpreted and plan.mode == "barrier" and plan.slices > 1:
        return (
            f"mode 'barrier' with {plan.slices} slices in Triton's interpreter: its programs "
            "wait for each other at every step, and the interpreter runs one at a time"
        )
    return None


def _precision(x: Tensor, dot: torch.dtype) -> str:
    """``tl.dot``'s input precision for float32 operands: TF32 where torch allows it."""
    tf32 = x.is_cuda and dot == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def _upcast(dot: torch.dtype) -> bool:
    """Whether the kernels multiply ``dot`` operands as float32: in Triton's interpreter for
    bfloat16, which it would multiply as raw bits (the products are exact either way)."""
    return dot == torch.bfloat16 and kernels().INTERPRETED


def _schedule(sizes: Tensor, counters: Tensor, t0: int, t1: int, batch: int, w_hh: Tensor):
    """The arguments both kernels take after their tensors: ``sizes, counters, t0, t1, batch,
    hidden, out_size``."""
    return sizes, counters, t0, t1, batch, w_hh.size(0) // 4, w_hh.size(1)


def _blocks(plan: Plan, precision: str, upcast: bool, proj: bool, kind: str) -> dict[str, object]:
    """The compile-time arguments both kernels take, and their warp count
    (``python -m lstmkit.backends.triton_check`` compiles the kernels with them too)."""
    return {
        "BLOCK_B": plan.block_b,
        "BLOCK_H": plan.block_h,
        "BLOCK_OUT": plan.block_out,
        "RECURRENT": plan.mode,
        "PROJ": proj,
        "PEEPHOLE": kind == "peephole",
        "LAYERNORM": kind == "layernorm",
        "PRECISION": precision,
        "UPCAST": upcast,
        "num_warps": plan.num_warps,
    }


def _forward_blocks(plan: Plan, has_bias: bool, training: bool) -> dict[str, object]:
    """The compile-time arguments the forward kernel takes besides :func:`_blocks`'."""
    return {
        "BLOCK_K": plan.block_k,
        "HAS_BIAS": has_bias,
        "EPS": cells.LAYER_NORM_EPS,
        "SAVE": training,
    }


def _backward_blocks(plan: Plan) -> dict[str, object]:
    """The compile-time argument the backward kernel takes besides :func:`_blocks`'."""
    return {"BLOCK_ALL": plan.block_k if plan.mode == "barrier" else plan.block_h}


def _steps(plan: Plan, steps: int, backward: bool) -> list[tuple[int, int]]:
    """The ``[t0, t1)`` of each launch, in the order they run."""
    if plan.persistent:
        return [(0, steps)]
    order = range(steps - 1, -1, -1) if backward else range(steps)
    return [(t, t + 1) for t in order]


def _peephole_grad(dz: Tensor, cell: Tensor, c0: Tensor) -> Tensor:
    """``d(p_i, p_f, p_o)`` from the pre-activation gradients ``dz`` ``(T, B, 4H)`` and the
    saved cell states ``cell`` ``(T, B, H)``: ``p_i``, ``p_f`` multiply ``c_{t-1}``, ``p_o``
    ``c_t`` (``dz`` is zero in finished rows, whatever their saved state)."""
    steps, batch, hidden = cell.shape
    dz = dz.to(cell.dtype)
    c_prev = torch.cat([c0.to(cell.dtype).unsqueeze(0), cell[:-1]]).unsqueeze(2)
    d_if = (dz[..., : 2 * hidden].view(steps, batch, 2, hidden) * c_prev).sum((0, 1))
    d_o = (dz[..., 3 * hidden :] * cell).sum((0, 1))
    return torch.cat([d_if.flatten(), d_o])


def _normalised_cell(cell: Tensor, stats: Tensor) -> Tensor:
    """``LN(c_t)`` before its gain and bias, from the saved cell states ``cell``
    ``(T, B, H)`` and the saved ``stats`` ``(T, B, 3)`` (their mean and reciprocal std)."""
    return (cell - stats[..., 1:2]) * stats[..., 2:3]


def _layer_norm_grad(dz: Tensor, norms: Tensor, dys: Tensor, c_hat: Tensor) -> Tensor:
    """The gradient of the layernorm cell's ``extra`` vector (gain and bias of the recurrent
    LN, then of the LN of ``c``) from ``dz``, the saved ``norms``, ``dys`` (the gradient of
    ``LN(c_t)``) and ``c_hat`` (:func:`_normalised_cell`), all zero in finished rows but
    ``norms`` and ``c_hat``."""
    dz = dz.to(norms.dtype)
    sums = (dz * norms, dz, dys * c_hat, dys)
    return torch.cat([value.sum((0, 1)) for value in sums])


class TritonLSTM(torch.autograd.Function):
    """One layer-direction over a whole sequence; see the module docstring. ``kind``: the
    cell's, one of :data:`KINDS`; ``extra``: the cell's own parameters (``weight_ch``, or the
    layernorm cell's :data:`_LAYERNORM` concatenated). Without ``w_ih`` (the layernorm cell)
    ``x`` is the input half of the pre-activations, ``(T, B, 4H)``, and its gradient is
    ``dz``."""

    @staticmethod
    def forward(
        ctx,
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        w_hr,
        extra,
        batch_sizes,
        training,
        dtype,
        kind,
        rerun,
    ):
        steps, batch, _ = x.shape
        hidden, out_size = w_hh.size(0) // 4, w_hh.size(1)
        dot = dtype or x.dtype  # of the products (the autocast dtype, if any)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        plan = _layer_plan(x, {"weight_hh": w_hh, "weight_hr": w_hr}, dtype)
        # (T, B, 4H): one large product, unless x is the input half already (layernorm)
        xp = x.contiguous() if w_ih is None else torch.matmul(x.to(dot), w_ih.to(dot).t())
        bias = None if b_ih is None else (b_ih.to(acc) + b_hh.to(acc))
        w_dot = w_hh.to(dot).contiguous()
        w_r = w_hh if w_hr is None else w_hr.to(dot).contiguous()
        h0, c0 = h0.contiguous(), c0.contiguous()
        h_state, c_state = h0.to(acc, copy=True), c0.to(acc, copy=True)
        out = x.new_empty(steps, batch, out_size)
        gates = x.new_empty(steps, batch, 4 * hidden, dtype=acc) if training else xp
        cell = x.new_empty(steps, batch, hidden, dtype=acc) if training else xp
        layernorm = training and kind == "layernorm"
        norms = x.new_empty(steps, batch, 4 * hidden, dtype=acc) if layernorm else xp
        stats = x.new_empty(steps, batch, 3, dtype=acc) if layernorm else xp
        sizes = torch.tensor(batch_sizes or [batch] * steps, dtype=torch.int32, device=x.device)
        counters = torch.zeros(-(-batch // plan.block_b), dtype=torch.int32, device=x.device)
        grid = (counters.numel(), plan.slices)
        for t0, t1 in _steps(plan, steps, backward=False):
            if plan.mode == "host":  # xp_t += h_{t-1} W_hh.T on the rows still running at t
                running = batch_sizes[t0] if batch_sizes else batch
                h_prev = h0 if t0 == 0 else out[t0 - 1]
                xp[t0, :running].addmm_(h_prev[:running].to(dot), w_dot.t())
            kernels().lstm_forward[grid](
                xp,
                w_dot if bias is None else bias,
                w_dot,
                w_r,
                w_dot if extra is None else extra,
                h0,
                h_state,
                c_state,
                out,
                gates,
                cell,
                norms,
                stats,
                *_schedule(sizes, counters, t0, t1, batch, w_hh),
                **_blocks(plan, _precision(x, dot), _upcast(dot), w_hr is not None, kind),
                **_forward_blocks(plan, bias is not None, training),
            )
        ctx.plan, ctx.batch_sizes, ctx.has_bias, ctx.dot = plan, batch_sizes, b_ih is not None, dot
        ctx.kind, ctx.rerun = kind, rerun
        if training:
            saved = (out, gates, cell, norms, stats, sizes)
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, extra, *saved)
        return out, h_state.to(x.dtype), c_state.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        inputs = ctx.saved_tensors[:9]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            if ctx.rerun is None:
                raise RuntimeError(
                    "the triton backend's backward of cell='layernorm' is not itself "
                    "differentiable (create_graph=True, double backward); use "
                    "LSTM(..., backend='fused') for higher-order gradients"
                )
            grads = (grad_output, grad_h_n, grad_c_n)
            return *reference_backward(ctx.rerun, inputs, grads, ctx.needs_input_grad[:9]), *(
                (None,) * 5
            )
        x, h0, c0, w_ih, w_hh, _, _, w_hr, extra = inputs
        out, gates, cell, norms, stats, sizes = ctx.saved_tensors[9:]
        plan, dot, layernorm = ctx.plan, ctx.dot, ctx.kind == "layernorm"
        steps, batch, inp = x.shape
        hidden, out_size = w_hh.size(0) // 4, w_hh.size(1)
        acc = gates.dtype
        dh = h0.new_zeros(h0.shape, dtype=acc) if grad_h_n is None else grad_h_n.to(acc, copy=True)
        dc = c0.new_zeros(c0.shape, dtype=acc) if grad_c_n is None else grad_c_n.to(acc, copy=True)
        if grad_output is None:
            grad_output = out.new_zeros(out.shape)
        grad_output = grad_output.contiguous()
        dz = x.new_empty(steps, batch, 4 * hidden)
        dhs = x.new_empty(steps, batch, out_size, dtype=acc) if w_hr is not None else dz
        dr = x.new_empty(steps, batch, 4 * hidden) if layernorm else dz
        dys = x.new_empty(steps, batch, hidden, dtype=acc) if layernorm else dz
        w_dot = w_hh.to(dot).contiguous()
        w_r = w_dot if w_hr is None else w_hr.to(dot).contiguous()
        counters = torch.zeros(-(-batch // plan.block_b), dtype=torch.int32, device=x.device)
        grid = (counters.numel(), plan.slices)
        for t0, t1 in _steps(plan, steps, backward=True):
            kernels().lstm_backward[grid](
                grad_output,
                w_dot,
                w_r,
                w_dot if extra is None else extra,
                c0.to(acc),
                gates,
                cell,
                norms,
                stats,
                dh,
                dc,
                dz,
                dhs,
                dr,
                dys,
                *_schedule(sizes, counters, t0, t1, batch, w_hh),
                **_blocks(plan, _precision(x, dot), _upcast(dot), w_hr is not None, ctx.kind),
                **_backward_blocks(plan),
            )
            if plan.mode == "host":  # dh_{t-1} = dz_t W_hh on the rows still running at t
                running = ctx.batch_sizes[t0] if ctx.batch_sizes else batch
                dh[:running] = torch.mm(dz[t0, :running], w_hh.to(dz.dtype)).to(acc)

        needs = ctx.needs_input_grad
        flat = dz.view(steps * batch, 4 * hidden)
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]]).view(steps * batch, out_size)
        dx = None
        if needs[0]:
            dx = dz if w_ih is None else torch.mm(flat, w_ih.to(dz.dtype)).view(steps, batch, inp)
        dw_ih = torch.mm(flat.t(), x.reshape(steps * batch, inp)) if needs[3] else None
        recurrent = dr.view(steps * batch, 4 * hidden) if layernorm else flat
        dw_hh = torch.mm(recurrent.t(), h_prev.to(dz.dtype)) if needs[4] else None
        db = flat.sum(0, dtype=acc).to(x.dtype) if ctx.has_bias else None
        y = cell  # what the output's tanh takes
        if layernorm:
            c_hat = _normalised_cell(cell, stats)
            y = c_hat * extra[8 * hidden : 9 * hidden] + extra[9 * hidden :]
        dw_hr = None
        if w_hr is not None and needs[7]:
            o = gates[..., 3 * hidden :]
            m = (o * torch.tanh(y)).view(steps * batch, hidden)  # h_t before the projection
            dw_hr = torch.mm(dhs.view(steps * batch, out_size).t(), m).to(w_hr.dtype)
        d_extra = None
        if needs[8]:
            if layernorm:
                d_extra = _layer_norm_grad(dz, norms, dys, c_hat)
            else:
                d_extra = _peephole_grad(dz, cell, c0)
            d_extra = d_extra.to(extra.dtype)
        return (
            dx,
            dh.to(h0.dtype) if needs[1] else None,
            dc.to(c0.dtype) if needs[2] else None,
            dw_ih,
            dw_hh,
            db if needs[5] else None,
            db.clone() if needs[6] else None,
            dw_hr,
            d_extra,
            None,
            None,
            None,
            None,
            None,
        )


# Dynamo cannot trace kernel launches over a Python loop of steps; as for the fused backend, a
# layer-direction is one graph break that runs eagerly.
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
    """:meth:`lstmkit.backends.contract.Backend.run`, for what :func:`supports` and
    :func:`refusal` accept. Inside ``torch.autocast`` the forward's products take operands in
    the autocast dtype; everything else runs in the input's dtype and float32."""
    dtype = cells.autocast_dtype(x)
    kind = cell.kind
    weights = {name: params.get(name) for name in _NAMES}
    if kind == "layernorm":  # the input half for all steps, outside the kernels (autograd)
        x = cell.project_input(x, params)
        weights |= {"weight_ih": None, "bias_ih": None, "bias_hh": None}  # all in x now
        weights["weight_ch"] = torch.cat([params[name] for name in _LAYERNORM])
    with autocast_off(x):
        tensors = (x, h, c, *weights.values())
        training = needs_backward(tensors)
        # higher-order gradients rerun the reference equations on the Function's own inputs,
        # which for layernorm are the input half already normalised: not a cell's inputs
        rerun = None if kind == "layernorm" else rerun_reference(cell, _NAMES, batch_sizes, masks)
        return TritonLSTM.apply(*tensors, batch_sizes, training, dtype, kind, rerun)
