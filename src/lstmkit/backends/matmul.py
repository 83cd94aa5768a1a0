"""Matrix products for the fused backend: oneDNN's prepacked GEMM on the CPU where it wins,
``torch.mm`` everywhere else.

On the AVX-512 CPUs this project runs on, oneDNN's linear (``torch.ops.mkldnn``) reaches
2-2.5x the FLOP rate of ``torch.mm`` for float32 once its weight is reordered ("packed") into
its blocked layout; see ``docs/performance.md``. Below about a million multiply-adds per call
its fixed cost loses to ``torch.addmm``. The ops are private, so they are probed once at import
(shape and value of a small product) and never used if anything about them is off.

Packed weights of parameters (``nn.Parameter``) are cached per parameter and rebuilt when the
parameter changes: in place (its version counter moves, as every optimizer step and
``load_state_dict`` do) or by rebinding its storage. An in-place write through ``param.data``
bypasses the version counter; call :func:`clear_cache` after one. Other tensors (as
``torch.func.functional_call`` or ``gradcheck`` pass) are never cached.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

MIN_ONEDNN_MACS = 1 << 20  # multiply-adds per call below which torch.addmm is faster
ONE_SHOT_FACTOR = 64  # a product computed once must also repay packing its weight (~0.2 ms)


def _probe_onednn() -> bool:
    try:
        ops = torch.ops.mkldnn
        a = torch.arange(6.0).view(2, 3)
        w = torch.arange(12.0).view(4, 3) / 7
        y = ops._linear_pointwise(a, ops._reorder_linear_weight(w, 2), None, "none", [], "")
        return torch.backends.mkldnn.is_available() and torch.allclose(y, a @ w.t())
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _probe_onednn()

_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()


def uses_onednn(rows: int, weight: Tensor, factor: int = 1) -> bool:
    """Whether ``x @ weight.T`` with ``rows`` rows of ``x`` goes to oneDNN."""
    return (
        ONEDNN
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and rows * weight.numel() >= factor * MIN_ONEDNN_MACS
    )


def cached(params: tuple[Tensor, ...], key: Hashable, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, a function of ``params``, remembered per ``(params, key)`` until one of
    ``params`` changes. Computed afresh when any of them is not an ``nn.Parameter``."""
    if not all(isinstance(p, torch.nn.Parameter) for p in params):
        return make()
    stamp = tuple((p._version, p.data_ptr()) for p in params)
    entries = _packed.setdefault(params[0], {})
    hit = entries.get((key, *map(id, params[1:])))
    if hit is None or hit[0] != stamp:
        value = make()
        if isinstance(value, Tensor) and any(value is p or value._base is p for p in params):
            return value  # a parameter or a view of one: caching it would keep it alive forever
        hit = entries[(key, *map(id, params[1:]))] = (stamp, value)
    return hit[1]


def clear_cache() -> None:
    """Forget every cached weight (needed only after writes through ``param.data``)."""
    _packed.clear()


class Weight:
    """A matrix ``W`` (and optional bias ``b``) ready for repeated products ``x @ W.T + b``
    with inputs of at most ``rows`` rows; ``packed`` is ``W`` already in oneDNN's layout.
    A ``W`` in a lower precision than ``x`` (autocast) takes ``x`` cast to its dtype, and
    gives the product back in ``x``'s dtype, to which ``b`` is added."""

    def __init__(
        self, w: Tensor, rows: int, bias: Tensor | None = None, packed: Tensor | None = None
    ) -> None:
        self.w = w  # (out, in), as in F.linear
        self.bias = bias  # (out,)
        self.onednn = uses_onednn(rows, w)
        if self.onednn and packed is None:
            packed = pack(w, rows)
        self.packed = packed

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``x @ W.T + b``, written into ``out`` when given."""
        if self.onednn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return y if out is None else out.copy_(y)
        if self.w.dtype != x.dtype:  # a low-precision W (autocast): the result in x's dtype
            y = torch.mm(x.to(self.w.dtype), self.w.t())
            y = y.to(x.dtype) if out is None else out.copy_(y)
            return y if self.bias is None else y.add_(self.bias)
        if self.bias is None:
            return torch.mm(x, self.w.t(), out=out)
        return torch.addmm(self.bias, x, self.w.t(), out=out)


def pack(w: Tensor, rows: int) -> Tensor:
    """``w`` reordered into oneDNN's blocked layout for inputs of ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, computed once (weight and input gradients)."""
    if uses_onednn(a.size(0), b, ONE_SHOT_FACTOR):
        return Weight(b.t(), a.size(0))(a)
    return torch.mm(a, b)


def mm_t(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """``a.T @ b``, a sum over all rows (weight gradients). Summed over blocks of ``chunk``
    rows, so that transposing each block of ``a`` for oneDNN stays in cache: at T*B = 6400,
    4H = 2048 this ran in 74 ms instead of 102 ms."""
    total = None
    for a_k, b_k in zip(a.split(chunk), b.split(chunk), strict=True):
        part = mm(a_k.t(), b_k)
        total = part if total is None else total.add_(part)
    return total
