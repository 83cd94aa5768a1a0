"""Streaming: ``LSTM.step`` one time step at a time equals the full-sequence forward."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lstmkit
from lstmkit import LSTMState, cells, detach_state, runner
from lstmkit.__main__ import main
from lstmkit.bench import ort, stream

F64 = torch.float64
EXACT = 1e-12
IN, H, T = 5, 7, 6


def stream_steps(model, x, state=None):
    """Run ``model.step`` over the time-major ``x``; return stacked outputs and final state."""
    outputs = []
    for x_t in x.unbind(0):
        y, state = model.step(x_t, state)
        outputs.append(y)
    return torch.stack(outputs), state


def initial_state(layers, batch, proj=0):
    shape = (layers, *batch)
    return torch.randn(*shape, proj or H, dtype=F64), torch.randn(*shape, H, dtype=F64)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_steps_equal_forward(cell, proj, layers, batched, grad):
    torch.manual_seed(0)
    model = lstmkit.LSTM(IN, H, layers, proj_size=proj, cell=cell, dtype=F64).eval()
    batch = (3,) if batched else ()
    x = torch.randn(T, *batch, IN, dtype=F64)
    hx = initial_state(layers, batch, proj)
    with torch.set_grad_enabled(grad):
        expected, (h_n, c_n) = model(x, hx)
        outputs, state = stream_steps(model, x, hx)
    assert isinstance(state, LSTMState)
    assert (outputs - expected).abs().max().item() <= EXACT
    assert (state.h - h_n).abs().max().item() <= EXACT
    assert (state.c - c_n).abs().max().item() <= EXACT
    # and from a zero state when none is given
    with torch.set_grad_enabled(grad):
        expected, (h_n, _) = model(x)
        outputs, state = stream_steps(model, x)
    assert (outputs - expected).abs().max().item() <= EXACT
    assert (state.h - h_n).abs().max().item() <= EXACT


def test_plain_tuple_state_and_custom_cell():
    class Mine(cells.LSTM):  # a subclass is not the plain cell: it takes the generic path
        name = "mine"

    torch.manual_seed(1)
    model = lstmkit.LSTM(IN, H, 2, cell=Mine(), dtype=F64).eval()
    x = torch.randn(T, 2, IN, dtype=F64)
    hx = tuple(initial_state(2, (2,)))
    expected, (_, c_n) = model(x, hx)
    with torch.no_grad():
        outputs, state = stream_steps(model, x, hx)
    assert (outputs - expected).abs().max().item() <= EXACT
    assert (state.c - c_n).abs().max().item() <= EXACT


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_eval_zoneout_equals_forward(cell):
    torch.manual_seed(2)
    model = lstmkit.LSTM(
        IN, H, 2, proj_size=4, cell=cell, zoneout=(0.3, 0.2), recurrent_dropout=0.4,
        weight_drop=0.5, dtype=F64,
    ).eval()  # fmt: skip
    x = torch.randn(T, 3, IN, dtype=F64)
    expected, (h_n, c_n) = model(x)
    plain = lstmkit.LSTM(IN, H, 2, proj_size=4, cell=cell, dtype=F64).eval()
    plain.load_state_dict(model.state_dict())
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            outputs, state = stream_steps(model, x)
        assert (outputs - expected).abs().max().item() <= EXACT
        assert (state.h - h_n).abs().max().item() <= EXACT
        assert (state.c - c_n).abs().max().item() <= EXACT
        # zoneout's expectation does change the result
        assert (outputs - stream_steps(plain, x)[0]).abs().max().item() > 1e-3


NATIVE, WHY_NOT_NATIVE = lstmkit.native_available()
BACKENDS = [
    "reference",
    "fused",
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=f"{WHY_NOT_NATIVE}")),
]


@pytest.mark.parametrize("zoneout", [0.0, 0.3], ids=["plain", "zoneout"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_step_runs_on_the_backend_forward_would(monkeypatch, cell, backend, zoneout):
    """step() asks runner.choose_backend, as forward does, and runs that backend's run on a
    one-step sequence; its steps equal forward on the same backend."""
    torch.manual_seed(8)
    model = lstmkit.LSTM(IN, H, 2, cell=cell, backend=backend, zoneout=zoneout, dtype=F64)
    model.eval()
    x = torch.randn(T, 3, IN, dtype=F64)
    h = torch.zeros(3, H, dtype=F64)
    masks = runner.draw_masks(model.regularizers, False, 1, h, h)
    runs = backend != "fused" or cell != "cifg"  # the fused backend has no cifg kernel
    assert backend == "reference" or runner.BACKENDS[backend].supports(model.cell, masks) is runs
    if not runs:
        with pytest.raises(ValueError, match=f"backend={backend!r} cannot run cell={cell!r}"):
            model.step(x[0])
        return
    expected, (h_n, c_n) = model(x)
    calls = []
    run = runner.BACKENDS[backend].run

    def counted(cell, x, *args):
        calls.append(x.shape)
        return run(cell, x, *args)

    monkeypatch.setattr(runner.BACKENDS[backend], "run", counted)
    outputs, state = stream_steps(model, x)
    assert calls == [(1, 3, IN), (1, 3, H)] * T  # both layers, one step each, on this backend
    assert (outputs - expected).abs().max().item() <= EXACT
    assert (state.h - h_n).abs().max().item() <= EXACT
    assert (state.c - c_n).abs().max().item() <= EXACT


def test_step_on_a_backend_that_cannot_run_the_layer_raises():
    model = lstmkit.LSTM(IN, H, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this layer: .*'cpu'"):
        model.step(torch.randn(2, IN))


@pytest.mark.parametrize(
    "option", [{"zoneout": 0.1}, {"recurrent_dropout": 0.1}, {"weight_drop": 0.1}]
)
def test_training_regularizers_raise(option):
    model = lstmkit.LSTM(IN, H, **option)
    with pytest.raises(ValueError, match=r"step\(\) supports .* only in evaluation mode"):
        model.step(torch.randn(2, IN))
    model.eval()
    model.step(torch.randn(2, IN))  # fine in evaluation


def test_dropout_between_layers_in_training():
    torch.manual_seed(3)
    model = lstmkit.LSTM(IN, H, 2, dropout=1.0, dtype=F64).train()
    cut = lstmkit.LSTM(IN, H, 2, dtype=F64).eval()
    cut.load_state_dict(model.state_dict())
    with torch.no_grad():
        cut.weight_ih_l1.zero_()  # what dropout=1 does to layer 1's input
    x = torch.randn(T, 2, IN, dtype=F64)
    outputs, state = stream_steps(model, x)
    expected, cut_state = stream_steps(cut, x)
    assert (outputs - expected).abs().max().item() <= EXACT
    assert (state.h - cut_state.h).abs().max().item() <= EXACT
    # while layer 0's own state is untouched by the dropout on its output
    eval_state = stream_steps(model.eval(), x)[1]
    assert (state.c[0] - eval_state.c[0]).abs().max().item() <= EXACT
    assert (state.c[1] - eval_state.c[1]).abs().max().item() > 1e-3


def test_bidirectional_raises():
    model = lstmkit.LSTM(IN, H, bidirectional=True)
    with pytest.raises(ValueError, match=r"step\(\) needs a unidirectional LSTM"):
        model.step(torch.randn(2, IN))


def test_invalid_inputs():
    model = lstmkit.LSTM(IN, H, 2, proj_size=3)
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be input_size=5, got 4"):
        model.step(torch.randn(2, 4))
    with pytest.raises(ValueError, match="input must be 1-D or 2-D"):
        model.step(torch.randn(1, 2, IN))
    with pytest.raises(TypeError, match=r"input\.dtype must match"):
        model.step(torch.randn(2, IN, dtype=F64))
    with pytest.raises(TypeError, match="state must be an LSTMState or a tuple"):
        model.step(torch.randn(2, IN), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"state.h must have shape \(2, 2, 3\) for batched"):
        model.step(torch.randn(2, IN), (torch.zeros(2, 2, H), torch.zeros(2, 2, H)))
    with pytest.raises(ValueError, match=r"state.c must have shape \(2, 7\) for unbatched"):
        model.step(torch.randn(IN), (torch.zeros(2, 3), torch.zeros(2, 1, H)))
    with pytest.raises(TypeError, match=r"state\.c\.dtype must match"):
        model.step(torch.randn(IN), (torch.zeros(2, 3), torch.zeros(2, H, dtype=F64)))


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_gradients_equal_forward(cell):
    torch.manual_seed(4)
    model = lstmkit.LSTM(IN, H, 2, proj_size=3, cell=cell, dtype=F64).train()
    x = torch.randn(4, 2, IN, dtype=F64)
    h0, c0 = initial_state(2, (2,), 3)
    weights = torch.randn(4, 2, 3, dtype=F64)

    def grads(run):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        model.zero_grad(set_to_none=True)
        outputs, (h_n, c_n) = run(leaves[0], (leaves[1], leaves[2]))
        ((outputs * weights).sum() + h_n.sum() + (c_n**2).sum()).backward()
        return [t.grad for t in leaves] + [p.grad for p in model.parameters()]

    expected = grads(lambda x, hx: model(x, hx))
    got = grads(lambda x, hx: stream_steps(model, x, hx))
    assert len(got) == len(expected) > 3
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max().item() <= EXACT


def test_detach_state_cuts_the_graph():
    torch.manual_seed(5)
    model = lstmkit.LSTM(IN, H, 2, dtype=F64)
    x = torch.randn(3, 2, IN, dtype=F64, requires_grad=True)
    _, state = model.step(x[0])
    _, state = model.step(x[1], state)
    detached = model.detach_state(state)
    assert torch.equal(detached.h, state.h) and torch.equal(detached.c, state.c)
    assert not detached.h.requires_grad and not detached.c.requires_grad
    assert torch.equal(detach_state(tuple(state)).c, state.c.detach())
    assert detach_state(None) is None
    y, _ = model.step(x[2], detached)
    y.sum().backward()
    grad = x.grad
    assert torch.count_nonzero(grad[:2]).item() == 0  # earlier steps get nothing
    assert grad[2].abs().min().item() > 0  # the last step does
    # without detaching, the earlier steps do receive gradient
    x.grad = None
    y, _ = model.step(x[2], state)
    y.sum().backward()
    assert x.grad[:2].abs().min().item() > 0


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("proj", [0, 3])
def test_state_matches_nn_lstm_step_by_step(proj, grad):
    torch.manual_seed(6)
    ours = lstmkit.LSTM(IN, H, 2, proj_size=proj, dtype=F64).eval()
    theirs = nn.LSTM(IN, H, 2, proj_size=proj, dtype=F64).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(T, 2, IN, dtype=F64)
    state = hx = None
    with torch.set_grad_enabled(grad):
        for x_t in x:
            y, state = ours.step(x_t, state)
            out, hx = theirs(x_t.unsqueeze(0), hx)
            assert (y - out[0]).abs().max().item() <= EXACT
            assert (state.h - hx[0]).abs().max().item() <= EXACT
            assert (state.c - hx[1]).abs().max().item() <= EXACT
        # the state is nn.LSTM's layout: it goes in as hx and comes back in ours
        out, _ = theirs(x[0].unsqueeze(0), state)
        y, _ = ours.step(x[0], hx)
    assert (y - out[0]).abs().max().item() <= EXACT
    # unbatched: (IN,) in, (num_layers, P) / (num_layers, H) state, like nn.LSTM's
    y, state = ours.step(x[0, 0])
    out, hx = theirs(x[0, :1], None)
    assert state.h.shape == hx[0].shape == (2, proj or H) and y.shape == (proj or H,)
    assert (y - out[0]).abs().max().item() <= EXACT
    assert (state.h - hx[0]).abs().max().item() <= EXACT
    assert (state.c - hx[1]).abs().max().item() <= EXACT


def test_cached_weights_follow_parameter_updates():
    torch.manual_seed(7)
    model = lstmkit.LSTM(IN, H, 2, dtype=F64).eval()
    x = torch.randn(2, IN, dtype=F64)
    with torch.no_grad():
        before, _ = model.step(x)
        model.weight_hh_l1.add_(0.5)  # as an optimizer step does
        model.bias_ih_l1.add_(0.5)
        after, _ = model.step(x)
        oracle = torch.nn.LSTM(IN, H, 2, dtype=F64)
        oracle.load_state_dict(model.state_dict())  # the updated weights
        expected = oracle(x.unsqueeze(0))[0][0]
    assert (after - expected).abs().max().item() <= EXACT
    assert (after - before).abs().max().item() > 1e-3


def test_bench_stream_writes_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stream, "HIDDEN_SIZES", (16,))
    args = ["bench", "--stream", "--repeats", "2", "--warmup", "0", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "stream.json").read_text())
    (row,) = data["results"]
    assert row["hidden_size"] == 16 and row["max_abs_diff"] < 1e-5
    assert set(row["per_step_us"]) == {stream.LSTMKIT, stream.BASELINE}
    assert all(len(runs) == 2 for runs in row["runs_s"].values())
    us = row["per_step_us"]
    assert row["ratio"] == pytest.approx(us[stream.LSTMKIT] / us[stream.BASELINE])
    assert "| 16 |" in (tmp_path / "stream.md").read_text()
    assert "stream.json" in capsys.readouterr().out


def test_bench_stream_times_onnx_runtimes_one_step_runs(tmp_path, monkeypatch):
    """--peers ort: ONNX Runtime's streamed state agrees with nn.LSTM's, and the table divides
    lstmkit's time by each peer's."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(stream, "HIDDEN_SIZES", (16,))
    args = ["bench", "--stream", "--repeats", "2", "--warmup", "0", "--steps", "3"]
    assert main([*args, "--peers", "ort", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "stream.json").read_text())["results"]
    assert set(row["per_step_us"]) == {stream.LSTMKIT, stream.BASELINE, ort.NAME}
    assert row["max_abs_diff_peers"][ort.NAME] < 1e-5
    us = row["per_step_us"]
    assert row["ratio_vs_peers"][ort.NAME] == pytest.approx(us[stream.LSTMKIT] / us[ort.NAME])
    assert f"{stream.LSTMKIT} ÷ {ort.NAME}" in (tmp_path / "stream.md").read_text()
