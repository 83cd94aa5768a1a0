"""Every check of user input, in one style.

Each check raises before anything is computed or changed, with a message that names the
argument, what was expected and what was received: a ``TypeError`` for a wrong type or dtype,
a ``ValueError`` for a wrong value, size, shape or device.

Code written for ``torch.nn.LSTM`` and ``nn.LSTMCell`` catches what they raise, which is often
another class for the same mistake: a ``RuntimeError`` for an input or ``hx`` of the wrong
size, a ``ValueError`` for an input of the wrong dtype. Where torch's class differs, the error
is an instance of it too: :class:`LSTMValueError` is a ``ValueError`` and a ``RuntimeError``,
:class:`LSTMTypeError` a ``TypeError``, a ``ValueError`` and a ``RuntimeError``. The arguments
shared with torch's modules are accepted where torch accepts them (``bidirectional=1``,
``num_layers=np.int64(2)``, ``proj_size=0.0``) and refused where it refuses them
(``bias=1``); lstmkit's own keyword options stay strict. ``tests/test_errors_like_torch.py``
runs the two side by side and pins the few differences.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lstmkit.cells import CELLS, NN_PARAMETERS, Cell


class LSTMValueError(ValueError, RuntimeError):
    """A wrong value, size, shape or device where ``torch.nn.LSTM`` raises a ``RuntimeError``
    for the same mistake (an input or ``hx`` of the wrong size, no time steps)."""


class LSTMTypeError(TypeError, ValueError, RuntimeError):
    """A wrong type or dtype where ``torch.nn.LSTM`` raises a ``ValueError`` or a
    ``RuntimeError`` for the same mistake (an input of another dtype than the parameters, an
    ``hx`` of three tensors, ``dropout="0.5"``)."""


def _holds_tensor(value: object) -> bool:
    if isinstance(value, Mapping):
        value = tuple(value.values())
    return isinstance(value, Tensor) or (
        isinstance(value, (tuple, list)) and any(_holds_tensor(v) for v in value)
    )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list, Mapping)) and _holds_tensor(value):
        # Shapes, not the tensors' values: a repr of the states would swamp the message.
        if isinstance(value, Mapping):
            items = ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items())
        else:
            items = ", ".join(_describe(v) for v in value)
        return f"a {type(value).__name__} of {len(value)} ({items})"
    return f"{value!r} ({type(value).__name__})"


def _as_index(value: object) -> int | None:
    """``value`` as an int where it has ``__index__`` (an int, a bool, a NumPy integer, a
    one-element integer tensor), else ``None``."""
    try:
        return int(operator.index(value))
    except (TypeError, RuntimeError):
        return None


def check_positive_int(name: str, value: object, *, any_index: bool = False) -> int:
    """A size of at least 1, as an int. Any ``int`` is one, ``True`` (1) included, as for
    ``torch.nn.LSTM``'s ``input_size``; with ``any_index`` so is anything with ``__index__``
    (a NumPy integer, a one-element integer tensor), as ``torch.empty`` takes and so
    ``nn.LSTM``'s ``num_layers`` and ``nn.LSTMCell``'s sizes."""
    size = _as_index(value) if any_index or isinstance(value, int) else None
    if size is None:
        raise LSTMTypeError(f"{name} must be an int, got {_describe(value)}")
    if size <= 0:
        raise LSTMValueError(f"{name} must be a positive int, got {value!r}")
    return size


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_truth(name: str, value: object) -> bool:
    """Any value with a truth value, as a bool: ``torch.nn.LSTM`` takes ``bidirectional=1``
    and ``torch.nn.LSTMCell`` takes ``bias=0``."""
    try:
        return bool(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise LSTMTypeError(f"{name} must be a bool, got {_describe(value)}") from error


def check_probability(name: str, value: object) -> float:
    """A probability in [0, 1] of any number type but bool and complex (a ``Decimal`` or a
    ``Fraction`` too), as ``torch.nn.LSTM``'s ``dropout``."""
    number = None
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        with contextlib.suppress(TypeError):  # a complex number
            number = float(value)
    if number is None:
        raise LSTMTypeError(f"{name} must be a float in [0, 1], got {_describe(value)}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return number


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_pair(name: str, value: object) -> tuple[object, object]:
    """One value for two things, or a pair ``(a, b)`` of them."""
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(
                f"{name} must be a float or a pair (for h, for c), got {len(value)} values"
            )
        return value[0], value[1]
    return value, value


def check_rate(name: str, value: object) -> float:
    """A drop or keep probability in [0, 1): 1 would drop everything."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {_describe(value)}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


INIT_KINDS = ("uniform", "ones", "zeros")  # how a cell's extra parameter starts


def _cell_label(cell: object) -> str:
    return f"cell {cell.name!r} ({type(cell).__name__})"


def _check_index(label: str, name: str, value: object, stop: int | None = None) -> None:
    """``value`` is an int (not a bool) of at least 1, or in ``[0, stop)`` if ``stop`` is given."""
    expected = "a positive int" if stop is None else f"None or an int in [0, gates={stop})"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label}: {name} must be {expected}, got {_describe(value)}")
    if not (value >= 1 if stop is None else 0 <= value < stop):
        raise ValueError(f"{label}: {name} must be {expected}, got {value}")


def _check_cell_contract(cell: Cell) -> None:
    """What ``docs/custom_cells.md`` asks of a cell, checked where the model is built."""
    label = _cell_label(cell)
    if not isinstance(cell.name, str):
        raise TypeError(f"{label}: name must be a str, got {_describe(cell.name)}")
    if type(cell).step is Cell.step:
        raise TypeError(f"{label} must override step(xp, h, c, p), which returns (h, c)")
    _check_index(label, "gates", cell.gates)
    if cell.forget_gate is not None:
        _check_index(label, "forget_gate", cell.forget_gate, cell.gates)
    if not isinstance(cell.extra, Mapping):
        raise TypeError(f"{label}: extra must be a dict, got {_describe(cell.extra)}")
    for key, entry in cell.extra.items():
        if not isinstance(key, str) or not key or "." in key or key in NN_PARAMETERS:
            raise ValueError(
                f"{label}: extra's names must be non-empty strs without '.', other than "
                f"{', '.join(NN_PARAMETERS)}; got {key!r}"
            )
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[0])):
            raise TypeError(
                f"{label}: extra[{key!r}] must be a pair (shape function of (hidden_size, "
                f"out_size), init), got {_describe(entry)}"
            )
        check_choice(f"{label}: extra[{key!r}]'s init", entry[1], INIT_KINDS)
    if cell.kind is not None:
        _check_kind(label, cell)


def _check_kind(label: str, cell: Cell) -> None:
    """A cell that declares a built-in cell's kind has that cell's gate blocks and extra
    parameters, in its order: the kernels of the kind read them."""
    builtins = {builtin.kind: builtin for builtin in CELLS.values()}
    expected = f"None or one of {', '.join(map(repr, builtins))}"
    if not isinstance(cell.kind, str):
        raise TypeError(f"{label}: kind must be {expected}, got {_describe(cell.kind)}")
    if cell.kind not in builtins:
        raise ValueError(f"{label}: kind must be {expected}, got {cell.kind!r}")
    twin = builtins[cell.kind]
    if cell.gates != twin.gates or tuple(cell.extra) != tuple(twin.extra):
        raise ValueError(
            f"{label}: kind={cell.kind!r} needs the gates and extra parameters of "
            f"cell={twin.name!r}: gates={twin.gates}, extra={list(twin.extra)}; got "
            f"gates={cell.gates}, extra={list(cell.extra)}"
        )


def check_cell(value: object, cells: Mapping[str, object]) -> object:
    """A cell name from ``cells`` or an instance of :class:`lstmkit.cells.Cell` that keeps
    the contract of ``docs/custom_cells.md`` as far as it can be known before a step runs."""
    if isinstance(value, Cell):
        _check_cell_contract(value)
        return value
    expected = f"one of {', '.join(map(repr, cells))} or a lstmkit.cells.Cell instance"
    if isinstance(value, type) and issubclass(value, Cell):
        name = value.__name__
        raise TypeError(f"cell must be {expected}, got the class {name}: pass cell={name}()")
    if not isinstance(value, str):
        raise TypeError(f"cell must be {expected}, got {_describe(value)}")
    if value not in cells:
        raise ValueError(f"cell must be {expected}, got {value!r}")
    return cells[value]


def check_extra_shape(cell, key: str, hidden_size: int, out_size: int) -> tuple[int, ...]:
    """The shape of ``cell``'s extra parameter ``key`` at these sizes: a tuple of positive
    ints."""
    shape = cell.extra[key][0](hidden_size, out_size)
    where = f"{_cell_label(cell)}: extra[{key!r}]'s shape function"
    sizes = f"(hidden_size={hidden_size}, out_size={out_size})"
    if not isinstance(shape, tuple) or any(
        isinstance(d, bool) or not isinstance(d, int) for d in shape
    ):
        raise TypeError(f"{where} must return a tuple of ints, got {_describe(shape)} for {sizes}")
    if not all(d > 0 for d in shape):
        raise ValueError(f"{where} must return positive sizes, got {shape} for {sizes}")
    return shape


def check_step(cell, result: object, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """What ``cell.step(xp, h, c, p)`` returned: a pair ``(h_t, c_t)`` of tensors of ``h``'s
    and ``c``'s shapes. Cheap enough for every step."""
    if not (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and isinstance(result[0], Tensor)
        and isinstance(result[1], Tensor)
    ):
        raise TypeError(
            f"{_cell_label(cell)}: step() must return a pair (h, c) of Tensors, "
            f"got {_describe(result)}"
        )
    h_t, c_t = result
    if h_t.shape != h.shape or c_t.shape != c.shape:
        raise LSTMValueError(
            f"{_cell_label(cell)}: step() must return h of shape {tuple(h.shape)} (n, P) and c "
            f"of shape {tuple(c.shape)} (n, H), got {tuple(h_t.shape)} and {tuple(c_t.shape)}"
        )
    return h_t, c_t


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_proj_size(proj_size: object, hidden_size: int) -> int:
    """0, which disables the projection (``False`` and ``0.0`` too, as ``torch.nn.LSTM`` takes
    them), or a size in ``[1, hidden_size)`` with ``__index__`` but not ``True`` (which
    ``torch.empty`` refuses)."""
    if isinstance(proj_size, numbers.Real) and proj_size == 0 and proj_size is not True:
        return 0
    size = None if isinstance(proj_size, bool) else _as_index(proj_size)
    if size is None:
        raise LSTMTypeError(f"proj_size must be an int, got {_describe(proj_size)}")
    if not 0 <= size < hidden_size:
        raise ValueError(
            f"proj_size must be in [0, hidden_size={hidden_size}) (0 disables the projection), "
            f"got {proj_size!r}"
        )
    return size


def check_factory(device: object, dtype: object) -> None:
    """A ``device`` and a ``dtype`` that parameters can be made with: what ``torch.empty``
    takes, the dtype floating-point (``torch.nn.LSTM`` also runs complex ones; lstmkit does
    not)."""
    if device is not None and not isinstance(device, torch.device):
        expected = "a torch.device, a device string such as 'cpu' or 'cuda:0', or an index"
        try:
            torch.device(device)
        except RuntimeError as error:
            raise LSTMValueError(f"device must be {expected}, got {device!r}") from error
        except TypeError as error:
            raise TypeError(f"device must be {expected}, got {_describe(device)}") from error
    if dtype is not None:
        try:
            probe = torch.empty(0, dtype=dtype, device="meta")
        except TypeError as error:
            raise TypeError(f"dtype must be a torch.dtype, got {_describe(dtype)}") from error
        if not probe.is_floating_point():
            raise LSTMTypeError(f"dtype must be a floating-point torch.dtype, got {probe.dtype}")


def check_tensor_like(name: str, value: Tensor, reference: Tensor, reference_name: str) -> None:
    """``value`` must share ``reference``'s floating dtype and device."""
    if value.dtype != reference.dtype:
        raise LSTMTypeError(
            f"{name}.dtype must match {reference_name}.dtype={reference.dtype}, got {value.dtype}"
        )
    # is_cpu first: each .device builds a torch.device (~0.5 us), twice a check, per step
    if not (value.is_cpu and reference.is_cpu) and value.device != reference.device:
        raise LSTMValueError(
            f"{name}.device must match {reference_name}.device={reference.device}, "
            f"got {value.device}"
        )


def check_input(
    name: str, x: object, ranks: tuple[int, ...], input_size: int, weight: Tensor
) -> Tensor:
    """An input tensor of one of ``ranks`` whose last dimension is ``input_size``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {_describe(x)}")
    if x.dim() not in ranks:
        expected = " or ".join(f"{r}-D" for r in ranks)
        raise LSTMValueError(
            f"{name} must be {expected}, got {x.dim()}-D of shape {tuple(x.shape)}"
        )
    if x.size(-1) != input_size:
        raise LSTMValueError(f"{name}.size(-1) must be input_size={input_size}, got {x.size(-1)}")
    if not x.is_floating_point():
        raise LSTMTypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_tensor_like(name, x, weight, "the parameters'")
    return x


def check_state(
    name: str, value: object, expected_shape: tuple[int, ...], x: Tensor, what: str
) -> Tensor:
    """One state tensor of exactly ``expected_shape``, like the input in dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {_describe(value)}")
    if tuple(value.shape) != expected_shape:
        raise LSTMValueError(
            f"{name} must have shape {expected_shape} {what}, got {tuple(value.shape)}"
        )
    check_tensor_like(name, value, x, "input")
    return value


StateNames = tuple[str, str, str, str]  # the pair, what it must be, its h, its c
HX_NAMES: StateNames = ("hx", "a tuple (h_0, c_0) of two Tensors", "hx[0] (h_0)", "hx[1] (c_0)")
STATE_NAMES: StateNames = (
    "state",
    "an LSTMState or a tuple (h, c) of two Tensors",
    "state.h",
    "state.c",
)


def check_hx(
    hx: object,
    h_shape: tuple[int, ...],
    c_shape: tuple[int, ...],
    x: Tensor,
    what: str,
    names: StateNames = HX_NAMES,
) -> tuple[Tensor, Tensor]:
    """``hx`` must be a pair ``(h_0, c_0)`` of the given shapes; ``names`` say how messages
    call the pair, what it must be, and its two members."""
    name, expected, h_name, c_name = names
    if isinstance(hx, Tensor) or not isinstance(hx, Sequence) or len(hx) != 2:
        raise LSTMTypeError(f"{name} must be {expected}, got {_describe(hx)}")
    h, c = hx
    return (
        check_state(h_name, h, h_shape, x, what),
        check_state(c_name, c, c_shape, x, what),
    )


def check_lengths(lengths: object, batch: int, steps: int, device: torch.device) -> Tensor:
    """Per-sequence lengths: ``batch`` ints in ``[1, steps]``; returned as int64 on ``device``."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        values = lengths.detach().to("cpu", torch.int64)
    elif isinstance(lengths, Sequence) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in lengths
    ):
        values = torch.tensor(list(lengths), dtype=torch.int64)
    else:
        raise TypeError(
            f"lengths must be a 1-D integer Tensor or a sequence of ints, got {_describe(lengths)}"
        )
    if values.dim() != 1 or values.numel() != batch:
        raise ValueError(
            f"lengths must have one entry per sequence (shape ({batch},)), "
            f"got shape {tuple(values.shape)}"
        )
    if batch and not (values.min() >= 1 and values.max() <= steps):
        raise ValueError(
            f"lengths must lie in [1, {steps}] (the sequence length), "
            f"got min {int(values.min())} and max {int(values.max())}"
        )
    return values.to(device)
