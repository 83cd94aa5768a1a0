"""The triton backend against the reference backend: outputs, final states, every gradient.

No GPU needed: the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors,
at sizes small enough for it, for the lstm, the peephole and the layernorm cells. Each of the
three ways of dividing the hidden units (``docs/gpu.md``) is forced in turn (the layernorm cell
runs in ``"registers"`` only); ``"barrier"`` with one slice only, since the interpreter runs
programs one after another and a second slice would wait forever at the grid barrier.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip(
    "triton",
    reason="the triton package is not installed (pip install triton): the triton backend's "
    "kernels are tested in its interpreter",
)

from conftest import TOLERANCES, assert_all_close, run_with_grads
from test_fused import twin_backends

import lstmkit
from lstmkit import runner
from lstmkit.backends import triton as backend
from lstmkit.cells import CELLS

# triton.jit reads TRITON_INTERPRET when the kernels are defined (on their first use) and the
# interpreter reads it again while they run: set here to define them, then only while this
# file's tests run (interpreted, the backend accepts CPU tensors: other files expect it not to).
_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = _BEFORE or "1"
_DEFINED_INTERPRETED = backend.kernels().INTERPRETED
if _BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
if not _DEFINED_INTERPRETED:
    pytest.skip(
        "the triton kernels are compiled for the GPU in this process (TRITON_INTERPRET is not "
        "1, or they were used before this file); run this file alone to test them in Triton's "
        "interpreter",
        allow_module_level=True,
    )

IN, STEPS = 3, 5
LENGTHS = [5, 2, 4]


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    """``TRITON_INTERPRET=1`` for this file's tests only."""
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _BEFORE is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


