"""The native backend's float32 training path on rows (the forward kept by the inference
kernel, the backward by backward_kept: each thread walks its rows of the batch back in time on
its own products) against the reference backend's autograd in float64: every cell it runs,
projection, lengths, a given state, one step and eleven, gradients of every output, 1 to 3
threads, batches smaller and larger than the thread count and around the kernel's tiles."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_native import needs_native

import lstmkit
from lstmkit import cells
from lstmkit.backends import native

# float32 sums over T steps and 4H products against float64; H <= 40, T <= 11
GRADIENT_TOLERANCE = 2e-5
# layernorm's, relative to each gradient's largest value: the worst seen over these tests was
# 3.6e-5, where the reference backend in float32 reached 1.2e-5 and the median over seeds of
# both, and of lstmkit::recurrence's path, was 2e-6 to 5e-6
LAYERNORM_GRADIENT_TOLERANCE = 1e-4


@pytest.fixture(params=["linear", "aten"], ids=["input half by lstmkit::linear", "by ATen"])
def input_half(request, monkeypatch):
    """The input's gradient of training's input half (and, with recurrent dropout or zoneout,
    the input half itself) on the backend's own product (lstmkit::linear) at any size, or on
    ATen's at every size: both routes run whatever rows the test has."""
    rows = 0 if request.param == "linear" else 1 << 62
    monkeypatch.setattr(native, "LINEAR_MIN_ROWS", rows)
    return request.param


def gradients(model, x, hx, lengths, weights):
    """Gradients of sum(weights * outputs) with respect to x, hx and every parameter."""
    x = x.clone().requires_grad_()
    hx = tuple(s.clone().requires_grad_() for s in hx)
    output, (h_n, c_n) = model(x, hx, lengths=lengths)
    loss = sum((w * o).sum() for w, o in zip(weights, (output, h_n, c_n), strict=True))
    inputs = [x, *hx, *model.parameters()]
    return torch.autograd.grad(loss, inputs)


def assert_gradients_close(cell, batch, hidden=40, proj_size=0, lengths=None, layers=2, steps=11):
    torch.manual_seed(batch + hidden)
    ours = lstmkit.LSTM(5, hidden, layers, cell=cell, backend="native", proj_size=proj_size,
                        bidirectional=True)  # fmt: skip
    reference = lstmkit.LSTM(5, hidden, layers, cell=cell, backend="reference",
                             proj_size=proj_size, bidirectional=True,
                             dtype=torch.float64)  # fmt: skip
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(steps, batch, 5)
    h_size = proj_size or hidden
    hx = (torch.randn(2 * layers, batch, h_size), torch.randn(2 * layers, batch, hidden))
    output_size = 2 * h_size
    weights = (
        torch.randn(steps, batch, output_size),
        torch.randn(2 * layers, batch, h_size),
        torch.randn(2 * layers, batch, hidden),
    )
    got = gradients(ours, x, hx, lengths, weights)
    want = gradients(
        reference, x.double(), tuple(s.double() for s in hx), lengths,
        tuple(w.double() for w in weights),
    )  # fmt: skip
    for name, a, b in zip(["x", "h0", "c0", *dict(ours.named_parameters())], got, want,
                          strict=True):  # fmt: skip
        assert a.dtype == torch.float32, name
        atol = GRADIENT_TOLERANCE
        if cell == "layernorm":  # gradients up to ~150, each layer norm scaling by 1 / std
            atol = LAYERNORM_GRADIENT_TOLERANCE * max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=1e-5, msg=name)


@needs_native
@pytest.mark.parametrize("batch", [1, 2, 7, 13])
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_every_cell_equals_reference(threads, input_half, cell, batch):
    """Two stacked bidirectional layers with a given state; with lengths, finished rows keep
    their gradients until the step where they ended (a thread's running rows are a prefix of
    its rows)."""
    assert_gradients_close(cell, batch)
    lengths = torch.randint(1, 12, (batch,))
    lengths[0] = 11
    assert_gradients_close(cell, batch, lengths=lengths)
    assert_gradients_close(cell, batch, steps=1)  # one step: the weights read plain


