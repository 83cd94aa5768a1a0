"""What the backends with a hand-written backward share: weights cached and packed per
parameter version, per-step views of the running rows, whether a backward will run, and the
refusal of double backward."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from lstmkit.backends import matmul


def packed_weight(
    params: tuple[Tensor, ...],
    key: Hashable,
    make: Callable[[], Tensor],
    rows: int,
    bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> matmul.Weight:
    """``make()``, a matrix computed from ``params``, cached (:func:`matmul.cached`) and
    packed for oneDNN where products with ``rows`` rows go there; cast to ``dtype`` for
    low-precision products (:func:`lstmkit.cells.autocast_dtype`) when given."""
    key = (key, dtype)
    w = matmul.cached(params, key, lambda: cast(make(), dtype))
    packed = None
    if matmul.uses_onednn(rows, w):
        packed = matmul.cached(params, (key, rows), lambda: matmul.pack(w, rows))
    return matmul.Weight(w, rows, bias, packed)


def cast(w: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``w`` in ``dtype`` for low-precision products, or as it is for ``None``."""
    return w if dtype is None else w.to(dtype)


def step_weight(
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    rows: int,
    layout: Callable[[Tensor], Tensor],
    dtype: torch.dtype | None = None,
) -> matmul.Weight:
    """``[x, h] -> [x, h] @ [W_ih, W_hh].T + b_ih + b_hh`` with the gate rows of the weight and
    bias rearranged by ``layout`` (by default the forward's, :func:`_doubled_cell_gate`), the
    product in ``dtype`` when given (the bias stays in its own)."""
    key = ("step", layout)
    bias = None
    if b_ih is not None:
        bias = matmul.cached((b_ih, b_hh), key, lambda: layout(b_ih + b_hh))
    return packed_weight(
        (w_ih, w_hh), key, lambda: layout(torch.cat([w_ih, w_hh], 1)), rows, bias, dtype
    )


def head(rows: Tensor, n: int) -> Tensor:
    """The first ``n`` rows: the sequences still running at a step."""
    return rows if n == rows.size(0) else rows[:n]


def running_rows(buffers: Sequence[Tensor], slots: Sequence[int], sizes: list[int]) -> list[Tensor]:
    """For each step ``t``, the running rows of ``buffers[slots[t]]``."""
    return [head(buffers[k], n) for k, n in zip(slots, sizes, strict=True)]


def last_step(batch_sizes: list[int] | None, steps: int, batch: int, device) -> Tensor:
    """``(B,)`` index of each sequence's last step."""
    if batch_sizes is None:
        return torch.full((batch,), steps - 1, device=device)
    running = torch.tensor(batch_sizes).unsqueeze(0) > torch.arange(batch).unsqueeze(1)  # (B, T)
    return (running.sum(1) - 1).to(device)


def needs_backward(tensors: Sequence[Tensor | None]) -> bool:
    """Whether autograd will differentiate a function of ``tensors``: the forward must then
    keep what its backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_double_backward(backend: str = "fused") -> None:
    """Called first in a hand-written backward, which autograd cannot differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {backend} backend's backward is not itself differentiable (create_graph=True, "
            "double backward); use LSTM(..., backend='reference') for higher-order gradients"
        )