def forced(mode: str):
    """A :func:`backend._plan` that divides the units as ``mode`` says: ``"registers"`` as
    chosen for these small sizes, ``"barrier"`` with one slice, ``"host"`` in slices of 16."""

    def plan(batch, hidden, out_size, proj, itemsize, programs):
        natural = backend.Plan(
            min(64, backend._pow2(batch)),
            backend._pow2(hidden),
            backend._pow2(out_size),
            backend._pow2(out_size),
            1,
            "registers",
        )
        if mode == "registers":
            return natural
        block_h = natural.block_h if mode == "barrier" else 16
        slices = -(-hidden // block_h)
        return backend.Plan(natural.block_b, block_h, natural.block_k, block_h, slices, mode)

    return plan


CASES = {  # id: (cell, mode, hidden, proj, bias, lengths, bidirectional, batch)
    "registers": ("lstm", "registers", 6, 0, True, None, False, 3),
    "registers-lengths-bi": ("lstm", "registers", 6, 0, True, LENGTHS, True, 3),
    "registers-nobias-lengths": ("lstm", "registers", 6, 0, False, [3, 5, 1], False, 3),
    "registers-proj-lengths": ("lstm", "registers", 6, 4, True, LENGTHS, False, 3),
    "registers-proj-nobias-bi": ("lstm", "registers", 6, 4, False, None, True, 3),
    "registers-2-batch-blocks": ("lstm", "registers", 6, 0, True, [5, 1, 3] * 6, True, 18),
    "barrier-lengths": ("lstm", "barrier", 6, 0, True, LENGTHS, False, 3),
    "barrier-h20-bi": ("lstm", "barrier", 20, 0, True, None, True, 3),
    "host-h20-lengths-bi": ("lstm", "host", 20, 0, True, LENGTHS, True, 3),
    "host-h20-nobias": ("lstm", "host", 20, 0, False, None, False, 3),
    "peephole-registers-lengths-bi": ("peephole", "registers", 6, 0, True, LENGTHS, True, 3),
    "peephole-registers-proj-nobias": ("peephole", "registers", 6, 4, False, [3, 5, 1], False, 3),
    "peephole-barrier-h12-lengths-bi": ("peephole", "barrier", 12, 0, True, LENGTHS, True, 3),
    "peephole-host-h20-lengths": ("peephole", "host", 20, 0, True, [5, 2, 4, 1], False, 4),
    "layernorm-registers-lengths-bi": ("layernorm", "registers", 6, 0, True, LENGTHS, True, 3),
    "layernorm-registers-proj-nobias": ("layernorm", "registers", 6, 4, False, [3, 5, 1], False, 3),
    "layernorm-registers-h16-lengths": (
        "layernorm",
        "registers",
        16,
        0,
        True,
        [5, 1, 3, 4],
        False,
        4,
    ),
}


def build(monkeypatch, dtype, case):
    """For ``case``: a triton model (its LN gains and biases, if any, moved away from ones and
    zeros), its reference twin, an input, a state and the lengths."""
    cell, mode, hidden, proj, bias, lengths, bidirectional, batch = case
    monkeypatch.setattr(backend, "_plan", forced(mode))
    ours, reference = twin_backends(
        dtype,
        "triton",
        cell=cell,
        input_size=IN,
        hidden_size=hidden,
        proj_size=proj,
        bias=bias,
        bidirectional=bidirectional,
    )
    with torch.no_grad():
        for name, value in ours.named_parameters():
            if name.startswith("ln_"):
                value.add_(torch.rand_like(value) - 0.5)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(STEPS, batch, IN, dtype=dtype)
    directions = 2 if bidirectional else 1
    hx = (
        torch.randn(directions, batch, proj or hidden, dtype=dtype),
        torch.randn(directions, batch, hidden, dtype=dtype),
    )
    return ours, reference, x, hx, None if lengths is None else torch.tensor(lengths)


# In float32 the layernorm cell's gradients differ from float64 by up to ~5e-6 of each tensor's
# scale, in the reference backend itself (cancellations in the LN backward over rows of a few
# units): more than 1e-5 absolute on the larger ones. It is checked against float64 instead.
EXACT = [
    pytest.param(dtype, case, id=f"{name}-{label}")
    for name, case in CASES.items()
    for dtype, label in ((torch.float64, "f64"), (torch.float32, "f32"))
    if dtype == torch.float64 or case[0] != "layernorm"
]
LAYERNORM = {name: case for name, case in CASES.items() if case[0] == "layernorm"}


@pytest.mark.parametrize(("dtype", "case"), EXACT)
def test_triton_equals_reference(monkeypatch, dtype, case):
    ours, reference, x, hx, lengths = build(monkeypatch, dtype, case)
    options = {} if lengths is None else {"lengths": lengths}
    assert_all_close(
        run_with_grads(ours, x, hx, **options),
        run_with_grads(reference, x, hx, **options),
        TOLERANCES[dtype],
    )


@pytest.mark.parametrize("case", LAYERNORM.values(), ids=LAYERNORM.keys())
def test_layernorm_float32_against_float64(monkeypatch, case):
    """The triton backend and the reference backend in float32 are each within 1e-5 of every
    tensor's scale of the float64 reference on the same weights and inputs."""
    ours, reference, x, hx, lengths = build(monkeypatch, torch.float32, case)
    exact = copy.deepcopy(reference).double()
    steps, batch, hidden, out_size = STEPS, x.size(1), hx[1].size(2), hx[0].size(2)
    directions = hx[0].size(0)
    weights = [
        torch.randn(steps, batch, directions * out_size, dtype=torch.float64),
        torch.randn(directions, batch, out_size, dtype=torch.float64),
        torch.randn(directions, batch, hidden, dtype=torch.float64),
    ]
    want = grads_of(exact, x.double(), tuple(s.double() for s in hx), lengths, weights)
    for model in (ours, reference):
        got = grads_of(model, x, hx, lengths, weights)
        for key, value in want.items():
            scale = value.abs().max().item()
            torch.testing.assert_close(got[key].double(), value, atol=1e-5 * scale, rtol=0)


def test_two_layers_without_hx_and_weight_drop():
    """Stacked layers, zero initial state, and weight drop (drawn by the runner before the
    backend runs: the same seed gives both backends the same mask)."""
    config = {"input_size": IN, "hidden_size": 6, "num_layers": 2, "weight_drop": 0.3}
    ours, reference = twin_backends(torch.float64, "triton", **config)
    x = torch.randn(STEPS, 3, IN, dtype=torch.float64)
    torch.manual_seed(5)
    got = run_with_grads(ours.train(), x)
    torch.manual_seed(5)
    assert_all_close(got, run_with_grads(reference.train(), x), TOLERANCES[torch.float64])


@pytest.mark.parametrize("cell", ["lstm", "layernorm"])
def test_inference_equals_reference(cell):
    """Without autograd the forward saves nothing and still gives the same outputs."""
    ours, reference = twin_backends(
        torch.float32, "triton", cell=cell, input_size=IN, hidden_size=6
    )
    x = torch.randn(STEPS, 3, IN)
    with torch.no_grad():
        got, (h_n, c_n) = ours(x, lengths=torch.tensor(LENGTHS))
        want, (h_ref, c_ref) = reference(x, lengths=torch.tensor(LENGTHS))
    tol = TOLERANCES[torch.float32]
    for a, b in ((got, want), (h_n, h_ref), (c_n, c_ref)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def grads_of(model, x, hx, lengths, weights):
    """Outputs and the gradients of input, state and parameters of ``sum(weights * outputs)``,
    the weights given in float64 (``run_with_grads`` draws them in the model's dtype)."""
    x, hx = x.detach().requires_grad_(), tuple(s.detach().requires_grad_() for s in hx)
    output, (h_n, c_n) = model(x, hx, lengths=lengths)
    results = {"output": output, "h_n": h_n, "c_n": c_n}
    loss = sum((t * w.to(t.dtype)).sum() for t, w in zip(results.values(), weights, strict=True))
    leaves = {"input": x, "h_0": hx[0], "c_0": hx[1], **dict(model.named_parameters())}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: v.detach() for k, v in results.items()} | {
        f"grad {k}": g for k, g in zip(leaves, grads, strict=True)
    }


@pytest.mark.parametrize("cell", ["lstm", "peephole", "layernorm"])
def test_bfloat16_against_float64(cell):
    """bfloat16 inputs and weights, float32 accumulation and cell state: within bfloat16's
    resolution of the float64 reference on the same (rounded) weights and inputs."""
    ours = lstmkit.LSTM(IN, 16, cell=cell, dtype=torch.bfloat16, backend="triton")
    reference = lstmkit.LSTM(IN, 16, cell=cell, dtype=torch.float64, backend="reference")
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(STEPS, 3, IN).to(torch.bfloat16)
    hx = tuple(torch.randn(1, 3, 16).to(torch.bfloat16) for _ in range(2))
    weights = [torch.randn(STEPS, 3, 16, dtype=torch.float64)] + [
        torch.randn(1, 3, 16, dtype=torch.float64) for _ in range(2)
    ]
    lengths = torch.tensor(LENGTHS)
    got = grads_of(ours, x, hx, lengths, weights)
    want = grads_of(reference, x.double(), tuple(s.double() for s in hx), lengths, weights)
    for key, value in want.items():
        assert got[key].dtype == torch.bfloat16, key
        # bfloat16 keeps 8 bits: relative to each tensor's scale
        scale = value.abs().max().item()
        torch.testing.assert_close(got[key].double(), value, atol=2e-2 * scale, rtol=0)


def test_double_backward_equals_reference():
    ours = lstmkit.LSTM(IN, 6, dtype=torch.float64, backend="triton")
    reference = lstmkit.LSTM(IN, 6, dtype=torch.float64, backend="reference")
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(STEPS, 2, IN, dtype=torch.float64, requires_grad=True)

    def second_derivative(model):
        (grad,) = torch.autograd.grad(model(x)[0].square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), (x, *model.parameters()))

    for got, want in zip(second_derivative(ours), second_derivative(reference), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_double_backward_of_layernorm_is_refused():
    model = lstmkit.LSTM(IN, 6, dtype=torch.float64, cell="layernorm", backend="triton")
    x = torch.randn(STEPS, 2, IN, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="backend='fused'\\) for higher-order gradients"):
        torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)


