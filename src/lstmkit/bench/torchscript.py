"""The layer-norm LSTM people write today without lstmkit: a TorchScript step in a
TorchScript loop over time (the pattern of PyTorch's own ``benchmarks/fastrnns``), computing
lstmkit's ``layernorm`` cell equations (``lstmkit.cells.LayerNorm``) so that its outputs can
be checked against lstmkit's before it is timed. A *peer* for ``lstmkit bench --cell
layernorm``, not part of the library; one layer, one direction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmkit.cells import LAYER_NORM_EPS


@torch.jit.script
def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, [x.size(-1)], weight, bias, eps)


@torch.jit.script
def _step(
    xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, ln: list[Tensor], eps: float
) -> tuple[Tensor, Tensor]:
    """One step: ``xp`` ``(B, 4H)`` is the normalised input half with every bias added."""
    gates = xp + _layer_norm(torch.mm(h, w_hh.t()), ln[2], ln[3], eps)
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(_layer_norm(c, ln[4], ln[5], eps))
    return h, c


@torch.jit.script
def _loop(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor,
    ln: list[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``(T, B, I)`` -> ``(output (T, B, H), h_n, c_n)``."""
    xp = _layer_norm(torch.matmul(x, w_ih.t()), ln[0], ln[1], eps) + bias  # all steps at once
    outputs: list[Tensor] = []
    for xp_t in xp.unbind(0):
        h, c = _step(xp_t, h, c, w_hh, ln, eps)
        outputs.append(h)
    return torch.stack(outputs), h, c


class ScriptedLayerNormLSTM(nn.Module):
    """One layer of lstmkit's layer-norm cell as TorchScript, with lstmkit's parameter names
    (``weight_ih_l0``, ..., ``ln_c_bias_l0``), so ``load_state_dict`` of a one-layer
    ``lstmkit.LSTM(..., cell="layernorm")`` works with ``strict=True``. ``forward(input)``
    takes ``(L, N, I)`` (``(N, L, I)`` with ``batch_first``) and returns
    ``output, (h_n, c_n)`` with ``h_n``, ``c_n`` of shape ``(1, N, H)``."""

    NORMS = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_c_weight", "ln_c_bias")

    def __init__(self, input_size: int, hidden_size: int, batch_first: bool = False) -> None:
        super().__init__()
        self.hidden_size, self.batch_first = hidden_size, batch_first
        gates = 4 * hidden_size
        shapes = {
            "weight_ih": (gates, input_size),
            "weight_hh": (gates, hidden_size),
            "bias_ih": (gates,),
            "bias_hh": (gates,),
            **{name: (gates if "_c_" not in name else hidden_size,) for name in self.NORMS},
        }
        bound = 1.0 / math.sqrt(hidden_size)  # every weight drawn; load_state_dict sets them
        for name, shape in shapes.items():
            weight = torch.empty(shape).uniform_(-bound, bound)
            self.register_parameter(f"{name}_l0", nn.Parameter(weight))

    def forward(self, input: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = input.transpose(0, 1) if self.batch_first else input
        h = c = x.new_zeros(x.size(1), self.hidden_size)
        bias = self.bias_ih_l0 + self.bias_hh_l0
        ln = [getattr(self, f"{name}_l0") for name in self.NORMS]
        output, h, c = _loop(
            x, h, c, self.weight_ih_l0, self.weight_hh_l0, bias, ln, LAYER_NORM_EPS
        )
        output = output.transpose(0, 1) if self.batch_first else output
        return output, (h.unsqueeze(0), c.unsqueeze(0))
