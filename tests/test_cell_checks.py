"""A custom cell that breaks the contract of docs/custom_cells.md is refused with a message
naming the cell and what is wrong: when the model is built where that can be known then (its
attributes, its extra parameters' shapes), else at the first step that goes wrong (what
``step`` returns). And ``model.backend`` is checked when it is set, not at the next forward.
"""

from __future__ import annotations

import copy
import re
from typing import ClassVar

import pytest
import torch
from torch import nn

import lstmkit
from lstmkit.cells import Cell, Extra, lstm_step
from lstmkit.validation import LSTMValueError

IN, H, P, T, B = 3, 6, 2, 5, 4
F64 = torch.float64


class Plain(Cell):
    """A correct cell (the standard LSTM equations) that the bad ones below vary."""

    name = "plain"

    def step(self, xp, h, c, p):
        return lstm_step(xp, h, c, p["weight_hh"], p["weight_hr"])


def variant(name: str, **attributes) -> Cell:
    """An instance of a subclass of :class:`Plain` named ``name`` with ``attributes``."""
    cls = type(name.title().replace("-", ""), (Plain,), {"name": name, **attributes})
    return cls()


def label(cell: Cell) -> str:
    return re.escape(f"cell {cell.name!r} ({type(cell).__name__})")


def gain(init: str = "ones", shape=lambda h, p: (h,)) -> Extra:
    return {"gain": (shape, init)}


BUILD_CASES = [
    (
        "init-normal",
        {"extra": gain("normal")},
        ValueError,
        r"extra\['gain'\]'s init must be one of 'uniform', 'ones', 'zeros', got 'normal'",
    ),
    (
        "init-not-a-str",
        {"extra": gain(1.0)},
        ValueError,
        r"extra\['gain'\]'s init must be one of .*got 1\.0",
    ),
    (
        "entry-not-a-pair",
        {"extra": {"gain": (lambda h, p: (h,),)}},
        TypeError,
        r"extra\['gain'\] must be a pair \(shape function .*got \(<function",
    ),
    (
        "entry-three-items",
        {"extra": {"gain": (lambda h, p: (h,), "ones", 0)}},
        TypeError,
        r"extra\['gain'\] must be a pair",
    ),
    (
        "shape-not-callable",
        {"extra": {"gain": ((H,), "ones")}},
        TypeError,
        r"extra\['gain'\] must be a pair \(shape function",
    ),
    (
        "extra-a-list",
        {"extra": [("gain", lambda h, p: (h,), "ones")]},
        TypeError,
        r"extra must be a dict, got \[",
    ),
    (
        "name-clash",
        {"extra": {"weight_hh": (lambda h, p: (h,), "ones")}},
        ValueError,
        r"extra's names must be .* other than weight_ih, weight_hh.*got 'weight_hh'",
    ),
    (
        "name-dotted",
        {"extra": {"ln.gain": (lambda h, p: (h,), "ones")}},
        ValueError,
        r"without '\.'.*got 'ln\.gain'",
    ),
    (
        "shape-an-int",
        {"extra": gain(shape=lambda h, p: h)},
        TypeError,
        r"extra\['gain'\]'s shape function must return a tuple of ints, got 6 \(int\) "
        r"for \(hidden_size=6, out_size=6\)",
    ),
    (
        "shape-a-list",
        {"extra": gain(shape=lambda h, p: [h])},
        TypeError,
        r"must return a tuple of ints, got \[6\] \(list\)",
    ),
    (
        "shape-of-floats",
        {"extra": gain(shape=lambda h, p: (h / 2,))},
        TypeError,
        r"must return a tuple of ints, got \(3\.0,\)",
    ),
    (
        "shape-zero",
        {"extra": gain(shape=lambda h, p: (h - H,))},
        ValueError,
        r"must return positive sizes, got \(0,\) for \(hidden_size=6",
    ),
    (
        "shape-negative",
        {"extra": gain(shape=lambda h, p: (h, p - 2 * h))},
        ValueError,
        r"must return positive sizes, got \(6, -6\)",
    ),
    ("gates-0", {"gates": 0}, ValueError, r"gates must be a positive int, got 0"),
    ("gates-negative", {"gates": -4}, ValueError, r"gates must be a positive int, got -4"),
    ("gates-float", {"gates": 4.0}, TypeError, r"gates must be a positive int, got 4\.0 \(float\)"),
    ("gates-bool", {"gates": True}, TypeError, r"gates must be a positive int, got True \(bool\)"),
    (
        "forget-gate-past-gates",
        {"forget_gate": 4},
        ValueError,
        r"forget_gate must be None or an int in \[0, gates=4\), got 4",
    ),
    (
        "forget-gate-negative",
        {"forget_gate": -1},
        ValueError,
        r"forget_gate must be None or an int in \[0, gates=4\), got -1",
    ),
    (
        "forget-gate-one-gate",
        {"gates": 1, "forget_gate": 1},
        ValueError,
        r"in \[0, gates=1\), got 1",
    ),
    (
        "forget-gate-a-str",
        {"forget_gate": "1"},
        TypeError,
        r"forget_gate must be None or an int .*got '1' \(str\)",
    ),
    ("no-step", {"step": Cell.step}, TypeError, r"must override step\(xp, h, c, p\)"),
]


