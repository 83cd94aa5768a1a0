"""``torch.compile``, ``torch.export`` and ``torch.jit`` on lstmkit, against eager and float64.

Under ``torch.compile`` / ``torch.export`` the default backend (``"auto"``) runs the native
backend's custom operator on the CPU where it is available, else the reference equations;
dynamo traces either whole (``fullgraph=True`` holds); an explicit ``backend="fused"`` stays
eager behind one graph break per layer-direction. Shapes stay tiny: inductor compiles the
loop unrolled, T steps of it.

Compiled float32 is not bit-equal to eager float32: inductor fuses and reorders float32
reductions (the layer norms' backward above all), and how it orders them depends on the CPU's
vector width. So neither is compared with the other: each is compared with the same model run
in float64, and the compiled error may be at most twice the eager one (two float32 evaluations
of one function, each rounding in its own order), with a floor of a few float32 ulps of the
tensor's scale for tensors eager happens to get almost exactly right.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_with_grads

import lstmkit

ULPS = 4 * torch.finfo(torch.float32).eps


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double()


def assert_as_accurate_as_eager(compiled: dict, eager: dict, exact: dict) -> None:
    """Every compiled float32 tensor is within twice eager's own float32 error of float64."""
    assert compiled.keys() == eager.keys() == exact.keys()
    for key, want in exact.items():
        scale = max(1.0, want.abs().max().item())
        eager_error = (eager[key].double() - want).abs().max().item()
        error = (compiled[key].double() - want).abs().max().item()
        assert error <= 2 * max(eager_error, ULPS * scale), (key, error, eager_error)


def compare_compiled(model, x, hx=None, **compile_options) -> None:
    exact = run_with_grads(float64_twin(model), x.double(), hx and tuple(s.double() for s in hx))
    eager = run_with_grads(model, x, hx)
    compiled = run_with_grads(torch.compile(model, **compile_options), x, hx)
    compiled = {k.replace("_orig_mod.", ""): v for k, v in compiled.items()}
    assert_as_accurate_as_eager(compiled, eager, exact)


@pytest.mark.parametrize("cell", ["lstm", "layernorm"])
@pytest.mark.parametrize("backend", ["reference", "fused", "native"])
def test_compiled_equals_eager(backend, cell):
    torch._dynamo.reset()
    model = lstmkit.LSTM(4, 6, cell=cell, backend=backend)
    x, hx = torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    compare_compiled(model, x, hx)


def test_default_backend_compiles_to_one_graph():
    """fullgraph=True on a 2-layer bidirectional model with the default backend: no break."""
    torch._dynamo.reset()
    model = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    compare_compiled(model, torch.randn(3, 2, 3), fullgraph=True)


def test_compiled_inference_equals_eager():
    torch._dynamo.reset()
    model = lstmkit.LSTM(4, 6, backend="fused").eval()
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        exact = float64_twin(model)(x.double())[0]
        eager, compiled = model(x)[0], torch.compile(model)(x)[0]
    eager_error = (eager.double() - exact).abs().max().item()
    assert (compiled.double() - exact).abs().max().item() <= 2 * max(eager_error, ULPS)


def outputs_and_grads(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``module(x)`` (called with ``x`` alone) and the gradients of a fixed loss."""
    x = x.clone().requires_grad_()
    output, (h_n, c_n) = module(x)
    (output.square().sum() + h_n.sum() + c_n.square().sum()).backward()
    results = {"output": output.detach(), "h_n": h_n.detach(), "grad x": x.grad}
    return results | {name: p.grad for name, p in module.named_parameters()}


def test_export_runs_the_default_backend():
    """torch.export.export of a stacked bidirectional model: the exported program gives
    eager's outputs and gradients (float64, within 1e-10)."""
    model = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    exported = torch.export.export(model, (x,)).module()
    got, want = outputs_and_grads(exported, x), outputs_and_grads(model, x)
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-10, rtol=0, msg=key)


def test_jit_trace_equals_eager():
    model = lstmkit.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x)[0], model(x)[0], atol=1e-10, rtol=0)


def test_jit_script_is_refused_clearly():
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile lstmkit.LSTM.*"):
        torch.jit.script(lstmkit.LSTM(3, 4))
