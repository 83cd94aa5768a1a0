"""The reference backend: a plain per-step loop on autograd, the oracle for every other one.
It runs any :class:`~lstmkit.cells.Cell` with any regulariser."""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import cells
from lstmkit import validation as check
from lstmkit.backends.contract import Masks


def supports(cell: cells.Cell, masks: Masks) -> bool:
    """Every cell, whatever its kind, with every regulariser."""
    return True


def refusal(cell: cells.Cell, x: Tensor, params: cells.Params) -> None:
    """Nothing about a layer's input or sizes stops this backend."""
    return None


def _zoneout(new: Tensor, old: Tensor, zone: Tensor | float | None, t: int) -> Tensor:
    """Keep ``old`` where the step-``t`` mask says so (training), or move by the expectation
    ``p * old + (1 - p) * new`` (evaluation)."""
    if zone is None:
        return new
    if isinstance(zone, Tensor):
        return torch.where(zone[t, : new.size(0)], old, new)
    return torch.lerp(new, old, zone)


def run(
    cell: cells.Cell,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    params: cells.Params,
    batch_sizes: list[int] | None,
    masks: Masks,
) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`lstmkit.backends.contract.Backend.run`: ``cell.project_input`` for all steps,
    then :func:`recur`."""
    return recur(cell, cell.project_input(x, params), h, c, params, batch_sizes, masks)


def recur(
    cell: cells.Cell,
    xp: Tensor,
    h: Tensor,
    c: Tensor,
    params: cells.Params,
    batch_sizes: list[int] | None,
    masks,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`run` given the input half of the gates, ``xp`` ``(T, B, GH)``
    (:meth:`lstmkit.cells.Cell.project_input`), instead of the input: ``cell.step`` at each
    step on autograd, each step's result checked (:func:`lstmkit.validation.check_step`: a
    custom cell's mistake is named at once)."""
    batch = xp.size(1)
    outputs = []
    # unbind, not xp[t]: indexing a tensor that requires grad makes backward O(T^2).
    for t, xp_t in enumerate(xp.unbind(0)):
        n = batch if batch_sizes is None else batch_sizes[t]
        h_in = h[:n] if masks.recurrent is None else h[:n] * masks.recurrent[:n]
        h_t, c_t = check.check_step(cell, cell.step(xp_t[:n], h_in, c[:n], params), h_in, c[:n])
        h_t = _zoneout(h_t, h[:n], masks.zoneout_h, t)
        c_t = _zoneout(c_t, c[:n], masks.zoneout_c, t)
        if n < batch:  # rows n: have finished: they keep their state and output zeros
            outputs.append(torch.cat([h_t, h_t.new_zeros(batch - n, h_t.size(1))]))
            h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
        else:
            outputs.append(h_t)
            h, c = h_t, c_t
    return torch.stack(outputs), h, c
