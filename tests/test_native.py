"""The native backend (C++ custom operators) against the reference backend and torch.nn.LSTM:
outputs, final states, every gradient; the operators' own checks (gradcheck, opcheck); and the
fallback where the extension cannot be loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TOLERANCES, assert_all_close, run_with_grads, second_derivatives, twin_models
from test_fused import twin_backends
from test_parity import IN, make_hx

import lstmkit
from lstmkit import runner
from lstmkit.backends import native
from lstmkit.cells import CELLS
from lstmkit.runner import NO_MASKS, Masks

AVAILABLE, WHY = lstmkit.native_available()
needs_native = pytest.mark.skipif(not AVAILABLE, reason=f"native backend unavailable: {WHY}")


def small_layer(dtype=torch.float64, proj=2, bias=True, requires_grad=True):
    """``(x, h0, c0, params)`` of one layer-direction, H = 3, P = ``proj`` or H, B = 4, T = 5."""
    hidden, out = 3, proj or 3
    shapes = {
        "weight_ih": (4 * hidden, 3),
        "weight_hh": (4 * hidden, out),
        "bias_ih": (4 * hidden,) if bias else None,
        "bias_hh": (4 * hidden,) if bias else None,
        "weight_hr": (out, hidden) if proj else None,
    }
    params = {
        k: None if s is None else (torch.randn(s, dtype=dtype) * 0.5).requires_grad_(requires_grad)
        for k, s in shapes.items()
    }
    x = torch.randn(5, 4, 3, dtype=dtype, requires_grad=requires_grad)
    h0 = torch.randn(4, out, dtype=dtype, requires_grad=requires_grad)
    c0 = torch.randn(4, hidden, dtype=dtype, requires_grad=requires_grad)
    return x, h0, c0, params


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("layers", "bidirectional", "proj"), [(1, False, 0), (2, True, 3), (3, False, 3)]
)
def test_native_matches_nn_lstm(dtype, layers, bidirectional, proj):
    ours, theirs = twin_models(
        dtype,
        input_size=IN,
        hidden_size=6,
        num_layers=layers,
        bidirectional=bidirectional,
        proj_size=proj,
        backend="native",
    )
    x = torch.randn(7, 5, IN, dtype=dtype)
    hx = make_hx(layers, bidirectional, proj, 5, dtype)
    lengths = torch.tensor([3, 7, 1, 7, 5])
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOLERANCES[dtype])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert_all_close(
        run_with_grads(ours, packed, hx), run_with_grads(theirs, packed, hx), TOLERANCES[dtype]
    )


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_larger_layer_with_lengths_equals_reference(dtype):
    """Sizes where the gate loops run whole vectors (and their remainders), with lengths."""
    ours, reference = twin_backends(
        dtype, backend="native", input_size=40, hidden_size=67, bidirectional=True, proj_size=19
    )
    x = torch.randn(12, 24, 40, dtype=dtype)
    lengths = torch.randint(1, 13, (24,))
    assert_all_close(
        run_with_grads(ours, x, lengths=lengths),
        run_with_grads(reference, x, lengths=lengths),
        TOLERANCES[dtype],
    )


@needs_native
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("batch_sizes", [None, [4, 4, 3, 1, 1]])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_native_op(proj, batch_sizes, bias):
    x, h0, c0, params = small_layer(proj=proj, bias=bias)
    names = [k for k, v in params.items() if v is not None]

    def f(x, h0, c0, *weights):
        given = dict(zip(names, weights, strict=True))
        layer = {k: given.get(k) for k in native.NAMES}
        return native.run(CELLS["lstm"], x, h0, c0, layer, batch_sizes, NO_MASKS)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *(params[k] for k in names)))


@needs_native
def test_gradcheck_and_gradgradcheck_through_the_module():
    """gradcheck through backend="native"; second derivatives through the reference
    equations (create_graph=True), equal to the reference backend's."""
    ours, reference = twin_backends(
        backend="native", input_size=3, hidden_size=4, num_layers=2, proj_size=2
    )
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ours(x)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda x: ours(x)[0], (x,))
    pairs = zip(second_derivatives(ours, x), second_derivatives(reference, x), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def _forward_args(training, batch_sizes, proj=2, bias=True):
    x, h0, c0, params = small_layer(proj=proj, bias=bias, requires_grad=training)
    return (x, h0, c0, *(params[k] for k in native.NAMES), batch_sizes, training)


@needs_native
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch_sizes", [[], [4, 4, 3, 1, 1]])
@pytest.mark.parametrize(("proj", "bias"), [(2, True), (0, False)])
def test_opcheck_forward(training, batch_sizes, proj, bias):
    args = _forward_args(training, batch_sizes, proj, bias)
    torch.library.opcheck(torch.ops.lstmkit.lstm_forward.default, args)


@needs_native
@pytest.mark.parametrize("batch_sizes", [[], [4, 4, 3, 1, 1]])
@pytest.mark.parametrize(("proj", "bias"), [(2, True), (0, False)])
@pytest.mark.parametrize("some_grads", [False, True])
def test_opcheck_backward(batch_sizes, proj, bias, some_grads):
    args = _forward_args(False, batch_sizes, proj, bias)
    x, h0, c0, w_ih, w_hh, _, _, w_hr = args[:8]
    output, h_n, c_n, gates, cell_states = torch.ops.lstmkit.lstm_forward(*args[:9], True)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    if some_grads:
        grads[1] = None  # autograd may pass None for an output nobody used
    backward_args = (
        *grads, x, h0, c0, w_ih, w_hh, w_hr, output, gates, cell_states, batch_sizes, bias, True
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lstmkit.lstm_backward.default, backward_args)


@needs_native
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_keeps_nothing_and_equals_reference(mode):
    ours, reference = twin_backends(
        backend="native", input_size=IN, hidden_size=6, num_layers=2, proj_size=3
    )
    x = torch.randn(6, 4, IN, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 1])
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context():
        got = ours(x, lengths=lengths)
        want = reference(x, lengths=lengths)
        args = _forward_args(True, [4, 4, 3, 1, 1])[:9]
        *_, gates, cell_states = torch.ops.lstmkit.lstm_forward(*args, False)
    assert not got[0].requires_grad
    assert gates.numel() == cell_states.numel() == 0
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@needs_native
def test_long_inference_projects_the_input_in_blocks():
    """Inference computes the input half of the gates a block of steps at a time (B x 4H x 32
    steps here): every block boundary, with lengths, equals the reference."""
    ours, reference = twin_backends(backend="native", input_size=8, hidden_size=512)
    x = torch.randn(70, 64, 8, dtype=torch.float64)
    lengths = torch.randint(1, 71, (64,))
    lengths[0] = 70
    with torch.no_grad():
        got, want = ours(x, lengths=lengths), reference(x, lengths=lengths)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@needs_native
