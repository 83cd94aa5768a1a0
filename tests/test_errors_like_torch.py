"""lstmkit fails where ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` fail, so that code written
for them still catches what it caught, and accepts what they accept.

Every bad argument or input below goes to torch (the oracle) and to lstmkit. Both must raise;
lstmkit's exception must be an instance of the class torch raised (besides the ``TypeError``
or ``ValueError`` it has always been), its message must name the argument, and a rejected
forward must leave the module as it was. The odd values torch accepts (``bidirectional=1``,
``hidden_size=True``, ``proj_size=0.0``) build the same parameters and give the same outputs.
``DEVIATIONS`` lists, and pins, where lstmkit differs on purpose.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstmkit
from lstmkit.validation import LSTMTypeError, LSTMValueError

# Distinct sizes, so that a message quoting the wrong dimension cannot match by accident.
IN, H, P, T, N = 5, 6, 3, 7, 2
F64, F32 = torch.float64, torch.float32
TWINS = {"LSTM": (nn.LSTM, lstmkit.LSTM), "LSTMCell": (nn.LSTMCell, lstmkit.LSTMCell)}


def pattern(*parts: str) -> str:
    """A regex matching a message that contains ``parts`` in order."""
    return ".*".join(re.escape(part) for part in parts)


def randn(*shape: int, dtype: torch.dtype = F64, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def packed(features: int, dtype: torch.dtype = F64) -> PackedSequence:
    return pack_padded_sequence(randn(T, N, features, dtype=dtype), [3, T], enforce_sorted=False)


def raised(call: Callable[[], object]) -> Exception | None:
    try:
        call()
    except Exception as error:  # any class: the class is what the tests compare
        return error
    return None


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- constructors


def ctor(twin: str, kwargs: dict, *parts: str):
    name, value = next(iter(kwargs.items()))
    return pytest.param(twin, kwargs, parts, id=f"{twin}-{name}={value!r}")


CTOR_CASES = [
    *(
        ctor("LSTM", {name: bad}, f"{name} must be a positive int", f"got {bad!r}")
        for name in ("input_size", "hidden_size", "num_layers")
        for bad in (0, -1, False)
    ),
    *(
        ctor("LSTM", {name: bad}, f"{name} must be an int", "got")
        for name in ("input_size", "hidden_size")
        for bad in (2.0, "2", None, np.int64(2), torch.tensor(2))
    ),
    # torch compares num_layers with 0 before range() refuses it: 0.0 is a ValueError there
    *(
        ctor("LSTM", {"num_layers": bad}, "num_layers must be an int", "got")
        for bad in (0.0, 2.0, "2", None, torch.tensor([1, 2]))
    ),
    *(
        ctor("LSTM", {name: bad}, f"{name} must be a bool", f"got {bad!r}")
        for name in ("bias", "batch_first")
        for bad in (1, 0, None, "yes")
    ),
    *(
        ctor("LSTM", {"dropout": bad, "num_layers": 2}, "dropout must be in [0, 1]", "got")
        for bad in (-0.1, 1.5, float("nan"))
    ),
    *(
        ctor("LSTM", {"dropout": bad, "num_layers": 2}, "dropout must be a float in [0, 1]")
        for bad in (True, "0.5", None, 1j, torch.tensor(0.5))
    ),
    ctor("LSTM", {"bidirectional": torch.tensor([1, 2])}, "bidirectional must be a bool"),
    *(
        ctor("LSTM", {"proj_size": bad}, f"proj_size must be in [0, hidden_size={H})", "got")
        for bad in (-1, H, H + 1)
    ),
    *(
        ctor("LSTM", {"proj_size": bad}, "proj_size must be an int", "got")
        for bad in (True, 2.5, "1", None, torch.tensor([1, 2]))
    ),
    *(
        ctor("LSTMCell", {name: bad}, f"{name} must be a positive int", "got -1")
        for name in ("input_size", "hidden_size")
        for bad in (-1,)
    ),
    *(
        ctor("LSTMCell", {name: bad}, f"{name} must be an int", "got")
        for name in ("input_size", "hidden_size")
        for bad in (2.0, "2", None)
    ),
    ctor("LSTMCell", {"bias": torch.tensor([1, 2])}, "bias must be a bool"),
    *(
        ctor(twin, {"device": bad}, "device must be a torch.device", f"got {bad!r}")
        for twin in TWINS
        for bad in ("nonsense", 1.5)
    ),
    *(
        ctor(twin, {"dtype": bad}, "dtype must be a", "got")
        for twin in TWINS
        for bad in (torch.int64, torch.bool, "float64", np.float64)
    ),
]


@pytest.mark.parametrize(("twin", "kwargs", "parts"), CTOR_CASES)
def test_constructor_fails_like_torch(twin, kwargs, parts):
    theirs, ours = TWINS[twin]
    kwargs = {"input_size": IN, "hidden_size": H, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        expected = raised(lambda: theirs(**kwargs))
        error = raised(lambda: ours(**kwargs))
    assert expected is not None, "torch accepts this: it belongs in ACCEPTED"
    assert isinstance(error, type(expected)), f"torch: {expected!r}, lstmkit: {error!r}"
    assert isinstance(error, TypeError | ValueError), error
    assert re.search(pattern(*parts), str(error)), str(error)


def accepted(twin: str, kwargs: dict, *, torch_runs: bool = True):
    """``torch_runs=False``: torch builds the model but its forward refuses the value (its
    kernel takes a bool or an int only), so the oracle is torch's model built from lstmkit's
    attributes, with the same weights."""
    case_id = f"{twin}-" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())
    return pytest.param(twin, kwargs, torch_runs, id=case_id)


ACCEPTED = [
    *(
        accepted("LSTM", {"bidirectional": v}, torch_runs=False)
        for v in (1, 0, 2, "yes", "", None, np.bool_(True))
    ),
    accepted("LSTM", {"bidirectional": torch.tensor(1), "num_layers": 2}, torch_runs=False),
    accepted("LSTM", {"input_size": True}),
    accepted("LSTM", {"hidden_size": True}),
    accepted("LSTM", {"num_layers": True}, torch_runs=False),
    *(accepted("LSTM", {"num_layers": v}) for v in (np.int64(2), torch.tensor(3))),
    *(accepted("LSTM", {"proj_size": v}) for v in (0.0, False, np.int64(2), torch.tensor(2))),
    *(
        accepted("LSTM", {"dropout": v, "num_layers": 2})
        for v in (1, 0, Fraction(1, 2), Decimal("0.5"), np.float64(0.25))
    ),
    accepted("LSTM", {"dtype": float}),
    accepted("LSTM", {"device": "cpu", "bidirectional": 1, "proj_size": 0.0}, torch_runs=False),
    *(accepted("LSTMCell", {"bias": v}) for v in (0, 1, "", "no", None, 0.0, np.int64(0))),
    accepted("LSTMCell", {"input_size": True}),
    accepted("LSTMCell", {"input_size": np.int64(IN), "hidden_size": torch.tensor(H)}),
    accepted("LSTMCell", {"hidden_size": True, "dtype": float}),
]
ATTRIBUTES = ("input_size", "hidden_size", "num_layers", "dropout", "proj_size")
FLAGS = ("bias", "batch_first", "bidirectional")


@pytest.mark.parametrize(("twin", "kwargs", "torch_runs"), ACCEPTED)
def test_accepts_what_torch_accepts(twin, kwargs, torch_runs):
    """Both build, with the same parameters and attributes that read the same, and give the
    same outputs once lstmkit holds torch's weights."""
    theirs_cls, ours_cls = TWINS[twin]
    kwargs = {"input_size": IN, "hidden_size": H, "dtype": F64, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        theirs, ours = theirs_cls(**kwargs), ours_cls(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name in ATTRIBUTES:
        if hasattr(theirs, name):
            assert getattr(ours, name) == getattr(theirs, name), name
            assert type(getattr(ours, name)) in (int, float), name  # plain Python numbers
    for name in FLAGS:
        if hasattr(theirs, name):
            assert getattr(ours, name) is bool(getattr(theirs, name)), name
    features = int(theirs.input_size)
    x = randn(N, features) if twin == "LSTMCell" else randn(T, N, features)
    theirs.eval(), ours.eval()
    refused = raised(lambda: theirs(x))
    assert (refused is None) is torch_runs, refused
    if not torch_runs:
        normalised = {
            k: getattr(ours, k) if k in ATTRIBUTES + FLAGS else v for k, v in kwargs.items()
        }
        theirs = theirs_cls(**normalised).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- forward calls


@dataclass(frozen=True)
class Bad:
    """A call that torch and lstmkit must both refuse. ``make`` builds the arguments, once,
    for both; ``step`` calls ``lstmkit.LSTM.step(x, state)``, whose oracle is torch's forward
    on the one-step sequence ``x.unsqueeze(0)``."""

    make: Callable[[], tuple]
    parts: tuple[str, ...]
    twin: str = "LSTM"
    module: dict = field(default_factory=dict)
    step: bool = False


def bad(case_id: str, make, *parts: str, twin: str = "LSTM", step: bool = False, **module):
    return pytest.param(Bad(make, parts, twin, module, step), id=case_id)


def hx(h_shape, c_shape, h_dtype=F64, c_dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(*h_shape, dtype=h_dtype), randn(*c_shape, dtype=c_dtype)


X, X_UNBATCHED, STATE = (T, N, IN), (T, IN), (1, N, H)

LSTM_CASES = [
    *(
        bad(f"input-{rank}d", lambda s=shape: (randn(*s),), "input must be 2-D or 3-D", f"{rank}-D")
        for rank, shape in ((0, ()), (1, (IN,)), (4, (T, N, 1, IN)))
    ),
    bad(
        "input-features", lambda: (randn(T, N, 3),), "input.size(-1) must be input_size=5", "got 3"
    ),
    bad(
        "input-features-unbatched",
        lambda: (randn(T, IN + 1),),
        "input.size(-1) must be input_size=5",
        "got 6",
    ),
    bad(
        "input-features-batch_first",
        lambda: (randn(N, T, IN - 1),),
        "input.size(-1) must be input_size=5",
        "got 4",
        batch_first=True,
    ),
    *(
        bad(
            f"input-{dtype}",
            lambda d=dtype: (torch.ones(X, dtype=d),),
            "input must be a floating-point tensor",
            f"got dtype {dtype}",
        )
        for dtype in (torch.int64, torch.bool, torch.complex128)
    ),
    bad(
        "input-int64-unbatched",
        lambda: (torch.ones(X_UNBATCHED, dtype=torch.int32),),
        "input must be a floating-point tensor",
    ),
    bad(
        "input-float32-module-float64",
        lambda: (randn(*X, dtype=F32),),
        "input.dtype must match the parameters'.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "input-float64-module-float32",
        lambda: (randn(*X),),
        "input.dtype must match the parameters'.dtype=torch.float32",
        "got torch.float64",
        dtype=F32,
    ),
    bad(
        "input-float16-module-float64",
        lambda: (randn(*X, dtype=torch.float16),),
        "input.dtype must match",
        "got torch.float16",
    ),
    bad(
        "input-meta",
        lambda: (randn(*X, device="meta"),),
        "input.device must match the parameters'.device=cpu",
        "got meta",
    ),
    *(
        bad(
            f"T0-{config}",
            lambda s=shape: (randn(*s),),
            "input must have at least one time step",
            f"got shape {shape}",
            **module,
        )
        for config, shape, module in (
            ("batched", (0, N, IN), {}),
            ("batch_first", (N, 0, IN), {"batch_first": True}),
            ("unbatched", (0, IN), {}),
        )
    ),
    bad(
        "hx-bare-tensor",
        lambda: (randn(*X), randn(2, 1, N, H)),
        "hx must be a tuple (h_0, c_0) of two Tensors",
        "got a Tensor of shape (2, 1, 2, 6)",
    ),
    bad(
        "hx-tuple-of-3",
        lambda: (randn(*X), (randn(*STATE),) * 3),
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 3",
    ),
    bad("hx-int", lambda: (randn(*X), 3), "hx must be a tuple (h_0, c_0)", "got 3 (int)"),
]

# (case, module, input shape, h_0 shape, c_0 shape, which is wrong, its expected shape, input)
HX_SHAPES = [
    ("h-2d", {}, X, (N, H), STATE, "h_0", STATE, "batched"),
    ("c-4d", {}, X, STATE, (1, 1, N, H), "c_0", STATE, "batched"),
    ("h-batch", {}, X, (1, N + 1, H), STATE, "h_0", STATE, "batched"),
    ("c-batch", {}, X, STATE, (1, N + 1, H), "c_0", STATE, "batched"),
    ("h-width", {}, X, (1, N, H + 1), STATE, "h_0", STATE, "batched"),
    ("c-width", {}, X, STATE, (1, N, H + 1), "c_0", STATE, "batched"),
    ("h-layers", {}, X, (2, N, H), STATE, "h_0", STATE, "batched"),
    (
        "bidir-D-forgotten",
        {"bidirectional": True},
        X,
        STATE,
        (2, N, H),
        "h_0",
        (2, N, H),
        "batched",
    ),
    (
        "bidir-2layer-h-layers",
        {"bidirectional": True, "num_layers": 2},
        X,
        (2, N, H),
        (4, N, H),
        "h_0",
        (4, N, H),
        "batched",
    ),
    ("proj-h-of-H", {"proj_size": P}, X, (1, N, H), STATE, "h_0", (1, N, P), "batched"),
    ("proj-c-of-P", {"proj_size": P}, X, (1, N, P), (1, N, P), "c_0", STATE, "batched"),
    ("unbatched-3d", {}, X_UNBATCHED, (1, 1, H), (1, 1, H), "h_0", (1, H), "unbatched"),
    ("unbatched-h-3d", {}, X_UNBATCHED, (1, N, H), (1, H), "h_0", (1, H), "unbatched"),
    ("unbatched-1d", {}, X_UNBATCHED, (H,), (H,), "h_0", (1, H), "unbatched"),
    ("unbatched-width", {}, X_UNBATCHED, (1, H + 1), (1, H), "h_0", (1, H), "unbatched"),
    (
        "unbatched-bidir-2layer-c-width",
        {"bidirectional": True, "num_layers": 2},
        X_UNBATCHED,
        (4, H),
        (4, H + 1),
        "c_0",
        (4, H),
        "unbatched",
    ),
    (
        "batch_first-T-as-batch",
        {"batch_first": True},
        (N, T, IN),
        (1, T, H),
        (1, T, H),
        "h_0",
        STATE,
        "batched",
    ),
]
LSTM_CASES += [
    bad(
        f"hx-{case}",
        lambda x=x, h=h, c=c: (randn(*x), hx(h, c)),
        f"hx[{0 if which == 'h_0' else 1}] ({which}) must have shape {expected} for {what} input",
        f"got {h if which == 'h_0' else c}",
        **module,
    )
    for case, module, x, h, c, which, expected, what in HX_SHAPES
]
LSTM_CASES += [
    bad(
        "hx-h-float32",
        lambda: (randn(*X), hx(STATE, STATE, h_dtype=F32)),
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "hx-h-int64",
        lambda: (randn(*X), (torch.zeros(STATE, dtype=torch.int64), randn(*STATE))),
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
        "got torch.int64",
    ),
    bad(
        "hx-c-meta",
        lambda: (randn(*X), (randn(*STATE), randn(*STATE, device="meta"))),
        "hx[1] (c_0).device must match input.device=cpu",
        "got meta",
    ),
    bad(
        "hx-h-meta",
        lambda: (randn(*X), (randn(*STATE, device="meta"), randn(*STATE))),
        "hx[0] (h_0).device must match input.device=cpu",
        "got meta",
    ),
    bad(
        "packed-features",
        lambda: (packed(IN + 1),),
        "input.data.size(-1) must be input_size=5",
        "got 6",
    ),
    bad(
        "packed-float32",
        lambda: (packed(IN, F32),),
        "input.data.dtype must match the parameters'.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "packed-hx-h-width",
        lambda: (packed(IN), hx((1, N, H + 1), STATE)),
        "hx[0] (h_0) must have shape (1, 2, 6)",
        "got (1, 2, 7)",
    ),
    bad(
        "packed-hx-c-width",
        lambda: (packed(IN), hx(STATE, (1, N, H - 1))),
        "hx[1] (c_0) must have shape (1, 2, 6)",
        "got (1, 2, 5)",
    ),
    bad(
        "packed-hx-h-float32",
        lambda: (packed(IN), hx(STATE, STATE, h_dtype=F32)),
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
        "got torch.float32",
    ),
]

STEP_CASES = [
    bad("step-input-0d", lambda: (randn(),), "input must be 1-D or 2-D", "0-D", step=True),
    bad("step-input-3d", lambda: (randn(1, N, IN),), "input must be 1-D or 2-D", "3-D", step=True),
    bad(
        "step-input-features",
        lambda: (randn(N, IN + 1),),
        "input.size(-1) must be input_size=5",
        "got 6",
        step=True,
    ),
    bad(
        "step-input-int64",
        lambda: (torch.ones(N, IN, dtype=torch.int64),),
        "input must be a floating-point tensor",
        step=True,
    ),
    bad(
        "step-input-float32",
        lambda: (randn(N, IN, dtype=F32),),
        "input.dtype must match the parameters'.dtype=torch.float64",
        step=True,
    ),
    bad(
        "step-state-tuple-of-3",
        lambda: (randn(N, IN), (randn(*STATE),) * 3),
        "state must be an LSTMState or a tuple (h, c)",
        "got a tuple of 3",
        step=True,
    ),
    bad(
        "step-state-h-batch",
        lambda: (randn(N, IN), hx((1, N + 1, H), STATE)),
        "state.h must have shape (1, 2, 6) for batched input",
        "got (1, 3, 6)",
        step=True,
    ),
    bad(
        "step-state-c-width-unbatched",
        lambda: (randn(IN), hx((1, H), (1, H + 1))),
        "state.c must have shape (1, 6) for unbatched input",
        "got (1, 7)",
        step=True,
    ),
    bad(
        "step-state-h-float32",
        lambda: (randn(N, IN), hx(STATE, STATE, h_dtype=F32)),
        "state.h.dtype must match input.dtype=torch.float64",
        step=True,
    ),
]


def cell_bad(case_id: str, make, *parts: str):
    return bad(case_id, make, *parts, twin="LSTMCell")


def cell_hx(x_shape, h_shape, c_shape, **dtypes):
    return randn(*x_shape), hx(h_shape, c_shape, **dtypes)


CELL_CASES = [
    cell_bad("cell-input-0d", lambda: (randn(),), "input must be 1-D or 2-D", "0-D"),
    cell_bad("cell-input-3d", lambda: (randn(1, N, IN),), "input must be 1-D or 2-D", "3-D"),
    cell_bad(
        "cell-input-features",
        lambda: (randn(N, IN + 1),),
        "input.size(-1) must be input_size=5",
        "got 6",
    ),
    cell_bad(
        "cell-input-features-unbatched",
        lambda: (randn(IN - 1),),
        "input.size(-1) must be input_size=5",
        "got 4",
    ),
    cell_bad(
        "cell-input-int64",
        lambda: (torch.ones(N, IN, dtype=torch.int64),),
        "input must be a floating-point tensor",
    ),
    cell_bad(
        "cell-input-float32",
        lambda: (randn(N, IN, dtype=F32),),
        "input.dtype must match the parameters'.dtype=torch.float64",
    ),
    cell_bad(
        "cell-input-meta",
        lambda: (randn(N, IN, device="meta"),),
        "input.device must match the parameters'.device=cpu",
    ),
    cell_bad(
        "cell-hx-bare-tensor",
        lambda: (randn(N, IN), randn(N, H)),
        "hx must be a tuple (h_0, c_0) of two Tensors",
    ),
    cell_bad(
        "cell-hx-tuple-of-1",
        lambda: (randn(N, IN), (randn(N, H),)),
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 1",
    ),
    cell_bad(
        "cell-hx-tuple-of-3",
        lambda: (randn(N, IN), (randn(N, H),) * 3),
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 3",
    ),
    cell_bad("cell-hx-int", lambda: (randn(N, IN), 3), "hx must be a tuple", "got 3 (int)"),
    *(
        cell_bad(
            f"cell-hx-{case}",
            lambda x=x, h=h, c=c: cell_hx(x, h, c),
            f"hx[{0 if which == 'h_0' else 1}] ({which}) must have shape {expected} for {what}",
            f"got {h if which == 'h_0' else c}",
        )
        for case, x, h, c, which, expected, what in (
            ("h-batch", (N, IN), (N + 1, H), (N, H), "h_0", (N, H), "batched"),
            ("c-batch", (N, IN), (N, H), (N + 1, H), "c_0", (N, H), "batched"),
            ("h-width", (N, IN), (N, H + 1), (N, H), "h_0", (N, H), "batched"),
            ("c-width", (N, IN), (N, H), (N, H + 1), "c_0", (N, H), "batched"),
            ("h-1d", (N, IN), (H,), (N, H), "h_0", (N, H), "batched"),
            ("h-3d", (N, IN), (1, N, H), (N, H), "h_0", (N, H), "batched"),
            ("h-batch-1", (N, IN), (1, H), (N, H), "h_0", (N, H), "batched"),
            ("unbatched-2d", (IN,), (1, H), (1, H), "h_0", (H,), "unbatched"),
            ("unbatched-width", (IN,), (H + 1,), (H,), "h_0", (H,), "unbatched"),
            ("unbatched-c-batched", (IN,), (H,), (N, H), "c_0", (H,), "unbatched"),
        )
    ),
    cell_bad(
        "cell-hx-h-float32",
        lambda: cell_hx((N, IN), (N, H), (N, H), h_dtype=F32),
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
    ),
    cell_bad(
        "cell-hx-h-meta",
        lambda: (randn(N, IN), (randn(N, H, device="meta"), randn(N, H))),
        "hx[0] (h_0).device must match input.device=cpu",
    ),
]

FORWARD_CASES = LSTM_CASES + STEP_CASES + CELL_CASES


def twins(case: Bad) -> tuple[nn.Module, nn.Module]:
    theirs_cls, ours_cls = TWINS[case.twin]
    kwargs = {"dtype": F64, **case.module}
    return theirs_cls(IN, H, **kwargs), ours_cls(IN, H, **kwargs)


def torch_call(case: Bad, module: nn.Module, args: tuple) -> object:
    if case.step:  # one step of a stream is a one-step sequence
        x, *state = args
        return module(x.unsqueeze(0), *state)
    return module(*args)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_fails_like_torch(case: Bad):
    theirs, ours = twins(case)
    args = case.make()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = raised(lambda: torch_call(case, theirs, args))
    error = raised(lambda: ours.step(*args) if case.step else ours(*args))
    assert expected is not None, "torch accepts this: it belongs with the DEVIATIONS"
    assert isinstance(error, type(expected)), f"torch: {expected!r}, lstmkit: {error!r}"
    assert isinstance(error, TypeError | ValueError), error
    assert re.search(pattern(*case.parts), str(error)), str(error)
    after = ours.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_the_tables_cover_what_torch_raises():
    """The cases run into each of the classes torch raises, and lstmkit's two classes."""
    assert len(CTOR_CASES) + len(FORWARD_CASES) >= 100
    raised_by_torch = set()
    for param in FORWARD_CASES:
        case = param.values[0]
        theirs, _ = twins(case)
        raised_by_torch.add(type(raised(lambda c=case, m=theirs: torch_call(c, m, c.make()))))
    assert {RuntimeError, ValueError, TypeError} <= raised_by_torch
    assert issubclass(LSTMValueError, ValueError) and issubclass(LSTMValueError, RuntimeError)
    assert all(issubclass(LSTMTypeError, c) for c in (TypeError, ValueError, RuntimeError))


# --------------------------------------------------------------------------- deviations


@dataclass(frozen=True)
class Deviation:
    """Where lstmkit differs from torch on purpose: torch's outcome (``None``: it runs) and
    lstmkit's error."""

    call: Callable[[type], object]
    twin: str
    torch_raises: type[Exception] | None
    ours: type[Exception]
    parts: tuple[str, ...]


def deviation(case_id, twin, call, torch_raises, ours, *parts, why: str):
    del why  # for the reader
    return pytest.param(Deviation(call, twin, torch_raises, ours, parts), id=case_id)


def forward(*args):
    return lambda cls: cls(IN, H, dtype=F64)(*args)


DEVIATIONS = [
    deviation(
        "cell-size-0",
        "LSTMCell",
        lambda cls: cls(IN, 0),
        None,
        LSTMValueError,
        "hidden_size must be a positive int",
        why="torch builds a cell without units (nn.LSTM itself refuses hidden_size=0)",
    ),
    deviation(
        "cell-input_size-False",
        "LSTMCell",
        lambda cls: cls(False, H),
        None,
        LSTMValueError,
        "input_size must be a positive int",
        why="the same: False is a size of 0",
    ),
    deviation(
        "complex-dtype",
        "LSTM",
        lambda cls: cls(IN, H, dtype=torch.complex64),
        None,
        LSTMTypeError,
        "dtype must be a floating-point torch.dtype",
        why="torch runs complex LSTMs; lstmkit's backends are real-valued",
    ),
    deviation(
        "input-list",
        "LSTM",
        forward([[0.0] * IN] * T),
        AttributeError,
        TypeError,
        "input must be a Tensor",
        why="torch's AttributeError comes from calling .dim() on a list",
    ),
    deviation(
        "hx-h-none",
        "LSTM",
        forward(randn(*X), (None, randn(*STATE))),
        AttributeError,
        TypeError,
        "hx[0] (h_0) must be a Tensor",
        why="the same, on None",
    ),
    deviation(
        "hx-tuple-of-1",
        "LSTM",
        forward(randn(*X), (randn(*STATE),)),
        IndexError,
        LSTMTypeError,
        "hx must be a tuple (h_0, c_0)",
        why="torch's IndexError comes from reading hx[1]",
    ),
    deviation(
        "hx-bare-3d-tensor",
        "LSTM",
        forward(randn(*X), randn(*STATE)),
        IndexError,
        LSTMTypeError,
        "hx must be a tuple (h_0, c_0)",
        why="the same: torch reads rows of the tensor as h_0 and c_0",
    ),
    deviation(
        "packed-hx-2d",
        "LSTM",
        forward(packed(IN), hx((N, H), (N, H))),
        IndexError,
        LSTMValueError,
        "hx[0] (h_0) must have shape (1, 2, 6)",
        why="torch's IndexError comes from reordering the rows of a 2-D hx",
    ),
    deviation(
        "packed-hx-batch-too-large",
        "LSTM",
        forward(packed(IN), hx((1, N + 1, H), (1, N + 1, H))),
        None,
        LSTMValueError,
        "hx[0] (h_0) must have shape (1, 2, 6)",
        why="torch checks no hx shape for a PackedSequence and silently drops the extra row",
    ),
    deviation(
        "hx-c-float32",
        "LSTM",
        forward(randn(*X), hx(STATE, STATE, c_dtype=F32)),
        None,
        LSTMTypeError,
        "hx[1] (c_0).dtype must match input.dtype=torch.float64",
        why="torch's CPU kernel promotes c_0 (its h_0 of another dtype is a RuntimeError)",
    ),
    deviation(
        "cell-hx-c-float32",
        "LSTMCell",
        lambda cls: cls(IN, H, dtype=F64)(randn(N, IN), hx((N, H), (N, H), c_dtype=F32)),
        None,
        LSTMTypeError,
        "hx[1] (c_0).dtype must match input.dtype=torch.float64",
        why="the same",
    ),
]


@pytest.mark.parametrize("case", DEVIATIONS)
def test_deviations_from_torch(case: Deviation):
    theirs_cls, ours_cls = TWINS[case.twin]
    expected = raised(lambda: case.call(theirs_cls))
    assert type(expected) is (type(None) if case.torch_raises is None else case.torch_raises)
    with pytest.raises(case.ours, match=pattern(*case.parts)):
        case.call(ours_cls)
