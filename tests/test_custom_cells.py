"""docs/custom_cells.md runs, and its example cell computes what its equations say.

The Python blocks of the page are executed in order in one namespace (so the page cannot rot);
the ``SoftsignLSTM`` it defines is then checked against an independent float64 NumPy
implementation of its equations, written here, and with ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_variants import numpy_lstm, sigmoid
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit.cells import Cell

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_cells.md"
IN, H, P, T, B = 3, 4, 2, 5, 4
F64 = torch.float64
TOL = 1e-10


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def doc() -> dict:
    """The namespace left by running every Python block of the page, in order."""
    namespace = {"__name__": "custom_cells_doc"}
    state = torch.random.get_rng_state()
    for number, block in enumerate(python_blocks(DOC.read_text()), 1):
        code = compile(block, f"{DOC.name} (python block {number})", "exec")
        exec(code, namespace)
    torch.random.set_rng_state(state)
    return namespace


def test_page_has_the_blocks_it_describes():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 5
    assert sum("class SoftsignLSTM(Cell)" in block for block in blocks) == 1
    assert any("gradcheck" in block for block in blocks)
    assert any("lengths=lengths" in block and "bidirectional=True" in block for block in blocks)


def test_page_runs_and_defines_the_cell(doc):
    cell = doc["SoftsignLSTM"]
    assert issubclass(cell, Cell)
    assert (cell.name, cell.gates, cell.forget_gate) == ("softsign", 4, 1)
    assert list(cell.extra) == ["cell_gain"]
    shape, init = cell.extra["cell_gain"]
    assert shape(H, P) == (H,) and init == "ones"


# ------------------------------------------------------------------ the oracle


def softsign(z):
    return z / (1.0 + np.abs(z))


def step_softsign(x, h, c, p):
    """The page's equations, one sequence and one step, float64 NumPy."""
    z = p["weight_ih"] @ x + p["weight_hh"] @ h
    if p["bias_ih"] is not None:
        z = z + p["bias_ih"] + p["bias_hh"]
    zi, zf, zg, zo = np.split(z, 4)
    c_new = sigmoid(zf) * c + sigmoid(zi) * softsign(zg)
    h_new = sigmoid(zo) * softsign(p["cell_gain"] * c_new)
    if p["weight_hr"] is not None:
        h_new = p["weight_hr"] @ h_new
    return h_new, c_new


def numpy_params(model, layer, direction):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "cell_gain")
    return {kind: state.get(kind + suffix) for kind in kinds}


def make_model(doc, seed=0, **config):
    """A float64 model of the page's cell with a random (not all-ones) cell gain."""
    torch.manual_seed(seed)
    model = lstmkit.LSTM(IN, H, cell=doc["SoftsignLSTM"](), dtype=F64, **config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("cell_gain"):
                param.copy_(1.0 + 0.8 * torch.randn_like(param))
    return model


def make_hx(model, batch=B):
    states = model.num_layers * (2 if model.bidirectional else 1)
    return (
        torch.randn(states, batch, model.proj_size or H, dtype=F64),
        torch.randn(states, batch, H, dtype=F64),
    )


def oracle(model, x, hx, lengths=None):
    return numpy_lstm(
        step_softsign,
        lambda layer, d: numpy_params(model, layer, d),
        x.numpy(),
        hx[0].numpy(),
        hx[1].numpy(),
        layers=model.num_layers,
        directions=2 if model.bidirectional else 1,
        lengths=lengths,
    )


def assert_matches(ours, expected):
    output, (h_n, c_n) = ours
    for name, a, e in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), e, rtol=TOL, atol=TOL, err_msg=name)


# ------------------------------------------------------------------ the example's numbers


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("lengths", [None, [3, 5, 1, 4]], ids=["full", "lengths"])
@pytest.mark.parametrize("proj", [0, P])
@pytest.mark.parametrize("bias", [True, False])
def test_example_matches_its_equations(doc, bias, proj, lengths, backend):
    model = make_model(
        doc, num_layers=2, bidirectional=True, bias=bias, proj_size=proj, backend=backend
    )
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    assert_matches(model(x, hx, lengths=lengths), oracle(model, x, hx, lengths))


def test_example_differs_from_tanh_lstm(doc):
    """Controls for the oracle: the page's cell is not the standard LSTM, and its gain is used."""
    model = make_model(doc, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    standard = lstmkit.LSTM(IN, H, num_layers=2, bidirectional=True, dtype=F64)
    names = [n for n in model.state_dict() if not n.startswith("cell_gain")]
    for name in names:  # same seed, same standard weights (registered first)
        assert torch.equal(model.state_dict()[name], standard.state_dict()[name]), name
    x = torch.randn(T, B, IN, dtype=F64)
    out = model(x)[0]
    assert not torch.allclose(out, standard(x)[0])
    with torch.no_grad():
        model.cell_gain_l1.mul_(2.0)
    assert not torch.allclose(model(x)[0], out)


def test_example_lengths_equal_packed_sequence(doc):
    model = make_model(doc, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(B, T, IN, dtype=F64)
    hx = make_hx(model)
    lengths = torch.tensor([2, 5, 1, 4])
    out, (h_n, c_n) = model(x, hx, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_packed, (h_p, c_p) = model(packed, hx)
    out_p, _ = pad_packed_sequence(out_packed, batch_first=True, total_length=T)
    torch.testing.assert_close(out, out_p, rtol=TOL, atol=TOL)
    torch.testing.assert_close(h_n, h_p, rtol=TOL, atol=TOL)
    torch.testing.assert_close(c_n, c_p, rtol=TOL, atol=TOL)


def test_example_gradcheck(doc):
    """Gradients of the input, hx and every parameter (cell_gain included) of a tiny stacked
    bidirectional model with a projection and lengths."""
    model = make_model(doc, num_layers=2, bidirectional=True, proj_size=1, backend="reference")
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(3, 2, IN, dtype=F64, requires_grad=True)
    h0, c0 = (s.requires_grad_() for s in make_hx(model, batch=2))
    lengths = torch.tensor([3, 2])

    def f(x, h0, c0, *weights):
        params = dict(zip(names, weights, strict=True))
        out, (h, c) = torch.func.functional_call(model, params, (x, (h0, c0)), {"lengths": lengths})
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *model.parameters()))


# ------------------------------------------------------------------ options with a custom cell


def test_forget_bias_uses_the_cells_forget_gate(doc):
    plain = make_model(doc, seed=2)
    raised = make_model(doc, seed=2, forget_bias=0.75)
    expected = plain.bias_ih_l0.detach().clone().view(4, H)
    expected[1] += 0.75
    assert torch.equal(raised.bias_ih_l0.detach(), expected.view(-1))
    assert torch.equal(raised.bias_hh_l0, plain.bias_hh_l0)


def test_forget_bias_needs_a_forget_gate(doc):
    class NoForget(doc["SoftsignLSTM"]):
        name = "no-forget"
        forget_gate = None

    expected = "forget_bias=1.0 needs bias=True and a cell with a forget gate"
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        lstmkit.LSTM(IN, H, cell=NoForget(), forget_bias=1.0)
    assert "cell='no-forget'" in str(info.value)
    lstmkit.LSTM(IN, H, cell=NoForget())  # fine without forget_bias


def test_fused_backend_rejects_a_custom_cell(doc):
    model = lstmkit.LSTM(IN, H, cell=doc["SoftsignLSTM"](), backend="fused", dtype=F64)
    with pytest.raises(ValueError, match=re.escape("backend='fused' cannot run cell='softsign'")):
        model(torch.randn(T, B, IN, dtype=F64))
