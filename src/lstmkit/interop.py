"""Conversion between :class:`lstmkit.LSTM` and ``torch.nn.LSTM``.

Both hold the same parameters under the same names, so a conversion is a module of the same
sizes and options with the weights copied in (``load_state_dict(strict=True)``). This is the
one place in the library that builds a ``torch.nn.LSTM``: to hand a model to code (or a
deployment path) that wants PyTorch's own module; the way back is :meth:`LSTM.from_torch`.
"""

from __future__ import annotations

import torch
from torch import nn

from lstmkit.modules import LSTM, SHARED_OPTIONS


def to_torch(model: LSTM) -> nn.LSTM:
    """A ``torch.nn.LSTM`` that computes what ``model`` computes: the same sizes, options,
    device, dtype and training mode, and a copy of its weights. Building it does not move the
    caller's random stream (its own initialisation draws on a forked generator).

    Raises:
        TypeError: ``model`` is not an :class:`lstmkit.LSTM`.
        ValueError: ``model`` uses what ``torch.nn.LSTM`` does not have: a cell whose
            :attr:`~lstmkit.cells.Cell.kind` is not ``"lstm"`` (a subclass has none unless it
            sets one), or ``recurrent_dropout``, ``weight_drop`` or ``zoneout``.
    """
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be an lstmkit.LSTM, got {type(model).__name__}")
    if model.cell.kind != "lstm":
        raise ValueError(
            "torch.nn.LSTM has only the standard cell (kind 'lstm'); model has "
            f"cell={model.cell.name!r} ({type(model.cell).__qualname__}) of kind "
            f"{model.cell.kind!r}"
        )
    active = {name: p for name, p in vars(model.regularizers).items() if p}
    if active:
        raise ValueError(
            "torch.nn.LSTM has no recurrent_dropout, weight_drop or zoneout; model has "
            + ", ".join(f"{name}={p}" for name, p in active.items())
        )
    weight = model.weight_ih_l0
    with torch.random.fork_rng(devices=[]):
        twin = nn.LSTM(
            model.input_size,
            model.hidden_size,
            **{name: getattr(model, name) for name in SHARED_OPTIONS},
            device=weight.device,
            dtype=weight.dtype,
        )
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)
