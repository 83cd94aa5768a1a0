"""The one backend contract: every backend answers the same three questions with the same
parameters, and recognises a cell by the kind it declares, which a subclass never inherits."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch import nn

import lstmkit
from lstmkit import cells, runner
from lstmkit.backends import contract, fused, native, reference, triton
from lstmkit.export import to_onnx

NATIVE, WHY_NOT_NATIVE = lstmkit.native_available()
IN, H, T, B = 3, 5, 6, 4


class Softsign(cells.LSTM):
    """The plain LSTM with softsign for the candidate's tanh: other equations, no kind."""

    name = "softsign-lstm"

    def step(self, xp, h, c, p):
        i, f, g, o = cells.linear(h, p["weight_hh"], xp).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * F.softsign(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Declared(cells.LSTM):
    """The plain LSTM's equations under another name, opting in to its kernels."""

    name = "declared"
    kind = "lstm"


def _parameters(function) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return names[1:] if names[:1] == ["self"] else names


@pytest.mark.parametrize("backend", [reference, fused, native, triton], ids=lambda m: m.__name__)
@pytest.mark.parametrize("question", ["supports", "refusal", "run"])
def test_every_backend_keeps_the_protocol(backend, question):
    assert runner.BACKENDS[backend.__name__.rsplit(".", 1)[-1]] is backend
    assert _parameters(getattr(backend, question)) == _parameters(
        getattr(contract.Backend, question)
    )


def test_kind_is_declared_per_class_and_never_inherited():
    assert [cell.kind for cell in cells.CELLS.values()] == list(cells.CELLS)
    assert cells.Cell.kind is None and Softsign.kind is None and Declared.kind == "lstm"

    class Again(Declared):  # the equations of a subclass of a subclass are its own again
        pass

    class Layered(cells.LayerNorm):
        pass

    assert Again.kind is None and Layered.kind is None
    assert cells.LSTM.kind == "lstm" and cells.LayerNorm.kind == "layernorm"


def _twins(cell, dtype, backend="auto"):
    """An lstmkit.LSTM of ``cell`` on ``backend`` and an nn.LSTM with the same weights."""
    ours = lstmkit.LSTM(IN, H, 2, cell=cell, dtype=dtype, backend=backend)
    theirs = nn.LSTM(IN, H, 2, dtype=dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _layer(model, dtype):
    """An input ``(T, B, I)`` and the first layer's parameters, for choose_backend."""
    return torch.randn(T, B, IN, dtype=dtype), model._layer_params(0, 0)


def _softsign_loop(model, x):
    """Softsign's equations written out, layer by layer and step by step, in float64: the
    oracle for a stacked model of that cell from zero state."""
    h_n, c_n = [], []
    for layer in range(model.num_layers):
        w_ih, w_hh, b_ih, b_hh = (
            getattr(model, f"{name}_l{layer}").detach().double()
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        h = c = x.new_zeros(x.size(1), model.hidden_size)
        outputs = []
        for x_t in x:
            i, f, g, o = (x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * g / (1 + g.abs())
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        x = torch.stack(outputs)
        h_n.append(h)
        c_n.append(c)
    return x, torch.stack(h_n), torch.stack(c_n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_subclass_with_its_own_step_runs_its_own_equations(dtype):
    ours, theirs = _twins(Softsign(), dtype)
    x, params = _layer(ours, dtype)
    assert runner.choose_backend("auto", ours.cell, runner.NO_MASKS, x, params) == "reference"
    got, (h_n, c_n) = ours(x)
    want, h_w, c_w = _softsign_loop(ours, x.double())
    tolerance = TOLERANCES[dtype]
    for a, b in ((got, want), (h_n, h_w), (c_n, c_w)):
        torch.testing.assert_close(a.double(), b, atol=tolerance, rtol=tolerance)
    # ... which are not the plain LSTM's
    assert (got - theirs(x)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "backend",
    [
        "fused",
        pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=f"{WHY_NOT_NATIVE}")),
    ],
)
def test_fast_backends_refuse_a_subclass_without_a_kind(backend):
    model = lstmkit.LSTM(IN, H, cell=Softsign(), backend=backend)
    expected = (
        f"backend={backend!r} cannot run cell='softsign-lstm' of class Softsign, which sets no kind"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        model(torch.randn(T, B, IN))
    with pytest.raises(ValueError, match=re.escape(expected)):
        model.step(torch.randn(B, IN))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_subclass_that_declares_its_kind_gets_the_fast_path(backend, dtype):
    ours, theirs = _twins(Declared(), dtype, backend)
    x, params = _layer(ours, dtype)
    fast = "native" if NATIVE else "fused"
    chosen = runner.choose_backend(backend, ours.cell, runner.NO_MASKS, x, params)
    assert chosen == (fast if backend == "auto" else backend)
    got, (h_n, c_n) = ours(x)
    want, (h_t, c_t) = theirs(x)
    tolerance = TOLERANCES[dtype]
    for a, b in ((got, want), (h_n, h_t), (c_n, c_t)):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)


def test_to_torch_and_onnx_refuse_a_subclass_without_a_kind():
    model = lstmkit.LSTM(IN, H, cell=Softsign())
    with pytest.raises(
        ValueError, match=r"model has cell='softsign-lstm' \(Softsign\) of kind None"
    ):
        lstmkit.to_torch(model)
    with pytest.raises(
        NotImplementedError, match=r"cell='softsign-lstm' \(Softsign\) of kind None"
    ):
        to_onnx(model, None)
    twin = lstmkit.to_torch(lstmkit.LSTM(IN, H, cell=Declared()))  # kind 'lstm': it converts
    assert isinstance(twin, nn.LSTM)


KIND_ERRORS = {
    "unknown": ({"kind": "gru"}, ValueError, "kind must be None or one of 'lstm', "
                "'layernorm', 'peephole', 'cifg', got 'gru'"),
    "not a str": ({"kind": 4}, TypeError, "kind must be None or one of 'lstm', 'layernorm', "
                  "'peephole', 'cifg', got 4 (int)"),
    "missing parameters": ({"kind": "layernorm"}, ValueError, "kind='layernorm' needs the "
                           "gates and extra "
                           "parameters of cell='layernorm': gates=4, extra=['ln_ih_weight', "
                           "'ln_ih_bias', 'ln_hh_weight', 'ln_hh_bias', 'ln_c_weight', "
                           "'ln_c_bias']; got gates=4, extra=[]"),
    "other gates": ({"kind": "cifg"}, ValueError, "kind='cifg' needs the gates and extra "
                    "parameters of cell='cifg': gates=3, extra=[]; got gates=4, extra=[]"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("attributes", "error", "message"), KIND_ERRORS.values(), ids=list(KIND_ERRORS)
)
def test_a_declared_kind_must_be_a_builtin_one_with_its_parameters(attributes, error, message):
    cell = type("Odd", (cells.LSTM,), {"name": "odd", **attributes})()
    with pytest.raises(error, match=re.escape(f"cell 'odd' (Odd): {message}")):
        lstmkit.LSTM(IN, H, cell=cell)