@needs_native
@pytest.mark.parametrize("route", ["plain", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_one_row_a_worker_reads_w_hh_either_way(monkeypatch, threads, cell, route):
    """The forward kept for training, where each worker has one row, with W_hh read as it lies
    or packed (LSTMKIT_NATIVE_ONE_ROW forced), with and without lengths and a projection."""
    monkeypatch.setenv("LSTMKIT_NATIVE_ONE_ROW", route)
    for batch in (1, threads):
        assert_gradients_close(cell, batch)
        assert_gradients_close(cell, batch, lengths=[11] + [4] * (batch - 1))
    assert_gradients_close(cell, 1, hidden=33, proj_size=7)


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_projection(threads, input_half, cell):
    """dL/dm = dL/dh' W_hr on the rows kernel, and m again for dW_hr."""
    assert_gradients_close(cell, 5, hidden=33, proj_size=7)
    assert_gradients_close(cell, 5, hidden=33, proj_size=7, lengths=[11, 1, 3, 11, 2])
    assert_gradients_close(cell, 5, hidden=33, proj_size=7, steps=1)


@needs_native
@pytest.mark.parametrize("hidden", [8, 16, 31, 64])
@pytest.mark.parametrize("batch", [1, 2, 7, 13])
def test_sizes_around_the_tiles_equal_nn_lstm(threads, tile_panels, batch, hidden):
    """Against torch.nn.LSTM's own float32 gradients: batch sizes that fill one, two and
    several row tiles of one and of two panels, hidden sizes below, at and past a vector and a
    panel."""
    torch.manual_seed(hidden)
    oracle = torch.nn.LSTM(hidden + 3, hidden, num_layers=2, batch_first=True)
    ours = lstmkit.LSTM.from_torch(oracle)
    x = torch.randn(batch, 11, hidden + 3)
    weights = torch.randn(batch, 11, hidden)
    got = torch.autograd.grad((ours(x)[0] * weights).sum(), list(ours.parameters()))
    want = torch.autograd.grad((oracle(x)[0] * weights).sum(), list(oracle.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_native
def test_products_deeper_than_one_pass_equal_nn_lstm(threads, input_half):
    """Sums over more than one pass of the products' depth (1024 with AVX-512, 256 with AVX2):
    an input of 1500 features in the forward, 4H = 1040 gate rows in the backward's dz W_hh, in
    inference and in training, against torch.nn.LSTM's float32."""
    torch.manual_seed(0)
    oracle = torch.nn.LSTM(1500, 260)
    ours = lstmkit.LSTM.from_torch(oracle)
    x = torch.randn(3, 7, 1500)
    weights = torch.randn(3, 7, 260)
    with torch.no_grad():
        for a, b in zip(ours.eval()(x)[0], oracle(x)[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    got = torch.autograd.grad((ours.train()(x)[0] * weights).sum(), [x, *ours.parameters()])
    want = torch.autograd.grad((oracle(x)[0] * weights).sum(), [x, *oracle.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def operators_run(run) -> set[str]:
    """The lstmkit:: operators that ``run()`` calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return {e.name for e in prof.events() if e.name.startswith("lstmkit::")}


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_second_derivatives_through_training_forward_equal_reference(cell):
    """create_graph=True through lstmkit::training_forward (the float32 training forward from
    the input) differentiates the reference equations: second derivatives of two layers with
    lengths equal the float64 reference backend's."""
    torch.manual_seed(0)
    proj_size = 3 if cell == "lstm" else 0
    ours = lstmkit.LSTM(5, 7, 2, cell=cell, backend="native", proj_size=proj_size)
    reference = lstmkit.LSTM(5, 7, 2, cell=cell, backend="reference", proj_size=proj_size,
                             dtype=torch.float64)  # fmt: skip
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(4, 3, 5)
    lengths = [4, 2, 3]

    def second(model, x):
        x = x.clone().requires_grad_()
        out, (h_n, c_n) = model(x, lengths=lengths)
        loss = out.square().sum() + h_n.sum() + c_n.square().sum()
        leaves = (x, *model.parameters())
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    assert "lstmkit::training_forward" in operators_run(lambda: second(ours, x))
    for a, b in zip(second(ours, x), second(reference, x.double()), strict=True):
        scale = b.abs().max().item() if cell == "layernorm" else 1.0
        torch.testing.assert_close(a.double(), b, atol=1e-4 * max(scale, 1.0), rtol=1e-4)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_direct_functions_equal_the_operators_registration(monkeypatch, cell, dtype):
    """Training calls the operators through autograd.Functions of their own formula
    (native._direct: training_forward in float32, recurrence in float64), and under
    torch.compile through the operators' torch.library registration: the same outputs and
    gradients, bit for bit, with lengths and a projection."""
    torch.manual_seed(0)
    model = lstmkit.LSTM(5, 6, 2, cell=cell, proj_size=4 if cell == "lstm" else 0, dtype=dtype)
    x = torch.randn(7, 3, 5, dtype=dtype)
    out_size = model.proj_size or 6
    hx = (torch.randn(2, 3, out_size, dtype=dtype), torch.randn(2, 3, 6, dtype=dtype))
    weights = (torch.randn(7, 3, out_size, dtype=dtype), *(torch.randn_like(s) for s in hx))
    operator = "lstmkit::training_forward" if dtype == torch.float32 else "lstmkit::recurrence"

    def run():
        return gradients(model, x, hx, [7, 5, 2], weights)

    assert operator in operators_run(run)
    direct = run()
    for function, name in (("_TrainingForward", "training_forward"), ("_Recurrence", "recurrence")):
        monkeypatch.setattr(
            native, function, SimpleNamespace(apply=getattr(torch.ops.lstmkit, name))
        )
    assert operator in operators_run(run)
    for a, b in zip(direct, run(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "layernorm"])
def test_opcheck_training_forward(cell):
    ours = lstmkit.LSTM(5, 6, cell=cell, proj_size=4 if cell == "lstm" else 0)
    params = ours._layer_params(0, 0)
    out = ours.proj_size or 6
    args = (
        torch.randn(5, 3, 5, requires_grad=True), torch.randn(3, out), torch.randn(3, 6),
        *(params.get(n) for n in native.LAYER_NAMES), cell, [3, 3, 2, 1, 1],
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lstmkit.training_forward.default, args)


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_layer_norm_backward_in_place_equals_autograd(threads, rows):
    """lstmkit::layer_norm_backward_ (layernorm training's input half) turns the gradient of
    gain LN(v) + shift into v's in place and returns the gain's, as autograd through
    F.layer_norm gives them in float64; rows of a finished sequence (zero gradient, zero
    statistics) stay zero."""
    torch.manual_seed(rows)
    width = 37
    v = torch.randn(rows, width) * 3 + 1
    gain = torch.randn(width)
    upstream = torch.randn(rows, width)
    upstream[-1] = 0  # a finished row: its statistics were never written
    mean = v.mean(-1, keepdim=True)
    rstd = (v.var(-1, unbiased=False, keepdim=True) + cells.LAYER_NORM_EPS).rsqrt()
    mean[-1], rstd[-1] = 0, 0
    v64, gain64 = v.double().requires_grad_(), gain.double().requires_grad_()
    out = torch.nn.functional.layer_norm(v64, (width,), gain64, None, cells.LAYER_NORM_EPS)
    want_v, want_gain = torch.autograd.grad(out, (v64, gain64), upstream.double())
    want_v[-1] = 0  # the kernel's finished row, whatever v holds there
    grad = upstream.clone()
    got_gain = torch.ops.lstmkit.layer_norm_backward_(grad, v, torch.stack([mean, rstd]), gain)
    torch.testing.assert_close(grad.double(), want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_gain.double(), want_gain, atol=1e-4, rtol=1e-5)


@needs_native
def test_opcheck_layer_norm_backward():
    torch.manual_seed(0)
    v = torch.randn(3, 4, 10)
    stats = torch.stack([v.mean(-1, keepdim=True), (v.var(-1, unbiased=False, keepdim=True)
                                                    + 1e-5).rsqrt()])  # fmt: skip
    args = (torch.randn(3, 4, 10), v, stats, torch.randn(10))
    torch.library.opcheck(torch.ops.lstmkit.layer_norm_backward_.default, args)
