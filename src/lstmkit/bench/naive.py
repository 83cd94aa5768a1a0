"""A deliberately naive LSTM: the per-step autograd loop a user would write by hand.

It is a *baseline*, not part of the library: nothing is hoisted out of the time loop (each
step multiplies its own ``x_t`` by ``W_ih`` and adds both biases), ``x_t`` is taken by
indexing, and layers and directions are composed in the plainest way. It is checked against
``torch.nn.LSTM`` in the tests, so its timings measure a correct model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class NaiveLSTM(nn.Module):
    """An LSTM with ``torch.nn.LSTM``'s parameter names, shapes and gate order (i, f, g, o).

    Supports only what the benchmark needs: biases always present, no dropout, no projection,
    no packed input and no initial state (it starts from zeros). ``load_state_dict`` of a
    ``torch.nn.LSTM`` (or ``lstmkit.LSTM``) with the same sizes works with ``strict=True``.

    ``forward(input)`` takes ``(L, N, I)`` (``(N, L, I)`` with ``batch_first``) and returns
    ``output, (h_n, c_n)`` shaped as ``torch.nn.LSTM``'s.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.directions
            for direction in range(self.directions):
                suffix = self._suffix(layer, direction)
                shapes = {
                    "weight_ih": (4 * hidden_size, layer_input),
                    "weight_hh": (4 * hidden_size, hidden_size),
                    "bias_ih": (4 * hidden_size,),
                    "bias_hh": (4 * hidden_size,),
                }
                for kind, shape in shapes.items():
                    self.register_parameter(kind + suffix, nn.Parameter(torch.empty(shape)))
        bound = 1.0 / math.sqrt(hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def forward(self, input: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = input.transpose(0, 1) if self.batch_first else input  # (L, N, features)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                output, h, c = self._run_direction(x, self._suffix(layer, direction), direction)
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=2)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, (torch.stack(h_n), torch.stack(c_n))

    def _run_direction(self, x: Tensor, suffix: str, direction: int) -> tuple[Tensor, ...]:
        """One layer-direction over ``x`` ``(L, N, features)``: ``(output, h_n, c_n)``."""
        w_ih = getattr(self, "weight_ih" + suffix)
        w_hh = getattr(self, "weight_hh" + suffix)
        b_ih = getattr(self, "bias_ih" + suffix)
        b_hh = getattr(self, "bias_hh" + suffix)
        steps = x.size(0)
        h = x.new_zeros(x.size(1), self.hidden_size)
        c = x.new_zeros(x.size(1), self.hidden_size)
        outputs = []
        order = range(steps) if direction == 0 else reversed(range(steps))
        for t in order:
            gates = x[t] @ w_ih.T + h @ w_hh.T + b_ih + b_hh
            i, f, g, o = gates.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        if direction == 1:
            outputs.reverse()  # back into time order
        return torch.stack(outputs), h, c
