"""The one contract between the runner and every backend: what a backend is asked
(:class:`Backend`) and what it receives besides the cell, the input and the parameters (the
in-layer regularisers' settings, :class:`Regularizers`, and the masks the runner draws from
them, :class:`Masks`, by :func:`lstmkit.runner.draw_masks`).

It sits at the bottom of ``backends/`` so that every backend can name it; the runner
re-exports :class:`Masks`, :class:`Regularizers`, :data:`NO_MASKS` and
:data:`NO_REGULARIZERS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from lstmkit import cells


@dataclass(frozen=True)
class Regularizers:
    """Probabilities of the regularisers inside a layer; 0 turns one off.

    - ``recurrent_dropout``: variational dropout (Gal & Ghahramani 2016) of the recurrent
      input ``h_{t-1}``: one mask per sequence and unit, the same at every step.
    - ``weight_drop``: DropConnect on ``W_hh`` (Wan et al. 2013; Merity et al. 2018), one mask
      per forward pass, applied to a copy, never to the parameter.
    - ``zoneout_h``, ``zoneout_c``: zoneout (Krueger et al. 2017): each unit keeps its previous
      value with this probability at each step; in evaluation every unit moves by the
      expectation, ``p * previous + (1 - p) * new``.

    Dropout-style options are active in training only.
    """

    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0


@dataclass(frozen=True)
class Masks:
    """What a backend applies inside its loop, drawn by :func:`lstmkit.runner.draw_masks`.

    ``recurrent``: ``(B, P)``, multiplies ``h_{t-1}`` before the recurrent product (already
    scaled by ``1 / (1 - p)``). ``zoneout_h`` / ``zoneout_c``: in training a bool
    ``(T, B, P)`` / ``(T, B, H)`` tensor, True where a unit keeps its previous value; in
    evaluation the probability ``p`` itself. ``None`` where a regulariser is off. (Weight drop
    has no mask here: the runner passes the backend an already dropped ``weight_hh``.)
    """

    recurrent: Tensor | None = None
    zoneout_h: Tensor | float | None = None
    zoneout_c: Tensor | float | None = None

    def active(self) -> bool:
        return any(m is not None for m in (self.recurrent, self.zoneout_h, self.zoneout_c))


NO_MASKS = Masks()
NO_REGULARIZERS = Regularizers()


class Backend(Protocol):
    """How one layer-direction's recurrence is executed. Each backend is a module with these
    three functions (a module satisfies the protocol structurally); the runner asks every
    backend the same questions, in this order, and is the only place that chooses one.

    A backend recognises the cells it runs by their :attr:`lstmkit.cells.Cell.kind`, never by
    their type: a backend with kernels for some kinds declares them (``KINDS``) and runs a cell
    whose ``kind`` is one of them. A subclass of a built-in cell has no kind unless it sets one
    itself, so a changed ``step`` never runs on kernels written for other equations.

    Shape legend: T = time steps, B = batch, I = input size, H = hidden (cell) size,
    P = output size (``proj_size`` when a projection is used, else H).
    """

    def supports(self, cell: cells.Cell, masks: Masks) -> bool:
        """Whether this backend runs ``cell`` with the regularisers that ``masks`` has
        (active or not: :meth:`Masks.active`), whatever the layer's input and sizes."""
        ...

    def refusal(self, cell: cells.Cell, x: Tensor, params: cells.Params) -> str | None:
        """Why this backend cannot run a layer of ``cell`` it :meth:`supports`, on ``x``
        (``(T, B, I)``) with ``params``, now: the device, dtype or sizes, an autograd mode or
        a tracer around the call; or ``None`` when it can. The reason completes the sentence
        "backend=... cannot run this layer: <reason>"."""
        ...

    def run(
        self,
        cell: cells.Cell,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        params: cells.Params,
        batch_sizes: list[int] | None,
        masks: Masks,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run one layer-direction forward over time, differentiably.

        Args:
            cell: the step.
            x: ``(T, B, I)`` time-major input.
            h: ``(B, P)`` initial hidden state.
            c: ``(B, H)`` initial cell state.
            params: the layer-direction's parameters, by name without suffix (see
                :mod:`lstmkit.cells`), ``None`` where absent; ``weight_hh`` already dropped
                (weight drop) in training.
            batch_sizes: ``T`` non-increasing counts of the sequences still running at each
                step, with the batch sorted by decreasing length (as in a ``PackedSequence``),
                or ``None`` when every sequence is ``T`` long. A finished sequence keeps its
                state and outputs zeros.
            masks: the regularisers' masks (:class:`Masks`).

        Returns:
            ``(output, h_n, c_n)`` of shapes ``(T, B, P)``, ``(B, P)``, ``(B, H)``: every
            step's ``h_t``, and each sequence's state after its last step.
        """
        ...