def layer(hidden: int, proj: int = 0, dtype=torch.float32, cell: str = "lstm"):
    """An input ``(T, B, I)`` and the parameters of one layer-direction."""
    model = lstmkit.LSTM(IN, hidden, proj_size=proj, cell=cell, dtype=dtype)
    names = (*backend._NAMES, *CELLS[cell].extra)
    params = {name: getattr(model, f"{name}_l0", None) for name in names}
    return torch.randn(STEPS, 2, IN, dtype=dtype), params


@pytest.mark.parametrize("cell", ["lstm", "peephole", "layernorm"])
def test_auto_never_picks_triton_for_cpu_tensors(cell):
    x, params = layer(6, cell=cell)
    on_cpu = "native" if lstmkit.native_available()[0] else "fused"
    assert runner.choose_backend("auto", CELLS[cell], runner.NO_MASKS, x, params) == on_cpu
    assert runner.choose_backend("triton", CELLS[cell], runner.NO_MASKS, x, params) == "triton"


def test_explicit_triton_refuses_what_it_cannot_run(monkeypatch):
    x, params = layer(6)
    masks = runner.Masks(recurrent=torch.ones(2, 6))
    with pytest.raises(ValueError, match="backend='triton' cannot run cell='lstm' with recurrent"):
        runner.choose_backend("triton", CELLS["lstm"], masks, x, params)
    with pytest.raises(ValueError, match="backend='triton' cannot run cell='cifg'"):
        runner.choose_backend("triton", CELLS["cifg"], runner.NO_MASKS, x, params)
    with pytest.raises(ValueError, match="cannot run cell='layernorm' with recurrent_dropout"):
        runner.choose_backend("triton", CELLS["layernorm"], masks, x, params)
    wide, wide_params = layer(128, cell="layernorm")
    with pytest.raises(ValueError, match="cell='layernorm' with hidden_size=128: its layer norms"):
        runner.choose_backend("triton", CELLS["layernorm"], runner.NO_MASKS, wide, wide_params)
    with pytest.raises(ValueError, match="cannot run cell='peephole' with recurrent_dropout"):
        runner.choose_backend("triton", CELLS["peephole"], masks, x, params)
    big, big_params = layer(256, proj=128)
    with pytest.raises(ValueError, match="proj_size=128 with hidden_size=256"):
        runner.choose_backend("triton", CELLS["lstm"], runner.NO_MASKS, big, big_params)
    monkeypatch.setattr(backend.kernels(), "INTERPRETED", False)
    with pytest.raises(ValueError, match="tensors are on 'cpu', not CUDA"):
        lstmkit.LSTM(IN, 6, backend="triton")(x)
    monkeypatch.setattr(backend, "AVAILABLE", False)
    with pytest.raises(ValueError, match=r"triton package is not installed \(pip install triton"):
        runner.choose_backend("triton", CELLS["lstm"], runner.NO_MASKS, x, params)


