"""The recurrence over time for one layer and one direction.

The runner owns everything about *time*: the input projection hoisted out of the loop,
per-sequence lengths, running a direction in reverse, and choosing the backend that executes
the loop. It knows no gate equation; those live in :mod:`lstmkit.cells`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit.backends import fused, reference

BACKENDS = {"reference": reference.run, "fused": fused.run}
BACKEND_NAMES = ("auto", *BACKENDS)


def choose_backend(name: str) -> str:
    """The backend that runs a layer: ``name`` itself, or for ``"auto"`` the fastest one
    that supports the configuration."""
    return "fused" if name == "auto" else name


def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse ``x`` (``(T, B, ...)``) along time, each sequence within its own length.

    Sequence ``b`` of length ``L_b`` has its steps ``0 .. L_b - 1`` reversed; its padding
    steps stay where they are. Applying the function twice gives ``x`` back.
    """
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.size(0), device=x.device).unsqueeze(1)  # (T, 1)
    lengths = lengths.unsqueeze(0)  # (1, B)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


def run_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: cells.LSTMWeights,
    *,
    reverse: bool = False,
    lengths: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer in one direction over a whole (padded) batch of sequences.

    Args:
        x: ``(T, B, I)`` time-major input.
        h0, c0: ``(B, P)`` and ``(B, H)`` initial state.
        weights: the layer-direction's parameters.
        reverse: run from each sequence's last valid step to its first.
        lengths: ``(B,)`` int64 valid length of each sequence, or ``None`` when all are
            ``T`` long. Steps past a length neither change that sequence's state nor produce
            output (their output is zero).
        backend: one of :data:`BACKEND_NAMES`.

    Returns:
        ``(output, h_n, c_n)``: ``(T, B, P)``, and each sequence's state after its last
        valid step, ``(B, P)`` and ``(B, H)``.
    """
    steps = x.size(0)
    order = batch_sizes = None
    if lengths is not None and not bool((lengths == steps).all()):
        # Sort by decreasing length, so that the sequences still running at step t are the
        # first batch_sizes[t] rows: backends then work on row prefixes instead of masks.
        lengths, order = lengths.sort(descending=True, stable=True)
        x, h0, c0 = x.index_select(1, order), h0.index_select(0, order), c0.index_select(0, order)
        running = torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths  # (T, B)
        batch_sizes = running.sum(1).tolist()
    else:
        lengths = None
    if reverse:
        x = reverse_within_lengths(x, lengths)
    output, h_n, c_n = BACKENDS[choose_backend(backend)](x, h0, c0, weights, batch_sizes)
    if reverse:
        output = reverse_within_lengths(output, lengths)
    if order is not None:
        restore = order.argsort()
        output = output.index_select(1, restore)
        h_n, c_n = h_n.index_select(0, restore), c_n.index_select(0, restore)
    return output, h_n, c_n
