"""``torch.compile(model)`` gives eager's outputs and gradients, for both backends.

Dynamo traces the reference backend's loop whole; the fused backend's layer-directions are
``torch.compiler.disable``\\ d (see ``lstmkit.backends.fused.run``) and run eagerly between
the compiled graphs. Shapes stay tiny: inductor compiles the unrolled loop, T steps of it.

"Within 1e-6" is relative to each tensor's scale, ``max|eager|`` (or 1 when below): inductor
fuses and reorders float32 reductions (the layer norms' backward), which moves gradients of
size ~10 by a few ulps, ~4e-6 absolute.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_with_grads

import lstmkit

TOL = 1e-6


def assert_close_to_scale(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        error = (ours[key] - expected).abs().max().item()
        assert error <= TOL * max(1.0, expected.abs().max().item()), f"{key}: {error}"


@pytest.mark.parametrize("cell", ["lstm", "layernorm"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_compiled_equals_eager(backend, cell):
    torch._dynamo.reset()
    model = lstmkit.LSTM(4, 6, cell=cell, backend=backend)
    x, hx = torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    eager = run_with_grads(model, x, hx)
    compiled = run_with_grads(torch.compile(model), x, hx)
    compiled = {k.replace("_orig_mod.", ""): v for k, v in compiled.items()}
    assert_close_to_scale(compiled, eager)


def test_compiled_inference_equals_eager():
    torch._dynamo.reset()
    model = lstmkit.LSTM(4, 6, backend="fused").eval()
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=TOL, rtol=TOL)
