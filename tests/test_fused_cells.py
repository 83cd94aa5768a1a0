"""The fused backend for the lstm, layernorm and peephole cells with the in-layer regularisers
against the reference backend: outputs, final states, every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TOLERANCES, assert_all_close, run_with_grads
from test_fused import twin_backends

from lstmkit.backends import fused, matmul, reference
from lstmkit.cells import CELLS
from lstmkit.runner import Masks

CELL_NAMES = ("lstm", "layernorm", "peephole")
REGULARIZERS = {
    "none": {},
    "recurrent_dropout": {"recurrent_dropout": 0.3},
    "zoneout": {"zoneout": (0.2, 0.4)},
    "weight_drop": {"weight_drop": 0.3},
    "all": {"recurrent_dropout": 0.3, "zoneout": (0.2, 0.4), "weight_drop": 0.3},
}
IN, H, P, BATCH, STEPS = 4, 6, 3, 5, 7
LENGTHS = torch.tensor([3, 7, 1, 7, 5])
BATCH_SIZES = [4, 4, 3, 1, 1]  # for calls to a backend's run: sequences of 5, 3, 3, 2 steps
# float32 LayerNorm cells are ill-conditioned at these sizes (LN over 6 and 24 values, two
# stacked bidirectional layers): each backend lands up to ~1e-3 (relative, per tensor) away
# from the float64 result with the same masks, and elementwise they differ by up to ~8e-4, so
# they are compared that loosely; test_layernorm_float32_accuracy measures each one against
# float64 on a better conditioned layer.
LAYERNORM_FLOAT32_TOLERANCE = 2e-3


def compare_backends(dtype, cell, regularizers, training, tolerance, backend="fused", **config):
    """``backend`` and the reference on the same weights, input, hx and lengths; each forward
    after the same seed, so that the runner draws the same masks for both."""
    models = twin_backends(dtype, backend, cell=cell, **config, **regularizers)
    batch, steps, inp = BATCH, STEPS, config["input_size"]
    x = torch.randn(steps, batch, inp, dtype=dtype)
    states = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    hidden = config["hidden_size"]
    out = config.get("proj_size") or hidden
    hx = (
        torch.randn(states, batch, out, dtype=dtype),
        torch.randn(states, batch, hidden, dtype=dtype),
    )
    results = []
    for model in models:
        model.train(training)
        torch.manual_seed(7)
        results.append(run_with_grads(model, x, hx, lengths=LENGTHS))
    assert_all_close(*results, tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("regularizers", list(REGULARIZERS))
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_fused_equals_reference(cell, regularizers, training, dtype):
    tolerance = TOLERANCES[dtype]
    if cell == "layernorm" and dtype == torch.float32:
        tolerance = LAYERNORM_FLOAT32_TOLERANCE
    compare_backends(
        dtype,
        cell,
        REGULARIZERS[regularizers],
        training,
        tolerance,
        input_size=IN,
        hidden_size=H,
        num_layers=2,
        bidirectional=True,
        proj_size=P,
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_without_projection_or_bias(cell, bias):
    compare_backends(
        torch.float64,
        cell,
        REGULARIZERS["all"],
        True,
        1e-10,
        input_size=IN,
        hidden_size=H,
        bias=bias,
    )


def _random_params(cell: str, hidden: int, inp: int, out: int, generator) -> dict:
    """Parameters of one layer-direction (float64, LN gains near 1), by name."""
    gates = CELLS[cell].gates * hidden
    shapes = {
        "weight_ih": (gates, inp),
        "weight_hh": (gates, out),
        "bias_ih": (gates,),
        "bias_hh": (gates,),
        "weight_hr": (out, hidden),
    }
    shapes |= {name: shape(hidden, out) for name, (shape, _) in CELLS[cell].extra.items()}
    params = {
        name: 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        for name, shape in shapes.items()
    }
    for name in ("ln_ih_weight", "ln_hh_weight", "ln_c_weight"):
        if name in params:
            params[name] += 1
    return params


def _masks(steps: int, batch: int, hidden: int, out: int, training: bool, generator) -> Masks:
    """Fixed masks as the runner draws them: training, or evaluation (zoneout's p)."""
    if not training:
        return Masks(zoneout_h=0.3, zoneout_c=0.6)
    return Masks(
        recurrent=(torch.rand(batch, out, generator=generator) > 0.3).double() / 0.7,
        zoneout_h=torch.rand(steps, batch, out, generator=generator) < 0.3,
        zoneout_c=torch.rand(steps, batch, hidden, generator=generator) < 0.6,
    )


def layer_function(backend, cell: str, training: bool):
    """``(f, inputs)``: ``f(x, h0, c0, *weights)`` runs one layer-direction of ``cell`` (H = 3,
    P = 2, lengths ``BATCH_SIZES``) on ``backend`` with fixed masks (``f.masks``; training's,
    or evaluation's zoneout probabilities), the weights named by ``f.names``; ``inputs``: float64
    values for it that require grad."""
    hidden, out, inp, steps, batch = 3, 2, 3, len(BATCH_SIZES), BATCH_SIZES[0]
    generator = torch.Generator().manual_seed(0)
    params = _random_params(cell, hidden, inp, out, generator)
    masks = _masks(steps, batch, hidden, out, training, generator)
    inputs = [
        torch.randn(steps, batch, inp, generator=generator, dtype=torch.float64),
        torch.randn(batch, out, generator=generator, dtype=torch.float64),
        torch.randn(batch, hidden, generator=generator, dtype=torch.float64),
        *params.values(),
    ]

    def f(x, h0, c0, *weights):
        params = dict(zip(f.names, weights, strict=True))
        return backend.run(CELLS[cell], x, h0, c0, params, BATCH_SIZES, masks)

    f.names, f.masks = list(params), masks
    return f, [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize("training", [True, False], ids=["train masks", "eval masks"])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_gradcheck(cell, training):
    f, inputs = layer_function(fused, cell, training)
    assert torch.autograd.gradcheck(f, inputs)


def _outputs_and_grads(backend, cell, dtype, seed) -> torch.Tensor:
    """One layer-direction of ``cell`` with fixed masks and lengths, in ``dtype``: outputs
    and every gradient of a fixed weighting of them, as one float64 vector."""
    generator = torch.Generator().manual_seed(seed)
    hidden, out, inp, steps, batch = 6, 3, 4, len(BATCH_SIZES), BATCH_SIZES[0]
    params = _random_params(cell, hidden, inp, out, generator)
    masks = _masks(steps, batch, hidden, out, True, generator)
    masks = Masks(masks.recurrent.to(dtype), masks.zoneout_h, masks.zoneout_c)
    inputs = [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        for shape in ((steps, batch, inp), (batch, out), (batch, hidden))
    ]
    weights = [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        for shape in ((steps, batch, out), (batch, out), (batch, hidden))
    ]
    leaves = [t.to(dtype).requires_grad_() for t in (*inputs, *params.values())]
    x, h0, c0, *values = leaves
    results = backend.run(
        CELLS[cell], x, h0, c0, dict(zip(params, values, strict=True)), BATCH_SIZES, masks
    )
    sum((r * w.to(dtype)).sum() for r, w in zip(results, weights, strict=True)).backward()
    return torch.cat([t.detach().double().flatten() for t in (*results, *(v.grad for v in leaves))])


@pytest.mark.parametrize("seed", range(4))
def test_layernorm_float32_accuracy(seed):
    """The fused layernorm cell in float32 is as close to the float64 result as the reference
    backend in float32 (both around 1e-6 relative, as a whole)."""
    exact = _outputs_and_grads(reference, "layernorm", torch.float64, seed)
    for backend in (fused, reference):
        error = _outputs_and_grads(backend, "layernorm", torch.float32, seed) - exact
        assert error.norm() <= 1e-5 * exact.norm()


@pytest.mark.parametrize("cell", ["layernorm", "peephole"])
def test_onednn_path_equals_reference(monkeypatch, cell):
    """Every float32 product through oneDNN's packed weights."""
    if not matmul.ONEDNN:
        pytest.skip("oneDNN's linear ops are not usable in this torch build")
    monkeypatch.setattr(matmul, "MIN_ONEDNN_MACS", 0)
    compare_backends(
        torch.float32,
        cell,
        REGULARIZERS["all"],
        True,
        LAYERNORM_FLOAT32_TOLERANCE if cell == "layernorm" else 1e-5,
        input_size=40,
        hidden_size=96,
        bidirectional=True,
        proj_size=24,
    )


@pytest.mark.parametrize("cell", ["lstm", "peephole", "layernorm"])
def test_double_backward_equals_reference(cell):
    """create_graph=True through the fused cells with every in-loop regulariser and lengths:
    second derivatives equal the reference backend's (the same masks, from the same seed)."""
    options = {"recurrent_dropout": 0.3, "zoneout": (0.2, 0.1), "cell": cell}
    ours, reference = twin_backends(torch.float64, input_size=3, hidden_size=4, **options)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])

    def second_derivatives(model):
        torch.manual_seed(0)
        out, (_, c_n) = model(x, lengths=lengths)
        leaves = (x, *model.parameters())
        grads = torch.autograd.grad(out.square().sum() + c_n.sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    for got, want in zip(second_derivatives(ours), second_derivatives(reference), strict=True):
        # layer norm over 4 units has second derivatives of ~1e5: 1e-10 of each tensor's scale
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=1e-10 * scale, rtol=0)


def test_supports():
    regularised = Masks(recurrent=torch.ones(1, 1), zoneout_h=0.5)
    for (name, cell), masks in itertools.product(CELLS.items(), (Masks(), regularised)):
        assert fused.supports(cell, masks) == (name != "cifg")
