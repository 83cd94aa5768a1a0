"""Every check of user input, in one style.

Each check raises before anything is computed or changed, with a message that names the
argument, what was expected and what was received: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong value, shape or device.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def _holds_tensor(value: object) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, (tuple, list)) and any(_holds_tensor(v) for v in value)
    )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)) and _holds_tensor(value):
        # Shapes, not the tensors' values: a repr of the states would swamp the message.
        items = ", ".join(_describe(v) for v in value)
        return f"a {type(value).__name__} of {len(value)} ({items})"
    return f"{value!r} ({type(value).__name__})"


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {_describe(value)}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


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


def check_cell(value: object, cells: Mapping[str, object]) -> object:
    """A cell name from ``cells`` or an instance of :class:`lstmkit.cells.Cell`."""
    from lstmkit.cells import Cell

    if isinstance(value, Cell):
        return value
    expected = f"one of {', '.join(map(repr, cells))} or a lstmkit.cells.Cell instance"
    if not isinstance(value, str):
        raise TypeError(f"cell must be {expected}, got {_describe(value)}")
    if value not in cells:
        raise ValueError(f"cell must be {expected}, got {value!r}")
    return cells[value]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_proj_size(proj_size: object, hidden_size: int) -> int:
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(f"proj_size must be an int, got {_describe(proj_size)}")
    if not 0 <= proj_size < hidden_size:
        raise ValueError(
            f"proj_size must be in [0, hidden_size={hidden_size}) (0 disables the projection), "
            f"got {proj_size}"
        )
    return proj_size


def check_tensor_like(name: str, value: Tensor, reference: Tensor, reference_name: str) -> None:
    """``value`` must share ``reference``'s floating dtype and device."""
    if value.dtype != reference.dtype:
        raise TypeError(
            f"{name}.dtype must match {reference_name}.dtype={reference.dtype}, got {value.dtype}"
        )
    if value.device != reference.device:
        raise ValueError(
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
        raise ValueError(f"{name} must be {expected}, got {x.dim()}-D of shape {tuple(x.shape)}")
    if x.size(-1) != input_size:
        raise ValueError(f"{name}.size(-1) must be input_size={input_size}, got {x.size(-1)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    check_tensor_like(name, x, weight, "the parameters'")
    return x


def check_state(
    name: str, value: object, expected_shape: tuple[int, ...], x: Tensor, what: str
) -> Tensor:
    """One state tensor of exactly ``expected_shape``, like the input in dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {_describe(value)}")
    if tuple(value.shape) != expected_shape:
        raise ValueError(
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
        raise TypeError(f"{name} must be {expected}, got {_describe(hx)}")
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
