"""The products behind the fused backend against plain float64 matrix products."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import lstmkit
from lstmkit.backends import matmul


@pytest.fixture(params=["torch", "onednn"])
def route(request, monkeypatch):
    """Run each test once with the size thresholds as shipped and once with every float32
    product sent to oneDNN."""
    if request.param == "onednn":
        if not matmul.ONEDNN:
            pytest.skip("oneDNN's linear ops are not usable in this torch build")
        monkeypatch.setattr(matmul, "MIN_ONEDNN_MACS", 0)
    return request.param


def _close(actual, a64_result):
    torch.testing.assert_close(actual.double(), a64_result, atol=1e-4, rtol=1e-5)


def test_weight_product_with_and_without_bias(route):
    x, w, b = torch.randn(7, 5), torch.randn(9, 5), torch.randn(9)
    _close(matmul.Weight(w, 7)(x), x.double() @ w.double().T)
    _close(matmul.Weight(w, 7, bias=b)(x), x.double() @ w.double().T + b.double())
    out = torch.empty(4, 9)
    matmul.Weight(w, 7, bias=b)(x[:4], out=out)  # fewer rows than packed for, into a buffer
    _close(out, x[:4].double() @ w.double().T + b.double())


@pytest.mark.parametrize("chunk", [3, 2048])
def test_mm_t_sums_over_row_blocks(route, chunk):
    a, b = torch.randn(10, 6), torch.randn(10, 4)
    assert matmul.uses_onednn(6, b.T, matmul.ONE_SHOT_FACTOR) == (route == "onednn")
    _close(matmul.mm_t(a, b, chunk=chunk), a.double().T @ b.double())
    _close(matmul.mm(a.T, b), a.double().T @ b.double())


@pytest.mark.parametrize("cell", ["lstm", "layernorm", "peephole"])
def test_nothing_keeps_parameters_alive_after_a_forward(cell):
    """Nothing derived from a parameter outlives the call: the module is freed whole."""
    model = lstmkit.LSTM(8, 16, cell=cell, recurrent_dropout=0.1, backend="fused")
    model(torch.randn(3, 2, 8, requires_grad=True))[0].sum().backward()
    refs = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
