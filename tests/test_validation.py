"""Bad arguments raise before anything is computed or changed, with a message that names the
argument, what was expected and what was received (``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong value, shape or device).

Each group of rejections has a positive control against ``torch.nn``, so that the checks
cannot pass by rejecting everything.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit

# Distinct sizes, so that a message quoting the wrong dimension cannot match by accident.
IN, H, P, T, N = 5, 6, 3, 7, 2
F64 = torch.float64


def pattern(*parts: str) -> str:
    """A regex matching a message that contains ``parts`` in order."""
    return ".*".join(re.escape(part) for part in parts)


def randn(*shape: int, dtype: torch.dtype = F64, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)


def assert_same(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- constructors


def _ctor(cls: type, error: type, kwargs: dict, *parts: str):
    (name, value), *_ = kwargs.items()
    return pytest.param(cls, kwargs, error, parts, id=f"{cls.__name__}-{name}={value!r}")


def _ctor_cases(cls: type, sizes: tuple[str, ...], flags: tuple[str, ...]):
    """Sizes and the flags torch.nn checks as bools; what it takes (``True`` as a size,
    ``bidirectional=1``) is in tests/test_errors_like_torch.py."""
    for name in sizes:
        for bad in (4.0, "4"):
            yield _ctor(cls, TypeError, {name: bad}, f"{name} must be an int", f"got {bad!r}")
        for bad in (0, -1):
            yield _ctor(
                cls, ValueError, {name: bad}, f"{name} must be a positive int", f"got {bad}"
            )
    for name in flags:
        for bad in (1, None, "yes"):
            yield _ctor(cls, TypeError, {name: bad}, f"{name} must be a bool", f"got {bad!r}")


CTOR_CASES = [
    *_ctor_cases(
        lstmkit.LSTM,
        ("input_size", "hidden_size", "num_layers"),
        ("bias", "batch_first"),
    ),
    *_ctor_cases(lstmkit.LSTMCell, ("input_size", "hidden_size"), ()),
    *(
        _ctor(lstmkit.LSTM, ValueError, {"dropout": bad}, "dropout must be in [0, 1]", f"got {bad}")
        for bad in (-0.1, 1.5, math.nan)
    ),
    *(
        _ctor(
            lstmkit.LSTM,
            TypeError,
            {"dropout": bad},
            "dropout must be a float in [0, 1]",
            f"got {bad!r}",
        )
        for bad in ("0.5", None, True)
    ),
    *(
        _ctor(
            lstmkit.LSTM,
            ValueError,
            {"proj_size": bad},
            f"proj_size must be in [0, hidden_size={H})",
            f"got {bad}",
        )
        for bad in (-1, H, H + 1)
    ),
    *(
        _ctor(
            lstmkit.LSTM, TypeError, {"proj_size": bad}, "proj_size must be an int", f"got {bad!r}"
        )
        for bad in (1.0, True, "1")
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "parts"), CTOR_CASES)
def test_constructor_rejects(cls, kwargs, error, parts):
    with pytest.raises(error, match=pattern(*parts)):
        cls(**{"input_size": IN, "hidden_size": H, **kwargs})


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match=pattern("dropout=0.5", "num_layers=1")):
        lstmkit.LSTM(IN, H, dropout=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 1, "hidden_size": 1},
        {"num_layers": 2, "dropout": 0.0, "bias": False, "batch_first": True},
        {"num_layers": 2, "dropout": 1, "bidirectional": True},
        {"num_layers": 3, "dropout": 1.0, "proj_size": H - 1},
        {"proj_size": 0},
    ],
)
def test_constructor_accepts_edge_values_like_torch(kwargs):
    """Boundary values are accepted, silently, and build ``torch.nn.LSTM``'s parameters."""
    kwargs = {"input_size": IN, "hidden_size": H, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(1)
        ours = lstmkit.LSTM(**kwargs)
        torch.manual_seed(1)
        theirs = nn.LSTM(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


# --------------------------------------------------------------------------- forward calls


@dataclass(frozen=True)
class Bad:
    """A forward call that must be rejected."""

    call: Callable[[nn.Module], object]
    error: type[Exception]
    parts: tuple[str, ...]
    cls: type = lstmkit.LSTM
    module: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        return self.cls(IN, H, **{"dtype": F64, **self.module})


def bad(case_id: str, call, error, *parts: str, cls: type = lstmkit.LSTM, **module):
    return pytest.param(Bad(call, error, parts, cls, module), id=case_id)


def with_hx(x_shape, h_shape, c_shape, module, **kwargs):
    return module(randn(*x_shape), (randn(*h_shape), randn(*c_shape)), **kwargs)


# Module configurations and input shapes: the state shapes follow from them.
CONFIGS = {
    "batched": ({}, (T, N, IN)),
    "unbatched": ({}, (T, IN)),
    "batch_first": ({"batch_first": True}, (N, T, IN)),
    "proj": ({"proj_size": P}, (T, N, IN)),
    "bidir-2layer": ({"bidirectional": True, "num_layers": 2}, (T, N, IN)),
    "bidir-2layer-proj-unbatched": (
        {"bidirectional": True, "num_layers": 2, "proj_size": P},
        (T, IN),
    ),
}


def state_shapes(module: dict, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """``(h_0, c_0)`` shapes: ``(D * num_layers, [N,] H_out)`` and ``(..., H)``."""
    states = module.get("num_layers", 1) * (2 if module.get("bidirectional") else 1)
    batch = (N,) if len(x_shape) == 3 else ()
    return (states, *batch, module.get("proj_size") or H), (states, *batch, H)


def _wrong_shapes(shapes, k: int, module: dict, batched: bool):
    """Plausible mistakes for state ``k``: each dimension off by one, a batch dimension
    missing or extra, h and c widths swapped (projection), D forgotten (bidirectional)."""
    shape = shapes[k]
    yield from ((*shape[:d], shape[d] + 1, *shape[d + 1 :]) for d in range(len(shape)))
    yield (shape[0], shape[-1]) if batched else (shape[0], 1, shape[-1])
    if shapes[0] != shapes[1]:
        yield shapes[1 - k]
    if module.get("bidirectional"):
        yield (shape[0] // 2, *shape[1:])


def _hx_shape_cases():
    for config, (module, x_shape) in CONFIGS.items():
        shapes = state_shapes(module, x_shape)
        batched = len(x_shape) == 3
        what = "batched" if batched else "unbatched"
        for k, name in enumerate(("hx[0] (h_0)", "hx[1] (c_0)")):
            for wrong in _wrong_shapes(shapes, k, module, batched):
                given = (wrong, shapes[1]) if k == 0 else (shapes[0], wrong)
                yield bad(
                    f"{config}-{name[-4:-1]}{wrong}",
                    partial(with_hx, x_shape, *given),
                    ValueError,
                    f"{name} must have shape {shapes[k]} for {what} input",
                    f"got {wrong}",
                    **module,
                )


X = (T, N, IN)
HX = state_shapes({}, X)
GOOD_HX = partial(with_hx, X, *HX)


def packed(features: int, dtype=F64):
    return pack_padded_sequence(randn(T, N, features, dtype=dtype), [3, T], enforce_sorted=False)


LSTM_CASES = [
    bad("input-list", lambda m: m([[0.0] * IN] * T), TypeError, "input must be a Tensor", "(list)"),
    bad(
        "input-1d",
        lambda m: m(randn(IN)),
        ValueError,
        "input must be 2-D or 3-D",
        "got 1-D of shape (5,)",
    ),
    bad(
        "input-4d",
        lambda m: m(randn(T, N, 1, IN)),
        ValueError,
        "input must be 2-D or 3-D",
        "got 4-D of shape (7, 2, 1, 5)",
    ),
    bad(
        "input-features",
        lambda m: m(randn(T, N, 3)),
        ValueError,
        "input.size(-1) must be input_size=5",
        "got 3",
    ),
    bad(
        "input-features-unbatched",
        lambda m: m(randn(T, IN + 1)),
        ValueError,
        "input.size(-1) must be input_size=5",
        "got 6",
    ),
    bad(
        "input-int64",
        lambda m: m(torch.ones(X, dtype=torch.int64)),
        TypeError,
        "input must be a floating-point tensor",
        "got dtype torch.int64",
    ),
    bad(
        "input-float64-module-float32",
        lambda m: m(randn(*X)),
        TypeError,
        "input.dtype must match the parameters'.dtype=torch.float32",
        "got torch.float64",
        dtype=torch.float32,
    ),
    bad(
        "input-float32-module-float64",
        lambda m: m(randn(*X, dtype=torch.float32)),
        TypeError,
        "input.dtype must match the parameters'.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "input-meta",
        lambda m: m(randn(*X, device="meta")),
        ValueError,
        "input.device must match the parameters'.device=cpu",
        "got meta",
    ),
    bad(
        "hx-bare-tensor",
        lambda m: m(randn(*X), randn(*HX[0])),
        TypeError,
        "hx must be a tuple (h_0, c_0) of two Tensors",
        "got a Tensor of shape (1, 2, 6)",
    ),
    bad(
        "hx-tuple-of-1",
        lambda m: m(randn(*X), (randn(*HX[0]),)),
        TypeError,
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 1 (a Tensor of shape (1, 2, 6))",
    ),
    bad(
        "hx-tuple-of-3",
        lambda m: m(randn(*X), (randn(*HX[0]),) * 3),
        TypeError,
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 3 (a Tensor",
    ),
    bad(
        "hx-h-none",
        lambda m: m(randn(*X), (None, randn(*HX[1]))),
        TypeError,
        "hx[0] (h_0) must be a Tensor",
        "got None (NoneType)",
    ),
    *_hx_shape_cases(),
    bad(
        "hx-h-float32",
        lambda m: m(randn(*X), (randn(*HX[0], dtype=torch.float32), randn(*HX[1]))),
        TypeError,
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "hx-c-float32",
        lambda m: m(randn(*X), (randn(*HX[0]), randn(*HX[1], dtype=torch.float32))),
        TypeError,
        "hx[1] (c_0).dtype must match input.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "hx-c-meta",
        lambda m: m(randn(*X), (randn(*HX[0]), randn(*HX[1], device="meta"))),
        ValueError,
        "hx[1] (c_0).device must match input.device=cpu",
        "got meta",
    ),
    bad(
        "lengths-too-few",
        partial(GOOD_HX, lengths=[T]),
        ValueError,
        "lengths must have one entry per sequence (shape (2,))",
        "got shape (1,)",
    ),
    bad(
        "lengths-too-many",
        partial(GOOD_HX, lengths=[T, T, T]),
        ValueError,
        "lengths must have one entry per sequence (shape (2,))",
        "got shape (3,)",
    ),
    bad(
        "lengths-batch_first-T-entries",
        lambda m: m(randn(N, T, IN), lengths=[T] * T),
        ValueError,
        "lengths must have one entry per sequence (shape (2,))",
        "got shape (7,)",
        batch_first=True,
    ),
    bad(
        "lengths-2d",
        partial(GOOD_HX, lengths=torch.tensor([[T, T]])),
        ValueError,
        "shape (2,)",
        "got shape (1, 2)",
    ),
    bad(
        "lengths-zero",
        partial(GOOD_HX, lengths=[0, T]),
        ValueError,
        "lengths must lie in [1, 7]",
        "got min 0 and max 7",
    ),
    bad(
        "lengths-above-T",
        partial(GOOD_HX, lengths=[1, T + 1]),
        ValueError,
        "lengths must lie in [1, 7]",
        "got min 1 and max 8",
    ),
    bad(
        "lengths-float-tensor",
        partial(GOOD_HX, lengths=torch.tensor([2.0, 3.0])),
        TypeError,
        "lengths must hold integers",
        "got dtype torch.float32",
    ),
    bad(
        "lengths-bool-tensor",
        partial(GOOD_HX, lengths=torch.tensor([True, True])),
        TypeError,
        "lengths must hold integers",
        "got dtype torch.bool",
    ),
    bad(
        "lengths-float-list",
        partial(GOOD_HX, lengths=[2.0, 3.0]),
        TypeError,
        "lengths must be a 1-D integer Tensor or a sequence of ints",
        "got [2.0, 3.0] (list)",
    ),
    bad(
        "lengths-int",
        partial(GOOD_HX, lengths=T),
        TypeError,
        "lengths must be a 1-D integer Tensor or a sequence of ints",
        "got 7 (int)",
    ),
    bad(
        "lengths-unbatched",
        lambda m: m(randn(T, IN), lengths=[T]),
        ValueError,
        "lengths must be None for unbatched (2-D) input",
        "got list",
    ),
    bad(
        "lengths-with-packed",
        lambda m: m(packed(IN), lengths=[3, T]),
        ValueError,
        "lengths must be None for a PackedSequence input",
        "got list",
    ),
    bad(
        "packed-features",
        lambda m: m(packed(IN + 1)),
        ValueError,
        "input.data.size(-1) must be input_size=5",
        "got 6",
    ),
    bad(
        "packed-float32",
        lambda m: m(packed(IN, torch.float32)),
        TypeError,
        "input.data.dtype must match the parameters'.dtype=torch.float64",
        "got torch.float32",
    ),
    bad(
        "T0",
        lambda m: m(randn(0, N, IN)),
        ValueError,
        "input must have at least one time step",
        "got shape (0, 2, 5)",
    ),
    bad(
        "T0-batch_first",
        lambda m: m(randn(N, 0, IN)),
        ValueError,
        "input must have at least one time step",
        "got shape (2, 0, 5)",
        batch_first=True,
    ),
    bad(
        "T0-unbatched",
        lambda m: m(randn(0, IN)),
        ValueError,
        "input must have at least one time step",
        "got shape (0, 5)",
    ),
    bad(
        "T0-with-lengths",
        lambda m: m(randn(0, N, IN), lengths=[1, 1]),
        ValueError,
        "input must have at least one time step",
        "got shape (0, 2, 5)",
    ),
]


def cell_bad(case_id: str, call, error, *parts: str):
    return bad(case_id, call, error, *parts, cls=lstmkit.LSTMCell)


def cell_hx(x_shape, h_shape, c_shape, module):
    return module(randn(*x_shape), (randn(*h_shape), randn(*c_shape)))


def _cell_hx_shape_cases():
    for x_shape, shape, wrongs in (
        ((N, IN), (N, H), ((N + 1, H), (N, H + 1), (H,), (1, N, H))),
        ((IN,), (H,), ((H + 1,), (1, H), (N, H))),
    ):
        what = "batched" if len(x_shape) == 2 else "unbatched"
        for k, name in enumerate(("hx[0] (h_0)", "hx[1] (c_0)")):
            for wrong in wrongs:
                given = (wrong, shape) if k == 0 else (shape, wrong)
                yield cell_bad(
                    f"cell-{what}-{name[-4:-1]}{wrong}",
                    partial(cell_hx, x_shape, *given),
                    ValueError,
                    f"{name} must have shape {shape} for {what} input",
                    f"got {wrong}",
                )


CELL_CASES = [
    cell_bad(
        "cell-input-list", lambda m: m([0.0] * IN), TypeError, "input must be a Tensor", "(list)"
    ),
    cell_bad(
        "cell-input-0d",
        lambda m: m(randn()),
        ValueError,
        "input must be 1-D or 2-D",
        "got 0-D of shape ()",
    ),
    cell_bad(
        "cell-input-3d",
        lambda m: m(randn(1, N, IN)),
        ValueError,
        "input must be 1-D or 2-D",
        "got 3-D of shape (1, 2, 5)",
    ),
    cell_bad(
        "cell-input-features",
        lambda m: m(randn(N, IN + 1)),
        ValueError,
        "input.size(-1) must be input_size=5",
        "got 6",
    ),
    cell_bad(
        "cell-input-features-unbatched",
        lambda m: m(randn(IN - 1)),
        ValueError,
        "input.size(-1) must be input_size=5",
        "got 4",
    ),
    cell_bad(
        "cell-input-int64",
        lambda m: m(torch.ones(N, IN, dtype=torch.int64)),
        TypeError,
        "input must be a floating-point tensor",
        "got dtype torch.int64",
    ),
    cell_bad(
        "cell-input-float32",
        lambda m: m(randn(N, IN, dtype=torch.float32)),
        TypeError,
        "input.dtype must match the parameters'.dtype=torch.float64",
        "got torch.float32",
    ),
    cell_bad(
        "cell-input-meta",
        lambda m: m(randn(N, IN, device="meta")),
        ValueError,
        "input.device must match the parameters'.device=cpu",
        "got meta",
    ),
    cell_bad(
        "cell-hx-bare-tensor",
        lambda m: m(randn(N, IN), randn(N, H)),
        TypeError,
        "hx must be a tuple (h_0, c_0) of two Tensors",
        "got a Tensor of shape (2, 6)",
    ),
    cell_bad(
        "cell-hx-tuple-of-3",
        lambda m: m(randn(N, IN), (randn(N, H),) * 3),
        TypeError,
        "hx must be a tuple (h_0, c_0)",
        "got a tuple of 3 (a Tensor of shape (2, 6)",
    ),
    cell_bad(
        "cell-hx-c-none",
        lambda m: m(randn(N, IN), (randn(N, H), None)),
        TypeError,
        "hx[1] (c_0) must be a Tensor",
        "got None (NoneType)",
    ),
    *_cell_hx_shape_cases(),
    cell_bad(
        "cell-hx-h-float32",
        lambda m: m(randn(N, IN), (randn(N, H, dtype=torch.float32), randn(N, H))),
        TypeError,
        "hx[0] (h_0).dtype must match input.dtype=torch.float64",
        "got torch.float32",
    ),
    cell_bad(
        "cell-hx-h-meta",
        lambda m: m(randn(N, IN), (randn(N, H, device="meta"), randn(N, H))),
        ValueError,
        "hx[0] (h_0).device must match input.device=cpu",
        "got meta",
    ),
]


FORWARD_CASES = LSTM_CASES + CELL_CASES


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_rejects(case: Bad):
    module = case.build()
    with pytest.raises(case.error, match=pattern(*case.parts)):
        case.call(module)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"state {k}": v.clone() for k, v in module.state_dict().items()}
    grads = {f"grad {k}": p.grad.clone() for k, p in module.named_parameters()}
    return {**state, **grads}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_rejected_forward_leaves_module_unchanged(case: Bad):
    module = case.build()
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    before = snapshot(module)
    with pytest.raises(case.error):
        case.call(module)
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert module.training


# --------------------------------------------------------------------------- positive controls


def twins(module: dict) -> tuple[lstmkit.LSTM, nn.LSTM]:
    ours = lstmkit.LSTM(IN, H, dtype=F64, **module)
    theirs = nn.LSTM(IN, H, dtype=F64, **module)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("config", CONFIGS)
def test_forward_accepts_correct_shapes_like_torch(config, with_state):
    """The shapes that every ``_hx_shape_cases`` case perturbs are accepted and agree with
    ``torch.nn.LSTM``."""
    module, x_shape = CONFIGS[config]
    ours, theirs = twins(module)
    x = randn(*x_shape)
    hx = tuple(randn(*s) for s in state_shapes(module, x_shape)) if with_state else None
    assert_same(ours(x, hx), theirs(x, hx))


def test_packed_input_like_torch():
    ours, theirs = twins({"bidirectional": True})
    x = packed(IN)
    (out, state), (ref, ref_state) = ours(x), theirs(x)
    assert_same(out.data, ref.data)
    assert torch.equal(out.batch_sizes, ref.batch_sizes)
    assert torch.equal(out.unsorted_indices, ref.unsorted_indices)
    assert_same(state, ref_state)


def test_lengths_forms_agree_and_match_packed_torch():
    ours, theirs = twins({"bidirectional": True, "batch_first": True})
    lengths = [3, T, 1]
    x = randn(len(lengths), T, IN)
    forms = {
        "list": lengths,
        "tuple": tuple(lengths),
        "int32": torch.tensor(lengths, dtype=torch.int32),
        "int64": torch.tensor(lengths),
    }
    results = {name: ours(x, lengths=form) for name, form in forms.items()}
    out, (h_n, c_n) = results["list"]
    for name, (o, (h, c)) in results.items():
        assert torch.equal(o, out) and torch.equal(h, h_n) and torch.equal(c, c_n), name
    ref, ref_state = theirs(
        pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    )
    ref, _ = pad_packed_sequence(ref, batch_first=True, total_length=T)
    assert_same(out, ref)
    assert_same((h_n, c_n), ref_state)


@pytest.mark.parametrize("x_shape", [(N, IN), (IN,)], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
def test_cell_accepts_correct_shapes_like_torch(x_shape, with_state):
    ours = lstmkit.LSTMCell(IN, H, dtype=F64)
    theirs = nn.LSTMCell(IN, H, dtype=F64)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = randn(*x_shape)
    hx = (randn(*x_shape[:-1], H), randn(*x_shape[:-1], H)) if with_state else None
    assert_same(ours(x, hx), theirs(x, hx))
