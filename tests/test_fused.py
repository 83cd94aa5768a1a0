"""The fused backend against the reference backend: outputs, final states, every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_all_close, run_with_grads, second_derivatives
from test_parity import GRID, IN, make_hx, make_input

import lstmkit
from lstmkit import native_available
from lstmkit.backends import fused, matmul
from lstmkit.cells import CELLS
from lstmkit.runner import NO_MASKS

NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def twin_backends(dtype=torch.float64, backend="fused", **config):
    """Two lstmkit.LSTMs with the same weights: one on ``backend``, one on the reference."""
    ours = lstmkit.LSTM(**config, dtype=dtype, backend=backend)
    reference = lstmkit.LSTM(**config, dtype=dtype, backend="reference")
    reference.load_state_dict(ours.state_dict())
    return ours, reference


NATIVE, WHY_NOT_NATIVE = native_available()
HAND_WRITTEN = [
    "fused",
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=f"{WHY_NOT_NATIVE}")),
]


@pytest.mark.parametrize("backend", HAND_WRITTEN)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("layers", "bidirectional", "proj", "batch_first", "bias", "kind", "with_hx"), GRID
)
def test_hand_written_backward_equals_reference(
    backend, dtype, layers, bidirectional, proj, batch_first, bias, kind, with_hx
):
    """The fused and the native backend against the reference over the parity grid."""
    fused, reference = twin_backends(
        dtype,
        backend=backend,
        input_size=IN,
        hidden_size=6,
        num_layers=layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj,
    )
    x = make_input(kind, 3, 5, batch_first, dtype, lengths=[2, 5, 1])
    hx = make_hx(layers, bidirectional, proj, 3, dtype, kind == "unbatched") if with_hx else None
    assert_all_close(
        run_with_grads(fused, x, hx), run_with_grads(reference, x, hx), TOLERANCES[dtype]
    )


@pytest.fixture
def onednn_everywhere(monkeypatch):
    """Send every float32 CPU product to oneDNN, whatever its size."""
    if not matmul.ONEDNN:
        pytest.skip("oneDNN's linear ops are not usable in this torch build")
    monkeypatch.setattr(matmul, "MIN_ONEDNN_MACS", 0)


@pytest.mark.parametrize("proj", [0, 24])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_onednn_path_equals_reference(onednn_everywhere, proj, with_lengths):
    fused, reference = twin_backends(
        torch.float32, input_size=40, hidden_size=96, bidirectional=True, proj_size=proj
    )
    batch = 24
    x = torch.randn(12, batch, 40)
    lengths = torch.randint(1, 13, (batch,)) if with_lengths else None
    hx = make_hx(1, True, proj or 96, batch, torch.float32)
    hx = (hx[0][..., : proj or 96], torch.randn(2, batch, 96))
    assert_all_close(
        run_with_grads(fused, x, hx, lengths=lengths),
        run_with_grads(reference, x, hx, lengths=lengths),
        1e-5,
    )


def test_gradcheck_fused_backward():
    shapes = [(12, 3), (12, 2), (12,), (12,), (2, 3)]  # H = 3 with projection to P = 2
    weights = [(torch.randn(s, dtype=torch.float64) * 0.5).requires_grad_() for s in shapes]
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    batch_sizes = [4, 4, 3, 1, 1]

    def f(x, h0, c0, *w):
        params = dict(zip(NAMES, w, strict=True))
        return fused.run(CELLS["lstm"], x, h0, c0, params, batch_sizes, NO_MASKS)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


def test_second_backward_and_double_backward():
    """A second backward repeats the first; with create_graph=True the fused backward is
    differentiable and its second derivatives are the reference backend's."""
    ours, reference = twin_backends(input_size=3, hidden_size=4, num_layers=2, proj_size=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = ours(x)
    (first,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (second,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    pairs = zip(second_derivatives(ours, x), second_derivatives(reference, x), strict=True)
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.autograd.gradgradcheck(lambda x: ours(x)[0], (x,))


def test_reference_backend_supports_double_backward():
    model = lstmkit.LSTM(2, 3, dtype=torch.float64, backend="reference")
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: model(x)[0], (x,))


def _train_step(model, x):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    out, _ = model(x)
    out.square().sum().backward()
    optimizer.step()


def test_packed_weights_are_never_stale(onednn_everywhere):
    """After an optimizer step, load_state_dict, rebinding .data, an in-place change or a write
    through .data (no version counter moves), the fused backend packs the new weights."""
    fused, reference = twin_backends(torch.float32, input_size=64, hidden_size=128)
    x = torch.randn(6, 16, 64)
    for model in (fused, reference):
        model(x)  # fill the cache
        _train_step(model, x)
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)

    state = {k: v + 0.01 for k, v in reference.state_dict().items()}
    for model in (fused, reference):
        model.load_state_dict(state)
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)

    fused.weight_hh_l0.data = fused.weight_hh_l0.data * 0.5  # new storage
    reference.weight_hh_l0.data = reference.weight_hh_l0.data * 0.5
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        for model in (fused, reference):
            model.weight_hh_l0.mul_(-1)  # in place: the version counter moves
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)

    for model in (fused, reference):
        model.weight_ih_l0.data.mul_(0.5)  # through .data: invisible to the version counter
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