@pytest.mark.parametrize(
    ("case", "attributes", "error", "message"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES]
)
def test_bad_cell_is_refused_when_the_model_is_built(case, attributes, error, message):
    cell = variant(case, **attributes)
    with pytest.raises(error, match=label(cell) + ".*" + message):
        lstmkit.LSTM(IN, H, cell=cell)


def test_name_must_be_a_str():
    cell = type("Ok", (Plain,), {"name": 7})()
    with pytest.raises(TypeError, match=r"cell 7 \(Ok\): name must be a str, got 7 \(int\)"):
        lstmkit.LSTM(IN, H, cell=cell)


def test_the_class_instead_of_an_instance():
    with pytest.raises(TypeError, match=r"got the class Plain: pass cell=Plain\(\)"):
        lstmkit.LSTM(IN, H, cell=Plain)


def test_extra_shape_is_checked_at_the_sizes_of_the_model():
    """The shape function sees (hidden_size, out_size): with a projection out_size is P."""
    cell = variant("per-output", extra=gain(shape=lambda h, p: (p - P,)))
    lstmkit.LSTM(IN, H, cell=cell)  # out_size = H: fine
    with pytest.raises(
        ValueError, match=label(cell) + r".*got \(0,\) for \(hidden_size=6, out_size=2\)"
    ):
        lstmkit.LSTM(IN, H, proj_size=P, cell=cell)


