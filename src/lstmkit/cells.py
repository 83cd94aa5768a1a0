"""One time step of an LSTM, as plain functions of tensors.

Shape legend: B = batch, I = input size, H = hidden (cell) size, P = output size
(``proj_size`` when a projection is used, else H). Gate order is (i, f, g, o), as in
``torch.nn.LSTM``: every ``(4H, ...)`` weight is four ``(H, ...)`` blocks stacked in that order.

The input half of the gates, ``W_ih x_t + b_ih + b_hh``, does not depend on the state, so
callers compute it for all time steps at once (:func:`project_input`) and hand each step its
row. One step then only adds the recurrent half and applies the gates (:func:`lstm_step`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LSTMWeights(NamedTuple):
    """The parameters of one layer-direction, named as in ``torch.nn.LSTM``."""

    w_ih: Tensor  # (4H, I)
    w_hh: Tensor  # (4H, P)
    b_ih: Tensor | None  # (4H,), None without bias
    b_hh: Tensor | None  # (4H,), None without bias
    w_hr: Tensor | None  # (P, H), None without projection


def project_input(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """The state-independent part of the gate pre-activations.

    ``x`` is ``(..., I)``; returns ``(..., 4H) = x W_ih^T + b_ih + b_hh``. Both biases are
    folded into one vector: the LSTM only ever uses their sum.
    """
    bias = None if b_ih is None else b_ih + b_hh
    return F.linear(x, w_ih, bias)


def lstm_step(
    xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, w_hr: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""One LSTM step (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).

    .. math::
        i_t &= \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t &= \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t &= \tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t &= \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \tanh(c_t) \qquad \text{or, with a projection (LSTMP),} \qquad
        h_t = W_{hr} (o_t \odot \tanh(c_t))

    Args:
        xp: ``(B, 4H)`` input half of the pre-activations, from :func:`project_input`.
        h: ``(B, P)`` previous hidden state.
        c: ``(B, H)`` previous cell state.
        w_hh: ``(4H, P)`` recurrent weights.
        w_hr: ``(P, H)`` projection weights, or ``None`` for no projection.

    Returns:
        ``(h_t, c_t)`` of shapes ``(B, P)`` and ``(B, H)``.
    """
    gates = torch.addmm(xp, h, w_hh.t())  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    if w_hr is not None:
        h = h @ w_hr.t()  # (B, P)
    return h, c