def test_auto_picks_native_on_the_cpu():
    weights = [None if w is None else w.float() for w in _forward_args(False, [])[3:8]]
    params = dict(zip(native.NAMES, weights, strict=True))
    x = torch.randn(5, 4, 3)
    lstm = CELLS["lstm"]
    assert runner.choose_backend("auto", lstm, NO_MASKS, x, params) == "native"
    assert runner.choose_backend("auto", CELLS["peephole"], NO_MASKS, x, params) == "fused"
    masks = Masks(recurrent=torch.ones(4, 2))
    assert runner.choose_backend("auto", lstm, masks, x, params) == "fused"
    with torch.autocast("cpu"):
        assert runner.choose_backend("auto", lstm, NO_MASKS, x, params) == "fused"
    half = {k: None if v is None else v.half() for k, v in params.items()}
    assert runner.choose_backend("auto", lstm, NO_MASKS, x.half(), half) == "fused"
    with pytest.raises(ValueError, match=r"float16.*backend='auto'"):
        runner.choose_backend("native", lstm, NO_MASKS, x.half(), half)


@needs_native
def test_torch_func_falls_back_from_native():
    """torch.func transforms run the reference equations, as with the fused backend."""
    model = lstmkit.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = torch.func.grad(lambda x: model(x)[0].sum())(x)
    x.requires_grad_()
    model(x)[0].sum().backward()
    torch.testing.assert_close(got, x.grad, atol=1e-10, rtol=0)


@needs_native
def test_compile_and_export_keep_the_native_op():
    """With the default backend, torch.compile(fullgraph=True) and torch.export keep each
    layer-direction as one lstmkit::lstm_forward node, with eager's numbers."""
    torch._dynamo.reset()
    model = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = run_with_grads(model, x)
    got = run_with_grads(torch.compile(model, fullgraph=True), x)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert_all_close(got, want, 1e-10)
    program = torch.export.export(model, (x,))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.lstmkit.lstm_forward.default) == 4
    torch.testing.assert_close(program.module()(x)[0], model(x)[0], atol=1e-10, rtol=0)


@needs_native
def test_compile_first_in_a_fresh_process():
    """The first question about the backend may come from inside torch.compile(fullgraph=True):
    dynamo takes the answer as a constant instead of tracing the loading code."""
    script = textwrap.dedent(
        """
        import torch, lstmkit
        model = lstmkit.LSTM(3, 4, num_layers=2)
        x = torch.randn(3, 2, 3)
        compiled = torch.compile(model, fullgraph=True)(x)[0]
        print(float((compiled - model(x)[0]).abs().max()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert float(done.stdout.splitlines()[-1]) < 1e-6


FALLBACK = textwrap.dedent(
    """
    import json, warnings
    import torch, lstmkit
    ok, why = lstmkit.native_available()
    torch.manual_seed(0)
    model = lstmkit.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [model(x)[0] for _ in range(3)]
    model.backend = "fused"
    fused = model(x)[0]
    model.backend = "native"
    try:
        model(x)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "ok": ok, "why": why, "error": error,
        "warnings": [str(w.message) for w in caught if "native" in str(w.message)],
        "same_as_fused": all(torch.equal(o, fused) for o in out),
    }))
    """
)


def _run_fallback(**env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"LSTMKIT_NATIVE": "0"}, "LSTMKIT_NATIVE=0"),
        ({"CXX": "/nonexistent/c++", "LSTMKIT_CACHE_DIR": "{tmp}"}, "no C++ compiler"),
    ],
    ids=["forced-off", "no-compiler"],
)
def test_fallback_when_unavailable(tmp_path, env, reason):
    """Forced off, or nothing cached and no compiler: native_available() says why, "auto"
    runs the fused backend and warns once, backend="native" is a ValueError naming the reason
    and backend='auto'."""
    result = _run_fallback(**{k: v.format(tmp=tmp_path) for k, v in env.items()})
    assert result["ok"] is False
    assert reason in result["why"]
    assert result["same_as_fused"]
    assert len(result["warnings"]) == 1
    assert reason in result["warnings"][0]
    assert reason in result["error"]
    assert "backend='auto'" in result["error"]