@pytest.mark.parametrize("mode", ["barrier", "host"])
def test_layernorm_runs_in_registers_only(monkeypatch, mode):
    """Its statistics need all 4H pre-activations in one program: where the units would be
    split, ``backend="triton"`` refuses and ``"auto"`` runs the next backend (on these CPU
    tensors, native where it loads)."""
    monkeypatch.setattr(backend, "_plan", forced(mode))
    x, params = layer(6, cell="layernorm")
    on_cpu = "native" if lstmkit.native_available()[0] else "fused"
    assert runner.choose_backend("auto", CELLS["layernorm"], runner.NO_MASKS, x, params) == on_cpu
    with pytest.raises(ValueError, match=f"would need mode '{mode}'"):
        lstmkit.LSTM(IN, 6, cell="layernorm", backend="triton")(x)


@pytest.mark.parametrize("itemsize", [4, 2])
@pytest.mark.parametrize("batch", [1, 16, 64, 256])
@pytest.mark.parametrize("hidden", [64, 128, 256, 512, 768, 1024])
def test_plans_fit_their_limits(itemsize, batch, hidden):
    """Every plan covers all units; only a barrier plan splits units across resident
    programs, and never into more programs than may be resident or weights that do not fit."""
    plan = backend._plan(batch, hidden, hidden, False, itemsize, programs=132)
    assert plan.slices * plan.block_h >= hidden
    assert plan.block_out == plan.block_h
    weights = 4 * plan.block_k * plan.block_h * itemsize
    if plan.mode == "registers":
        assert plan.slices == 1 and plan.block_h >= hidden and weights <= backend.ON_CHIP_BYTES
    if plan.mode == "barrier":
        assert -(-batch // plan.block_b) * plan.slices <= 132
        assert weights <= backend.ON_CHIP_BYTES
    projected = backend._plan(batch, hidden, hidden // 2, True, itemsize, 132)
    assert projected is None or projected.mode == "registers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    def on_cuda(hidden, cell):
        x, params = layer(hidden, cell=cell)
        return x.cuda(), {k: None if v is None else v.cuda() for k, v in params.items()}

    for cell in ("lstm", "peephole", "layernorm"):
        x, params = on_cuda(6, cell)
        assert runner.choose_backend("auto", CELLS[cell], runner.NO_MASKS, x, params) == "triton"
    masks = runner.Masks(zoneout_h=0.1)
    assert runner.choose_backend("auto", CELLS["layernorm"], masks, x, params) == "fused"
    x, params = on_cuda(128, "layernorm")  # 4H x H float32 weights: too many for "registers"
    assert runner.choose_backend("auto", CELLS["layernorm"], runner.NO_MASKS, x, params) == "fused"


def test_interpreter_refuses_a_barrier_it_could_never_finish():
    """A multi-slice barrier plan waits for programs the interpreter runs one at a time: it is
    refused (before, ``lstmkit train --backend triton`` hung there after this file's tests)."""
    wide, wide_params = layer(128)
    assert backend._layer_plan(wide, wide_params, None).slices > 1
    with pytest.raises(ValueError, match="mode 'barrier' with 4 slices in Triton's interpreter"):
        runner.choose_backend("triton", CELLS["lstm"], runner.NO_MASKS, wide, wide_params)
