"""Mixed precision: inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` both backends take
the matrix products in bfloat16 and keep gates, cell states, outputs and gradients in float32.

Tolerances (measured at these sizes over several seeds, then given ~3x margin):

- outputs against float32: relative error of the norm <= 1e-2. Each product is rounded to
  bfloat16 once (unit roundoff 2^-9 ~ 2e-3, about 1e-3 measured).
- fused against reference: the same, 1e-2. Their forwards round different products (the
  fused backend one product over [x, h], the reference two), about 1e-3 measured.
- gradients against float32, and fused against reference: 3e-2. The reference backend's
  backward runs through autocast's bfloat16 products too (about 1e-2 measured, the input's
  gradient the worst); the fused one runs in float32 (about 4e-3).

The layer-norm cell amplifies rounding (it rescales small recurrent products and cell states
to unit variance): against float32 it is only checked to run, in float32, and to match the
reference backend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_with_grads

import lstmkit

OUTPUT_TOL, GRAD_TOL = 1e-2, 3e-2


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).norm() / expected.norm()).item()


def assert_close(ours: dict, theirs: dict, output_tol: float, grad_tol: float) -> None:
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        tol = grad_tol if key.startswith("grad") else output_tol
        assert relative_error(ours[key], expected) <= tol, key


def bf16(model: lstmkit.LSTM, x: torch.Tensor) -> dict:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return run_with_grads(model, x)


@pytest.mark.parametrize("proj", [0, 5])
@pytest.mark.parametrize("cell", ["lstm", "peephole", "layernorm"])
def test_autocast_products_in_bf16_state_in_fp32(cell, proj):
    reference = lstmkit.LSTM(8, 16, num_layers=2, cell=cell, proj_size=proj, backend="reference")
    fused = lstmkit.LSTM(8, 16, num_layers=2, cell=cell, proj_size=proj, backend="fused")
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(50, 4, 8)
    fp32 = run_with_grads(reference, x)
    ours = {"reference": bf16(reference, x), "fused": bf16(fused, x)}
    for results in ours.values():
        assert all(t.dtype == torch.float32 for t in results.values())
        assert all(t.isfinite().all() for t in results.values())
        # not float32 products: the results differ from float32 by bfloat16 rounding
        assert relative_error(results["output"], fp32["output"]) > 1e-5
        if cell != "layernorm":
            assert_close(results, fp32, OUTPUT_TOL, GRAD_TOL)
    assert_close(ours["fused"], ours["reference"], OUTPUT_TOL, GRAD_TOL)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_autocast_leaves_parameters_and_float64_alone(backend):
    model = lstmkit.LSTM(3, 4, backend=backend, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected = model(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x)[0]  # autocast casts float32 only
    torch.testing.assert_close(output, expected, atol=1e-12, rtol=1e-12)
    model = lstmkit.LSTM(3, 4, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.float())[0].sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
