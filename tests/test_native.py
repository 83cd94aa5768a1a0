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
from test_fused_cells import (
    BATCH_SIZES,
    CELL_NAMES,
    LAYERNORM_FLOAT32_TOLERANCE,
    REGULARIZERS,
    compare_backends,
    layer_function,
)
from test_parity import IN, make_hx

import lstmkit
from lstmkit import runner
from lstmkit.backends import matmul, native, reference
from lstmkit.cells import CELLS, NN_PARAMETERS
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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("regularizers", list(REGULARIZERS))
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_every_cell_and_regulariser_equals_reference(cell, regularizers, training, dtype):
    """Two stacked bidirectional layers with projection, hx and lengths, against the
    reference backend with the same masks: outputs, final states, every gradient."""
    tolerance = TOLERANCES[dtype]
    if cell == "layernorm" and dtype == torch.float32:
        tolerance = LAYERNORM_FLOAT32_TOLERANCE
    compare_backends(
        dtype,
        cell,
        REGULARIZERS[regularizers],
        training,
        tolerance,
        backend="native",
        input_size=IN,
        hidden_size=6,
        num_layers=2,
        bidirectional=True,
        proj_size=3,
    )


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_every_cell_without_projection_or_bias(cell, bias):
    compare_backends(
        torch.float64,
        cell,
        REGULARIZERS["all"],
        True,
        1e-10,
        backend="native",
        input_size=IN,
        hidden_size=6,
        bias=bias,
    )


@needs_native
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_every_cell_at_vector_widths(cell):
    """Sizes where the gate loops run whole vectors and their remainders, and the layer
    norms' partial sums all their lanes (4H = 268), float32 and float64."""
    for dtype in (torch.float64, torch.float32):
        tolerance = TOLERANCES[dtype]
        if cell == "layernorm" and dtype == torch.float32:
            tolerance = LAYERNORM_FLOAT32_TOLERANCE
        compare_backends(
            dtype,
            cell,
            REGULARIZERS["all"],
            True,
            tolerance,
            backend="native",
            input_size=40,
            hidden_size=67,
            proj_size=19,
        )


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("route", ["aten", "onednn", "rows"])
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_each_product_route_equals_reference(monkeypatch, route, cell, dtype):
    """The per-step products forced through ATen, oneDNN's packed linear (float32 only) or the
    loop for few rows, forward and backward, with every regulariser."""
    monkeypatch.setenv("LSTMKIT_NATIVE_PRODUCT", route)
    if route == "onednn" and not matmul.ONEDNN:
        pytest.skip("oneDNN's linear ops are not usable in this torch build")
    if route == "onednn" and dtype == torch.float64:
        route = "aten"  # oneDNN's linear is float32 only
    assert torch.ops.lstmkit.product_route(dtype, 5, 24, 4 * 96, True, 7) == route
    tolerance = TOLERANCES[dtype]
    if cell == "layernorm" and dtype == torch.float32:
        tolerance = LAYERNORM_FLOAT32_TOLERANCE
    compare_backends(
        dtype,
        cell,
        REGULARIZERS["all"],
        True,
        tolerance,
        backend="native",
        input_size=40,
        hidden_size=96,
        bidirectional=True,
        proj_size=24,
    )


@needs_native
def test_measuring_the_products_leaves_the_random_stream_alone(monkeypatch):
    """The first layer of a new shape times its product routes on scratch data drawn from a
    generator of its own: seeded code gets the same random numbers with or without it."""
    monkeypatch.delenv("LSTMKIT_NATIVE_PRODUCT", raising=False)
    model = lstmkit.LSTM(5, 37, backend="native")  # a shape no other test uses
    x = torch.randn(3, 2, 5)
    torch.manual_seed(1)
    want = torch.rand(4)
    torch.manual_seed(1)
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(torch.rand(4), want, atol=0, rtol=0)


