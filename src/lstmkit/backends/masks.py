"""What a backend receives besides the cell, the input and the parameters: the in-layer
regularisers' settings and the masks the runner draws from them (:func:`lstmkit.runner.draw_masks`).
They sit at the bottom of ``backends/`` so that every backend can name them; the runner
re-exports them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
    """What a backend applies inside its loop, drawn by :func:`draw_masks`.

    ``recurrent``: ``(B, P)``, multiplies ``h_{t-1}`` before the recurrent product (already
    scaled by ``1 / (1 - p)``). ``zoneout_h`` / ``zoneout_c``: in training a bool
    ``(T, B, P)`` / ``(T, B, H)`` tensor, True where a unit keeps its previous value; in
    evaluation the probability ``p`` itself. ``None`` where a regulariser is off.
    """

    recurrent: Tensor | None = None
    zoneout_h: Tensor | float | None = None
    zoneout_c: Tensor | float | None = None

    def active(self) -> bool:
        return any(m is not None for m in (self.recurrent, self.zoneout_h, self.zoneout_c))


NO_MASKS = Masks()
NO_REGULARIZERS = Regularizers()
