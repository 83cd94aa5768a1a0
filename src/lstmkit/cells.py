"""One time step of each cell, as plain functions of (parameters, inputs).

Shape legend: B = batch, I = input size, H = hidden (cell) size, P = output size
(``proj_size`` when a projection is used, else H), G = gate blocks (4 for an LSTM). Gate order
is (i, f, g, o), as in ``torch.nn.LSTM``: every ``(4H, ...)`` weight is four ``(H, ...)``
blocks stacked in that order.

A cell's step is split in two. The input half of the gates does not depend on the state, so
the runner computes it for all time steps at once (:meth:`Cell.project_input`) and hands each
step its row; :meth:`Cell.step` then adds the recurrent half and applies the gates.

Every cell owns the parameters of ``torch.nn.LSTM`` (``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``, ``weight_hr``; ``G`` blocks of rows instead of 4) and may declare more in
:attr:`Cell.extra`. Steps receive them in a dict keyed by those names, ``None`` where absent.
Write your own cell by subclassing :class:`Cell`: see ``docs/custom_cells.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

Params = Mapping[str, Tensor | None]
# extra parameters: name -> (shape from (H, P), initialisation: "uniform" | "ones" | "zeros")
Extra = Mapping[str, tuple[Callable[[int, int], tuple[int, ...]], str]]
LAYER_NORM_EPS = 1e-5
# the parameters of torch.nn.LSTM that every cell owns, by name without suffix
NN_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def project_input(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """``(..., I) -> (..., GH)``: ``x W_ih^T + b_ih + b_hh``, both biases folded into one
    vector (only their sum is ever used)."""
    bias = None if b_ih is None else b_ih + b_hh
    return linear(x, w_ih, bias)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype of the matrix products of float32 ``x`` inside ``torch.autocast`` on its
    device (bfloat16 on the CPU by default), or ``None`` when they run in ``x``'s dtype."""
    device = x.device.type  # "meta" and other devices without autocast: never enabled
    if x.dtype != torch.float32 or not torch.amp.is_autocast_available(device):
        return None
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def linear(x: Tensor, w: Tensor, add: Tensor | None = None) -> Tensor:
    """``x @ w.T + add``, ``add`` a bias ``(out,)`` or pre-activations ``(B, out)``.

    Inside ``torch.autocast`` the product alone runs in low precision (:func:`autocast_dtype`)
    and comes back in ``x``'s dtype before ``add``: gates and cell states stay float32.
    """
    if autocast_dtype(x) is None:
        return F.linear(x, w, add)
    y = F.linear(x, w).to(x.dtype)
    return y if add is None else y + add


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
    gates = linear(h, w_hh, xp)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return _output(torch.sigmoid(o) * torch.tanh(c), w_hr), c


def _output(h: Tensor, w_hr: Tensor | None) -> Tensor:
    """``h`` (``(B, H)``), projected to ``(B, P)`` when there is a projection."""
    return h if w_hr is None else linear(h, w_hr)