def test_good_cells_are_accepted_and_initialised_as_declared():
    """Controls: every built-in cell, and a three-gate custom cell with extra parameters of
    each init kind, build; the extras start as declared."""
    for name in lstmkit.cells.CELLS:
        lstmkit.LSTM(IN, H, cell=name)

    class Coupled(Cell):
        name = "coupled"
        gates = 3
        forget_gate = 0
        extra: ClassVar[Extra] = {
            "a": (lambda h, p: (h,), "ones"),
            "b": (lambda h, p: (2, p), "zeros"),
            "c": (lambda h, p: torch.Size([h]), "uniform"),
        }

        def step(self, xp, h, c, p):
            f, g, o = (xp + h @ p["weight_hh"].t()).chunk(3, dim=1)
            c = torch.lerp(torch.tanh(g), c, torch.sigmoid(f)) * p["a"] + p["b"].sum(0)
            return torch.sigmoid(o) * torch.tanh(c), c

    model = lstmkit.LSTM(IN, H, cell=Coupled(), forget_bias=1.0, dtype=F64)
    assert model.weight_ih_l0.shape == (3 * H, IN)
    assert (model.a_l0 == 1).all() and (model.b_l0 == 0).all() and model.b_l0.shape == (2, H)
    assert model.c_l0.abs().max() <= 1 / H**0.5 and model.c_l0.std() > 0
    with torch.no_grad():  # extras away from their identity values, so that their use shows
        model.a_l0.uniform_(0.5, 1.5)
        model.b_l0.normal_()
    x = torch.randn(T, B, IN, dtype=F64)
    output, (h_n, c_n) = model(x)
    # the oracle: Coupled's equations written out
    w_ih, w_hh = model.weight_ih_l0.detach(), model.weight_hh_l0.detach()
    bias = (model.bias_ih_l0 + model.bias_hh_l0).detach()
    h = c = torch.zeros(B, H, dtype=F64)
    want = []
    for x_t in x:
        f, g, o = (x_t @ w_ih.T + bias + h @ w_hh.T).chunk(3, dim=1)
        forget = torch.sigmoid(f)
        c = (forget * c + (1 - forget) * torch.tanh(g)) * model.a_l0 + model.b_l0.sum(0)
        h = torch.sigmoid(o) * torch.tanh(c)
        want.append(h)
    torch.testing.assert_close(output, torch.stack(want), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_n[0], h, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(c_n[0], c, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ what step returns


def returns(name: str, result) -> Cell:
    """A cell whose step returns ``result(h, c)`` of the correct step's ``(h, c)``."""

    def step(self, xp, h, c, p):
        return result(*Plain.step(self, xp, h, c, p))

    return variant(name, step=step)


STEP_CASES = [
    (
        "h-too-narrow",
        lambda h, c: (h[:, :-1], c),
        LSTMValueError,
        r"h of shape \(4, 6\) \(n, P\) "
        r"and c of shape \(4, 6\) \(n, H\), got \(4, 5\) and \(4, 6\)",
    ),
    (
        "c-too-wide",
        lambda h, c: (h, torch.cat([c, c], 1)),
        LSTMValueError,
        r"h of .*got \(4, 6\) and \(4, 12\)",
    ),
    (
        "one-row",
        lambda h, c: (h[:1], c[:1]),
        LSTMValueError,
        r"h of shape \(4, 6\).*got \(1, 6\) and \(1, 6\)",
    ),
    ("unbatched", lambda h, c: (h[0], c[0]), LSTMValueError, r"h of .*got \(6,\) and \(6,\)"),
    (
        "a-tensor",
        lambda h, c: h,
        TypeError,
        r"a pair \(h, c\) of Tensors, got a Tensor of shape \(4, 6\)",
    ),
    (
        "a-triple",
        lambda h, c: (h, c, c),
        TypeError,
        r"a pair \(h, c\) of Tensors, got a tuple of 3",
    ),
    (
        "c-none",
        lambda h, c: (h, None),
        TypeError,
        r"a pair .*got a tuple of 2 \(a Tensor of shape \(4, 6\), None",
    ),
    (
        "a-dict",
        lambda h, c: {"h": h, "c": c},
        TypeError,
        r"a pair .*got a dict of 2 \('h': a Tensor of shape \(4, 6\), 'c'",
    ),
]


@pytest.mark.parametrize("call", ["forward", "step"])
@pytest.mark.parametrize(
    ("case", "result", "error", "message"), STEP_CASES, ids=[c[0] for c in STEP_CASES]
)
def test_bad_step_result_is_refused_at_the_first_step(case, result, error, message, call):
    """On the reference backend (the one that runs custom cells) and on LSTM.step."""
    cell = returns(case, result)
    model = lstmkit.LSTM(IN, H, cell=cell, num_layers=2, dtype=F64)
    x = torch.randn(T, B, IN, dtype=F64)
    with pytest.raises(error, match=label(cell) + r": step\(\) must return " + message):
        model(x) if call == "forward" else model.step(x[0])


def test_step_result_is_checked_as_sequences_finish():
    """With lengths the step sees fewer rows as sequences end; a cell that returns a fixed
    batch passes the first steps and is refused at the first shorter one."""
    cell = returns("fixed-batch", lambda h, c: (h.new_zeros(B, H), c.new_zeros(B, H)))
    model = lstmkit.LSTM(IN, H, cell=cell, dtype=F64)
    x = torch.randn(T, B, IN, dtype=F64)
    model(x)  # every sequence T long: n == B at every step
    with pytest.raises(LSTMValueError, match=label(cell) + r".*h of shape \(3, 6\).*got \(4, 6\)"):
        model(x, lengths=[T, T, T, 2])


def test_projection_forgotten_by_the_cell():
    """A cell that ignores weight_hr returns h of width H where P is expected."""
    cell = variant("no-proj", step=lambda self, xp, h, c, p: lstm_step(xp, h, c, p["weight_hh"]))
    model = lstmkit.LSTM(IN, H, proj_size=P, cell=cell, dtype=F64)
    with pytest.raises(LSTMValueError, match=label(cell) + r".*h of shape \(4, 2\).*got \(4, 6\)"):
        model(torch.randn(T, B, IN, dtype=F64))


def test_good_custom_cell_runs_like_the_builtin_lstm():
    """Control for the step check: a correct custom cell is the standard LSTM, to rounding."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(
        IN, H, num_layers=2, bidirectional=True, proj_size=P, cell=Plain(), dtype=F64
    )
    theirs = nn.LSTM(IN, H, num_layers=2, bidirectional=True, proj_size=P, dtype=F64)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(T, B, IN, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


# ------------------------------------------------------------------ backend as a property


def test_setting_an_unknown_backend_is_refused_at_once():
    model = lstmkit.LSTM(IN, H, backend="reference")
    names = "'auto', 'reference', 'fused', 'native', 'triton'"
    with pytest.raises(
        ValueError, match=re.escape(f"backend must be one of {names}, got 'garbage'")
    ):
        model.backend = "garbage"
    assert model.backend == "reference"  # unchanged
    with pytest.raises(ValueError, match=re.escape(f"backend must be one of {names}, got None")):
        lstmkit.LSTM(IN, H, backend=None)


@pytest.mark.parametrize("backend", ["reference", "fused", "auto"])
def test_a_valid_backend_change_takes_effect(backend):
    torch.manual_seed(0)
    ours = lstmkit.LSTM(IN, H, num_layers=2, bidirectional=True, dtype=F64)
    theirs = nn.LSTM(IN, H, num_layers=2, bidirectional=True, dtype=F64)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.backend = backend
    assert ours.backend == backend
    assert list(ours.state_dict()) == list(theirs.state_dict())  # not a parameter or buffer
    assert copy.deepcopy(ours).backend == backend
    assert (f"backend={backend}" in repr(ours)) is (backend != "auto")
    x = torch.randn(T, B, IN, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


def test_the_backend_that_runs_is_the_one_set():
    """A custom cell runs only on reference: after switching to fused, the forward says so."""
    model = lstmkit.LSTM(IN, H, cell=Plain(), dtype=F64)
    x = torch.randn(T, B, IN, dtype=F64)
    model(x)
    model.backend = "fused"
    with pytest.raises(ValueError, match=re.escape("backend='fused' cannot run cell='plain'")):
        model(x)
