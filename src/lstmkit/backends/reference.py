"""The reference backend: a plain per-step loop on autograd.

It works for any step function and is the oracle every faster backend is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Step = Callable[..., tuple[Tensor, Tensor]]


def run(
    step: Step,
    xp: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor | None],
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``step`` forward over time.

    Args:
        step: ``step(xp_t, h, c, *weights) -> (h, c)``, e.g. :func:`lstmkit.cells.lstm_step`.
        xp: ``(T, B, G)`` input half of the pre-activations for every step.
        h: ``(B, P)`` initial hidden state.
        c: ``(B, H)`` initial cell state.
        weights: the step's remaining arguments.
        mask: ``(T, B)`` bool, True where step ``t`` is inside sequence ``b``, or ``None``
            when every sequence is full length. Masked steps keep the state and output zeros.

    Returns:
        ``(output, h_T, c_T)`` of shapes ``(T, B, P)``, ``(B, P)``, ``(B, H)``.
    """
    outputs = []
    # unbind, not xp[t]: indexing a tensor that requires grad makes backward O(T^2).
    steps = xp.unbind(0)
    if mask is None:
        for xp_t in steps:
            h, c = step(xp_t, h, c, *weights)
            outputs.append(h)
    else:
        for xp_t, m in zip(steps, mask.unsqueeze(-1).unbind(0), strict=True):  # m: (B, 1)
            h_t, c_t = step(xp_t, h, c, *weights)
            h = torch.where(m, h_t, h)
            c = torch.where(m, c_t, c)
            outputs.append(h_t.masked_fill(~m, 0.0))
    return torch.stack(outputs), h, c