class Cell:
    """What a recurrent cell is: its gate count, its extra parameters and its step.

    Subclasses set :attr:`name`, :attr:`gates`, :attr:`forget_gate` and :attr:`extra`, and
    override :meth:`step` (and :meth:`project_input` when the input half is not a plain
    linear map). Everything else — stacking, bidirectional, lengths and PackedSequence,
    dropout between layers, the regularisers, the reference backend — comes from the LSTM
    module and the runner.

    :attr:`kind` names the equations a cell computes for the backends with their own kernels
    (:class:`lstmkit.backends.contract.Backend`): ``"lstm"``, ``"layernorm"``, ``"peephole"``
    and ``"cifg"`` on the built-in cells, ``None`` (the reference backend only) otherwise. It
    is NOT inherited: a subclass that does not set ``kind`` in its own class body has
    ``kind = None``, so that a subclass of :class:`LSTM` that overrides :meth:`step` never
    runs on kernels of the plain LSTM's equations. A subclass that keeps a built-in cell's
    exact equations (its step, input half, gates and parameters) may opt in to its kernels by
    setting that kind explicitly (``docs/custom_cells.md``).
    """

    name = "custom"
    gates = 4  # blocks of H rows in weight_ih / weight_hh / the biases
    forget_gate: int | None = 1  # block that forget_bias= adds to; None if there is none
    extra: ClassVar[Extra] = {}  # parameters beyond torch.nn.LSTM's
    kind: ClassVar[str | None] = None  # the fast-path kind; set per class, never inherited

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in vars(cls):  # a subclass's equations may differ from its parent's
            cls.kind = None

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        """``(T, B, I) -> (T, B, GH)``: the state-independent part of the gates, all steps."""
        return project_input(x, p["weight_ih"], p["bias_ih"], p["bias_hh"])

    def step(self, xp: Tensor, h: Tensor, c: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        """One step: ``xp`` ``(B, GH)``, ``h`` ``(B, P)``, ``c`` ``(B, H)`` -> ``(h, c)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return repr(self.name)


class LSTM(Cell):
    """The standard LSTM of ``torch.nn.LSTM``: :func:`lstm_step`."""

    name = "lstm"
    kind = "lstm"

    def step(self, xp, h, c, p):
        return lstm_step(xp, h, c, p["weight_hh"], p["weight_hr"])


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, LAYER_NORM_EPS)


class LayerNorm(Cell):
    r"""Layer-normalised LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", section 3.1).

    .. math::
        (i, f, g, o) &= LN(W_{ih} x_t; \gamma_{ih}, \beta_{ih})
                        + LN(W_{hh} h_{t-1}; \gamma_{hh}, \beta_{hh}) + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(LN(c_t; \gamma_c, \beta_c))

    ``LN(v; w, b) = w (v - mean(v)) / sqrt(var(v) + 1e-5) + b`` over the whole 4H (or H)
    vector of each example. Extra parameters: ``ln_ih_weight``, ``ln_ih_bias``,
    ``ln_hh_weight``, ``ln_hh_bias`` ``(4H)`` and ``ln_c_weight``, ``ln_c_bias`` ``(H)``;
    gains start at 1, biases at 0.
    """

    name = "layernorm"
    kind = "layernorm"
    extra: ClassVar[Extra] = {
        "ln_ih_weight": (lambda h, p: (4 * h,), "ones"),
        "ln_ih_bias": (lambda h, p: (4 * h,), "zeros"),
        "ln_hh_weight": (lambda h, p: (4 * h,), "ones"),
        "ln_hh_bias": (lambda h, p: (4 * h,), "zeros"),
        "ln_c_weight": (lambda h, p: (h,), "ones"),
        "ln_c_bias": (lambda h, p: (h,), "zeros"),
    }

    def project_input(self, x, p):
        xp = _layer_norm(linear(x, p["weight_ih"]), p["ln_ih_weight"], p["ln_ih_bias"])
        return xp if p["bias_ih"] is None else xp + (p["bias_ih"] + p["bias_hh"])

    def step(self, xp, h, c, p):
        recurrent = _layer_norm(linear(h, p["weight_hh"]), p["ln_hh_weight"], p["ln_hh_bias"])
        i, f, g, o = (xp + recurrent).chunk(4, dim=1)  # each (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_norm = _layer_norm(c, p["ln_c_weight"], p["ln_c_bias"])
        return _output(torch.sigmoid(o) * torch.tanh(c_norm), p["weight_hr"]), c


class Peephole(Cell):
    r"""LSTM with peephole connections (Gers & Schmidhuber 2000, "Recurrent nets that time
    and count"): the gates also see the cell state through diagonal weights.

    .. math::
        i_t &= \sigma(W_{ii} x_t + W_{hi} h_{t-1} + p_i \odot c_{t-1} + b_i) \\
        f_t &= \sigma(W_{if} x_t + W_{hf} h_{t-1} + p_f \odot c_{t-1} + b_f) \\
        g_t &= \tanh(W_{ig} x_t + W_{hg} h_{t-1} + b_g) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t &= \sigma(W_{io} x_t + W_{ho} h_{t-1} + p_o \odot c_t + b_o) \\
        h_t &= o_t \odot \tanh(c_t)

    Extra parameter: ``weight_ch`` ``(3H)``, the blocks ``(p_i, p_f, p_o)``, initialised like
    the other weights, U(-1/sqrt(H), 1/sqrt(H)).
    """

    name = "peephole"
    kind = "peephole"
    extra: ClassVar[Extra] = {"weight_ch": (lambda h, p: (3 * h,), "uniform")}

    def step(self, xp, h, c, p):
        i, f, g, o = linear(h, p["weight_hh"], xp).chunk(4, dim=1)  # each (B, H)
        p_i, p_f, p_o = p["weight_ch"].chunk(3)  # each (H,)
        c = torch.sigmoid(f + p_f * c) * c + torch.sigmoid(i + p_i * c) * torch.tanh(g)
        return _output(torch.sigmoid(o + p_o * c) * torch.tanh(c), p["weight_hr"]), c


class CIFG(Cell):
    r"""Coupled input-forget gate (Greff et al. 2017, "LSTM: A Search Space Odyssey"):
    the input gate is ``1 - f``, so there are three gate blocks, in the order (f, g, o).

    .. math::
        f_t &= \sigma(W_{if} x_t + W_{hf} h_{t-1} + b_f) \\
        c_t &= f_t \odot c_{t-1} + (1 - f_t) \odot \tanh(W_{ig} x_t + W_{hg} h_{t-1} + b_g) \\
        h_t &= \sigma(W_{io} x_t + W_{ho} h_{t-1} + b_o) \odot \tanh(c_t)
    """

    name = "cifg"
    kind = "cifg"
    gates = 3
    forget_gate = 0

    def step(self, xp, h, c, p):
        f, g, o = linear(h, p["weight_hh"], xp).chunk(3, dim=1)  # each (B, H)
        f = torch.sigmoid(f)
        c = torch.lerp(torch.tanh(g), c, f)  # f c + (1 - f) tanh(g)
        return _output(torch.sigmoid(o) * torch.tanh(c), p["weight_hr"]), c


CELLS: dict[str, Cell] = {cell.name: cell for cell in (LSTM(), LayerNorm(), Peephole(), CIFG())}
