"""forward's commonest inference call in one C++ call (runner.infer_whole, csrc/entry.cpp): a
batch of whole sequences from the zero state through a unidirectional stack in evaluation
mode. Where it runs it gives the Python path's numbers bit for bit (the same operator) and
nn.LSTM's within float32 rounding; wherever the Python path has anything else to decide, or
an error to raise, it declines and that path runs."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from test_native import needs_native
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lstmkit
from lstmkit import runner
from lstmkit.state import LSTMState

CELLS = ("lstm", "peephole", "cifg", "layernorm")


def whole(model: lstmkit.LSTM, x: object, hx: object = None, one_step: bool = False):
    """What the entry answers for ``model(x, hx)`` (``model.step(x, hx)`` with ``one_step``):
    ``(output, h_n, c_n)`` or ``None``."""
    return model._infer_whole(x, hx, one_step)


def without_entry(monkeypatch, call, *args):
    """``call(*args)`` (a model's forward or step) with the entry declining: the Python path."""
    with monkeypatch.context() as patched:
        patched.setattr(runner, "infer_whole", lambda *a, **k: None)
        return call(*args)


@needs_native
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("layers, proj_size", [(1, 0), (2, 0), (2, 3)])
@pytest.mark.parametrize("cell", CELLS)
def test_it_equals_the_python_path_bit_for_bit(monkeypatch, cell, layers, proj_size, batch_first):
    """forward without and with a state, step without and with one (an LSTMState)."""
    if cell == "layernorm" and proj_size:
        pytest.skip("the layernorm cell has no projection")
    torch.manual_seed(0)
    model = lstmkit.LSTM(5, 8, layers, batch_first=batch_first, proj_size=proj_size, cell=cell,
                         zoneout=0.25).eval()  # fmt: skip
    x = torch.randn(4, 6, 5)
    hx = (torch.randn(layers, 4 if batch_first else 6, proj_size or 8),
          torch.randn(layers, 4 if batch_first else 6, 8))  # fmt: skip
    state = LSTMState(hx[0][:, :3], hx[1][:, :3])
    calls = [(model, x, None), (model, x, hx), (model.step, x[0, :3], None),
             (model.step, x[0, :3], state)]  # fmt: skip
    with torch.no_grad():
        for call, *args in calls:
            assert whole(model, *args, one_step=call == model.step) is not None
            got, want = call(*args), without_entry(monkeypatch, call, *args)
            assert type(got[1]) is type(want[1])
            for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
                assert torch.equal(a, b)
                assert a.shape == b.shape and a.stride() == b.stride()


@needs_native
def test_training_mode_takes_it_only_without_masks_to_draw(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5)
    asked = []
    infer_whole = runner.infer_whole
    monkeypatch.setattr(
        runner, "infer_whole", lambda *a, **k: asked.append(1) or infer_whole(*a, **k)
    )
    plain = lstmkit.LSTM(5, 8, 2).train()
    with torch.no_grad():
        got = plain(x)
        assert asked == [1]
        want = without_entry(monkeypatch, plain, x)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert torch.equal(a, b)
    asked.clear()
    plain(x)  # gradients wanted: not asked at all
    assert asked == []
    plain.requires_grad_(False)
    plain(x)  # grad mode on, nothing to differentiate
    assert asked == [1]
    for options in ({"zoneout": 0.2}, {"recurrent_dropout": 0.2}, {"weight_drop": 0.2},
                    {"dropout": 0.2}):  # fmt: skip
        asked.clear()
        model = lstmkit.LSTM(5, 8, 2, **options).train()
        with torch.no_grad():
            model(x)
            assert asked == [], options
            model.eval()(x)
            assert asked == [1], options


@needs_native
@pytest.mark.parametrize("batch_first", [False, True])
def test_it_equals_nn_lstm(batch_first):
    torch.manual_seed(0)
    model = lstmkit.LSTM(7, 16, 2, batch_first=batch_first, proj_size=5).eval()
    oracle = torch.nn.LSTM(7, 16, 2, batch_first=batch_first, proj_size=5).eval()
    oracle.load_state_dict(model.state_dict())
    x = torch.randn(3, 9, 7)
    with torch.inference_mode():
        assert whole(model, x) is not None
        got, want = model(x), oracle(x)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@needs_native
def test_it_reads_the_parameters_at_each_call():
    """functional_call's tensors and a .data write reach the next call; a parametrized weight
    (out of the registry) makes it decline, and the Python path applies the parametrization."""
    torch.manual_seed(0)
    model = lstmkit.LSTM(5, 8).eval()
    oracle = torch.nn.LSTM(5, 8).eval()
    x = torch.randn(6, 2, 5)
    doubled = {name: 2 * value for name, value in model.state_dict().items()}
    oracle.load_state_dict(doubled)
    with torch.no_grad():
        want = oracle(x)[0]
        got = torch.func.functional_call(model, doubled, (x,))[0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        for name, value in model.named_parameters():
            value.data = doubled[name].clone()
        torch.testing.assert_close(model(x)[0], want, atol=1e-6, rtol=0)
        parametrize.register_parametrization(model, "bias_ih_l0", Double())
        assert whole(model, x) is None
        oracle.load_state_dict({name: getattr(model, name) for name in oracle.state_dict()})
        torch.testing.assert_close(model(x)[0], oracle(x)[0], atol=1e-6, rtol=0)


class Double(torch.nn.Module):
    def forward(self, value):
        return 2 * value


class Subclass(torch.Tensor):
    pass


class Functions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Dispatches(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@needs_native
def test_it_declines_where_the_python_path_decides():
    torch.manual_seed(0)
    model = lstmkit.LSTM(5, 8).eval()
    x = torch.randn(6, 2, 5)
    with torch.no_grad():
        assert whole(model, x) is not None
        # the input: not a (T, B, input_size) float32 CPU tensor of T >= 1, or a subclass
        for other in (x[0], x[..., :4], x[:0], x.double(), x.to("meta"), x.as_subclass(Subclass),
                      [x], None):  # fmt: skip
            assert whole(model, other) is None
        for mode in (torch.autocast("cpu"), Functions(), Dispatches()):
            with mode:
                assert whole(model, x) is None
        with forward_ad.dual_level():
            assert whole(model, forward_ad.make_dual(x, torch.ones_like(x))) is None
            assert whole(model, x) is not None
        answers = []
        torch.func.vmap(lambda row: answers.append(whole(model, row)) or row, in_dims=1)(x)
        torch.jit.trace(lambda t: answers.append(whole(model, t)) or t, (x,), check_trace=False)
        assert answers == [None, None]
        # the state: not a pair of (num_layers, B, H) float32 tensors; unbatched input
        h, c = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)
        assert whole(model, x, (h, c)) is not None
        for hx in ([h, c], (h,), (h, c, c), (h[:, :1], c), (h, c[..., :7]), (h, c.double()),
                   (h[0], c[0]), (h, torch.zeros(2, 2, 8))):  # fmt: skip
            assert whole(model, x, hx) is None
        assert whole(model, x[:, 0], (h[:, 0], c[:, 0])) is None
        assert whole(model, x[0], (h, c), one_step=True) is not None
        assert whole(model, x[0, 0], (h[:, 0], c[:, 0]), one_step=True) is None
        assert whole(model, x, one_step=True) is None
        assert whole(model.double(), x) is None  # float32 input, float64 weights
        model.float()
        model.backend = "reference"
        assert whole(model, x) is None
        model.backend = "auto"
        model.register_parameter("weight_hr_l0", torch.nn.Parameter(torch.randn(8, 8)))
        assert whole(model, x) is None  # a parameter it was not built with
        del model.weight_hr_l0
        assert whole(model, x) is not None
    assert whole(model, x) is None  # gradients wanted
    model.requires_grad_(False)
    assert whole(model, x) is not None  # none wanted


@needs_native
def test_an_operator_error_is_the_python_paths(monkeypatch):
    model = lstmkit.LSTM(5, 8).eval()
    model.bias_hh_l0.data = model.bias_hh_l0.data.double()
    x = torch.randn(6, 2, 5)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as entry:
            model(x)
        with pytest.raises(RuntimeError) as python:
            without_entry(monkeypatch, model, x)
    assert str(entry.value) == str(python.value)
    assert "bias_hh must be float32" in str(entry.value)


@needs_native
def test_other_python_threads_run_during_the_operator():
    """The entry lets go of the GIL around the operator, as torch.ops calls do. With a switch
    interval longer than the call, a counting thread gets the GIL during it only if the call
    lets go (held, it counted nothing inside the operator's time; let go, thousands)."""
    model = lstmkit.LSTM(256, 256).eval()
    x = torch.randn(400, 4, 256)
    with torch.no_grad():
        start = time.perf_counter()
        assert whole(model, x) is not None
        took = time.perf_counter() - start
    samples, running = [], threading.Event()

    def count():
        while running.is_set():
            samples.append(time.perf_counter())

    interval = sys.getswitchinterval()
    running.set()
    counter = threading.Thread(target=count)
    try:
        sys.setswitchinterval(1.0)
        counter.start()
        while not samples:
            time.sleep(0.01)
        with torch.no_grad():
            start = time.perf_counter()
            whole(model, x)
    finally:
        running.clear()
        counter.join()
        sys.setswitchinterval(interval)
    assert sum(start + 0.2 * took < t < start + 0.8 * took for t in samples) > 100
