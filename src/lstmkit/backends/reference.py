"""The reference backend: a plain per-step loop on autograd, the oracle for every other one."""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells


def run(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: cells.LSTMWeights,
    batch_sizes: list[int] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one layer-direction forward over time.

    Args:
        x: ``(T, B, I)`` time-major input.
        h: ``(B, P)`` initial hidden state.
        c: ``(B, H)`` initial cell state.
        weights: the layer-direction's parameters.
        batch_sizes: ``T`` non-increasing counts of the sequences still running at each step,
            with the batch sorted by decreasing length (as in a ``PackedSequence``), or
            ``None`` when every sequence is ``T`` long. A finished sequence keeps its state
            and outputs zeros.

    Returns:
        ``(output, h_n, c_n)`` of shapes ``(T, B, P)``, ``(B, P)``, ``(B, H)``.
    """
    xp = cells.project_input(x, weights.w_ih, weights.b_ih, weights.b_hh)  # (T, B, 4H)
    batch = x.size(1)
    outputs = []
    # unbind, not xp[t]: indexing a tensor that requires grad makes backward O(T^2).
    for t, xp_t in enumerate(xp.unbind(0)):
        n = batch if batch_sizes is None else batch_sizes[t]
        h_t, c_t = cells.lstm_step(xp_t[:n], h[:n], c[:n], weights.w_hh, weights.w_hr)
        if n < batch:  # rows n: have finished: they keep their state and output zeros
            outputs.append(torch.cat([h_t, h_t.new_zeros(batch - n, h_t.size(1))]))
            h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
        else:
            outputs.append(h_t)
            h, c = h_t, c_t
    return torch.stack(outputs), h, c
