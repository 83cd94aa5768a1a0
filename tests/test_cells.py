"""The step equations against an independent float64 NumPy implementation, and LSTMCell
against torch.nn.LSTMCell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lstmkit
from lstmkit import cells, runner


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    """The published LSTM equations, gate by gate, in float64 NumPy."""
    hidden = c.shape[1]
    blocks = [slice(k * hidden, (k + 1) * hidden) for k in range(4)]  # i, f, g, o
    pre = [x @ w_ih[s].T + b_ih[s] + h @ w_hh[s].T + b_hh[s] for s in blocks]
    i, f, g, o = _sigmoid(pre[0]), _sigmoid(pre[1]), np.tanh(pre[2]), _sigmoid(pre[3])
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


@pytest.mark.parametrize("proj", [0, 2])
def test_lstm_step_matches_published_equations(proj):
    rng = np.random.default_rng(0)
    batch, inp, hidden = 3, 5, 4
    out = proj or hidden
    arrays = {
        "x": rng.normal(size=(batch, inp)),
        "h": rng.normal(size=(batch, out)),
        "c": rng.normal(size=(batch, hidden)),
        "w_ih": rng.normal(size=(4 * hidden, inp)),
        "w_hh": rng.normal(size=(4 * hidden, out)),
        "b_ih": rng.normal(size=4 * hidden),
        "b_hh": rng.normal(size=4 * hidden),
        "w_hr": rng.normal(size=(proj, hidden)) if proj else None,
    }
    t = {k: None if v is None else torch.from_numpy(v) for k, v in arrays.items()}
    xp = cells.project_input(t["x"], t["w_ih"], t["b_ih"], t["b_hh"])
    h, c = cells.lstm_step(xp, t["h"], t["c"], t["w_hh"], t["w_hr"])
    h_ref, c_ref = numpy_lstm_step(**arrays)
    np.testing.assert_allclose(h.numpy(), h_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-12, atol=1e-12)


def test_reverse_within_lengths():
    x = torch.arange(4 * 3).view(4, 3, 1)  # x[t, b] = 3 t + b
    lengths = torch.tensor([4, 2, 1])
    got = runner.reverse_within_lengths(x, lengths)[..., 0]
    expected = torch.tensor([[9, 4, 2], [6, 1, 5], [3, 7, 8], [0, 10, 11]])
    assert torch.equal(got, expected)
    assert torch.equal(runner.reverse_within_lengths(got.unsqueeze(-1), lengths), x)
    assert torch.equal(runner.reverse_within_lengths(x, None), x.flip(0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lstm_cell_matches_nn_lstm_cell(bias, batched, with_hx, dtype):
    torch.manual_seed(5)
    ours = lstmkit.LSTMCell(5, 4, bias=bias, dtype=dtype)
    torch.manual_seed(5)
    theirs = nn.LSTMCell(5, 4, bias=bias, dtype=dtype)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)  # same seed, same initialisation
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 5, dtype=dtype)
    hx = (torch.randn(*lead, 4, dtype=dtype), torch.randn(*lead, 4, dtype=dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    results = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        state = tuple(s.clone().requires_grad_() for s in hx) if with_hx else None
        h, c = model(xi, state)
        (h * 1.5 + c * 0.5).sum().backward()
        leaves = [xi, *(state or ())]
        results.append([h, c, *(v.grad for v in leaves), *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
