"""The recurrent state that :meth:`lstmkit.LSTM.step` carries from one time step to the next."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LSTMState(NamedTuple):
    """``(h, c)`` of a stack of layers, laid out as ``torch.nn.LSTM``'s ``(h_n, c_n)``.

    - ``h``: ``(num_layers, B, P)`` (``(num_layers, P)`` for unbatched input), P = ``proj_size``
      or ``hidden_size``.
    - ``c``: ``(num_layers, B, H)`` (``(num_layers, H)`` unbatched).

    Being a tuple, it can be passed as ``hx`` to ``torch.nn.LSTM`` or :class:`lstmkit.LSTM`, and
    a plain ``(h, c)`` tuple from either is accepted wherever an ``LSTMState`` is.
    """

    h: Tensor
    c: Tensor

    def detach(self) -> LSTMState:
        """The same values cut from the autograd graph, for truncated back-propagation through
        time: gradients of later steps stop here."""
        return LSTMState(self.h.detach(), self.c.detach())


def detach_state(state: tuple[Tensor, Tensor] | None) -> LSTMState | None:
    """``state`` (an :class:`LSTMState` or a plain ``(h, c)`` tuple) detached from the graph;
    ``None`` stays ``None``."""
    if state is None:
        return None
    h, c = state
    return LSTMState(h.detach(), c.detach())