@needs_native
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("batch_sizes", [None, [4, 4, 3, 1, 1]])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_native_op(proj, batch_sizes, bias):
    x, h0, c0, params = small_layer(proj=proj, bias=bias)
    names = [k for k, v in params.items() if v is not None]

    def f(x, h0, c0, *weights):
        given = dict(zip(names, weights, strict=True))
        layer = {k: given.get(k) for k in NN_PARAMETERS}
        return native.run(CELLS["lstm"], x, h0, c0, layer, batch_sizes, NO_MASKS)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *(params[k] for k in names)))


@needs_native
@pytest.mark.parametrize("training", [True, False], ids=["train masks", "eval masks"])
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_gradcheck_every_cell_with_masks(cell, training):
    """gradcheck of one layer-direction of each cell on the native backend, with lengths and
    the masks of recurrent dropout and zoneout."""
    f, inputs = layer_function(native, cell, training)
    assert torch.autograd.gradcheck(f, inputs)


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


@needs_native
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_second_derivatives_of_every_cell_with_masks(cell):
    """create_graph=True through the native backend differentiates the reference equations
    with the very masks of the forward."""
    f, inputs = layer_function(native, cell, True)
    g, _ = layer_function(reference, cell, True)
    got, want = (second_derivatives_of(fn, inputs) for fn in (f, g))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def second_derivatives_of(function, inputs):
    """d/d(inputs) of the sum of squared first derivatives of sum(outputs)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    first = torch.autograd.grad(sum(o.sum() for o in function(*leaves)), leaves, create_graph=True)
    total = sum((g * g).sum() for g in first)
    return torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)


def _op_args(cell, training, requires_grad):
    """The arguments of lstmkit::recurrence for one layer-direction of ``cell`` with masks."""
    f, inputs = layer_function(native, cell, training)
    x, h0, c0, *weights = (t.detach().requires_grad_(requires_grad) for t in inputs)
    params = dict(zip(f.names, weights, strict=True))
    xp = CELLS[cell].project_input(x, params)
    zone_h, zone_h_p = native._zone(f.masks.zoneout_h, x)
    zone_c, zone_c_p = native._zone(f.masks.zoneout_c, x)
    return (
        xp, h0, c0, *(params.get(k) for k in native.NAMES), cell, f.masks.recurrent, zone_h,
        zone_c, zone_h_p, zone_c_p, BATCH_SIZES,
    )  # fmt: skip


@needs_native
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("masks", ["train", "eval"])
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_opcheck_forward(cell, masks, training):
    args = _op_args(cell, masks == "train", training)
    torch.library.opcheck(torch.ops.lstmkit.recurrence.default, (*args, training))


@needs_native
@pytest.mark.parametrize("some_grads", [False, True])
@pytest.mark.parametrize("cell", [*CELL_NAMES, "cifg"])
def test_opcheck_backward(cell, some_grads):
    args = _op_args(cell, True, False)
    output, h_n, c_n, *saved = torch.ops.lstmkit.recurrence(*args, True)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    if some_grads:
        grads[1] = None  # autograd may pass None for an output nobody used
    _, h0, c0, *rest = args[:-1]
    backward_args = (*grads, h0, c0, *rest, output, *saved, args[-1])
    torch.library.opcheck(torch.ops.lstmkit.recurrence_backward.default, backward_args)


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
        *_, gates, cell_states, _, _, _, _ = torch.ops.lstmkit.recurrence(
            *_op_args("lstm", True, False), False
        )
    assert not got[0].requires_grad
    assert gates.numel() == cell_states.numel() == 0
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@needs_native
def test_auto_picks_native_on_the_cpu():
    _, _, _, params = small_layer(torch.float32, requires_grad=False)
    x = torch.randn(5, 4, 3)
    lstm = CELLS["lstm"]
    for cell in CELLS.values():
        assert runner.choose_backend("auto", cell, NO_MASKS, x, params) == "native"
    masks = Masks(recurrent=torch.ones(4, 2))
    assert runner.choose_backend("auto", lstm, masks, x, params) == "native"
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
    layer-direction as one lstmkit::recurrence node, with eager's numbers."""
    torch._dynamo.reset()
    model = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = run_with_grads(model, x)
    got = run_with_grads(torch.compile(model, fullgraph=True), x)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert_all_close(got, want, 1e-10)
    program = torch.export.export(model, (x,))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.lstmkit.recurrence.default) == 4
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


def assert_close_to_scale(got, want):
    """float32 sums of up to 300 products against float64: within 1e-5 of want's largest
    magnitude (or of 1)."""
    want = want.detach().double()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want, atol=1e-5 * scale, rtol=1e-5)


# (shape of a, N): a partial panel, a row of one, several blocks of rows, no rows, K = 0
LINEAR_SHAPES = [((7, 3, 5), 40), ((5,), 33), ((300, 64), 96), ((0, 4), 5), ((4, 0), 6)]


@needs_native
@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "a (K, N) tensor's .t()"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize(("shape", "out"), LINEAR_SHAPES)
def test_linear_equals_float64_linear_with_its_gradients(
    threads, tile_panels, shape, out, bias, transposed
):
    """lstmkit::linear (training's input half) against F.linear in float64: the value, the
    gradients of a, the weight and the bias, and (create_graph) the second derivatives."""
    torch.manual_seed(out)
    a = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(out, shape[-1])
    weight = (weight.t().contiguous().t() if transposed else weight).requires_grad_()
    b = torch.randn(out, requires_grad=True) if bias else None
    leaves = [t for t in (a, weight, b) if t is not None]
    got = torch.ops.lstmkit.linear(a, weight, b)
    want = torch.nn.functional.linear(*(None if t is None else t.double() for t in (a, weight, b)))
    assert_close_to_scale(got, want)
    grad = torch.randn(got.shape, dtype=torch.float64)
    firsts = torch.autograd.grad(got, leaves, grad.float(), create_graph=True)
    wants = torch.autograd.grad(want, leaves, grad, create_graph=True)
    for g, w in zip(firsts, wants, strict=True):
        assert_close_to_scale(g, w)
    if a.numel() and out:
        seconds = torch.autograd.grad(
            sum(g.square().sum() for g in firsts), leaves, allow_unused=True
        )
        want_seconds = torch.autograd.grad(
            sum(g.square().sum() for g in wants), leaves, allow_unused=True
        )
        for g, w in zip(seconds, want_seconds, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                assert_close_to_scale(g, w)


@needs_native
@pytest.mark.parametrize(("shape", "out"), LINEAR_SHAPES[:3])
def test_opcheck_linear(shape, out):
    weight = torch.randn(out, shape[-1], requires_grad=True)
    args = (torch.randn(*shape, requires_grad=True), weight, torch.randn(out, requires_grad=True))
    torch.library.opcheck(torch.ops.lstmkit.linear.default, args)
    torch.library.opcheck(
        torch.ops.lstmkit.linear.default, (args[0], weight.detach().t().contiguous().t(), None)
    )


@needs_native
@pytest.mark.parametrize(("rows", "depth"), [(37, 21), (300, 64), (8, 16), (1, 9)])
def test_linear_reads_a_transposed_a_as_it_lies(threads, tile_panels, rows, depth):
    """An a that is a (K, M) tensor's .t() (the weight gradients' dL/dz^T) is transposed a block
    of rows at a time (8 x 8 blocks, the rest one by one): the product against float64."""
    torch.manual_seed(rows)
    a = torch.randn(depth, rows).t()
    weight, bias = torch.randn(40, depth), torch.randn(40)
    got = torch.ops.lstmkit.linear(a, weight, bias)
    assert_close_to_scale(
        got, torch.nn.functional.linear(a.double(), weight.double(), bias.double())
    )


@needs_native
@pytest.mark.parametrize(("steps", "batch"), [(7, 5), (1, 3), (4, 0), (300, 2)])
@pytest.mark.parametrize("operands", ["both", "no x", "x alone"])
def test_weight_gradients_equal_float64_products(threads, tile_panels, steps, batch, operands):
    """lstmkit::weight_gradients (training's weight gradients): dz^T x and dz^T [h0;
    output[:-1]] against float64 products, with one step, an empty batch and more rows than a
    block; without x its first result is empty, without h0 and output its second (layer norm's
    W_ih gradient, from its own dz); opcheck. Neither is refused by name."""
    torch.manual_seed(steps)
    gates, size, proj = 44, 13, 6
    dz, x = torch.randn(steps, batch, gates), torch.randn(steps, batch, size)
    h0, output = torch.randn(batch, proj), torch.randn(steps, batch, proj)
    args = (
        dz,
        None if operands == "no x" else x,
        *((None, None) if operands == "x alone" else (h0, output)),
    )
    dw_ih, dw_hh = torch.ops.lstmkit.weight_gradients(*args)
    flat = dz.double().reshape(-1, gates)
    previous = torch.cat([h0.unsqueeze(0), output[:-1]]).double().reshape(-1, proj)
    if operands == "x alone":
        assert dw_hh.numel() == 0
    else:
        assert_close_to_scale(dw_hh, flat.t() @ previous)
    if operands == "no x":
        assert dw_ih.numel() == 0
    else:
        assert_close_to_scale(dw_ih, flat.t() @ x.double().reshape(-1, size))
    with pytest.raises(RuntimeError, match="x or both of h0 and output"):
        torch.ops.lstmkit.weight_gradients(dz, None, None, None)
    torch.library.opcheck(torch.ops.lstmkit.weight_gradients.default, args)


@needs_native
@pytest.mark.parametrize("projected", [False, True], ids=["no projection", "projection"])
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_recurrence_operator_in_float32_training_without_masks(cell, projected):
    """lstmkit::recurrence called directly in float32 training without masks (the modules send
    these layers to lstmkit::training_forward): its forward keeps the gates and c_t that the
    backward's rows kernel (backward_kept) reads; gradients against the reference equations in
    float64, with lengths."""
    torch.manual_seed(1)
    proj = 3 if projected else 0
    model = lstmkit.LSTM(IN, 6, proj_size=proj, cell=cell, dtype=torch.float64)
    params = model._layer_params(0, 0)
    gates = (3 if cell == "cifg" else 4) * 6
    state = (torch.randn(5, 4, gates), torch.randn(4, proj or 6), torch.randn(4, 6))
    leaves = [t.double().requires_grad_() for t in state]
    leaves += [params[k] for k in native.NAMES if params.get(k) is not None]
    names = [k for k in native.NAMES if params.get(k) is not None]
    batch_sizes = [4, 4, 3, 2, 1]
    generator = torch.Generator().manual_seed(2)
    weights = [torch.randn(s, generator=generator, dtype=torch.float64)
               for s in ((5, 4, proj or 6), (4, proj or 6), (4, 6))]  # fmt: skip

    def gradients(outputs):
        loss = sum((o.to(torch.float64) * w).sum() for o, w in zip(outputs, weights, strict=True))
        return torch.autograd.grad(loss, leaves)

    as_dtype = [t.float() for t in leaves]
    named = dict(zip(names, as_dtype[3:], strict=True))
    ours = torch.ops.lstmkit.recurrence(
        *as_dtype[:3], *(named.get(k) for k in native.NAMES), cell, None, None, None, 0.0, 0.0,
        batch_sizes, True,
    )[:3]  # fmt: skip
    named = dict(zip(names, leaves[3:], strict=True))
    want = reference.recur(CELLS[cell], *leaves[:3], {k: named.get(k) for k in native.NAMES},
                           batch_sizes, Masks())  # fmt: skip
    for got, expected in zip(gradients(ours), gradients(want), strict=True):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
