"""Matrix products for the fused backend: oneDNN's prepacked GEMM on the CPU where it wins,
``torch.mm`` everywhere else.

On the AVX-512 CPUs this project runs on, oneDNN's linear (``torch.ops.mkldnn``) reaches
2-2.5x the FLOP rate of ``torch.mm`` for float32 once its weight is reordered ("packed") into
its blocked layout; see ``docs/performance.md``. Below about a million multiply-adds per call
its fixed cost loses to ``torch.addmm``. The ops are private, so they are probed once at import
(shape and value of a small product) and never used if anything about them is off.

Weights are packed afresh by every forward call that uses them (:class:`Weight`); nothing
is remembered between calls, so a product always sees the weight's values of that call.
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def uses_onednn(rows: int, weight: Tensor, factor: int = 1) -> bool:
    """Whether ``x @ weight.T`` with ``rows`` rows of ``x`` goes to oneDNN."""
    return (
        ONEDNN
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and rows * weight.numel() >= factor * MIN_ONEDNN_MACS
    )


class Weight:
    """A matrix ``W`` (and optional bias ``b``) ready for repeated products ``x @ W.T + b``
    with inputs of at most ``rows`` rows, packed into oneDNN's layout where products go there.
    A ``W`` in a lower precision than ``x`` (autocast) takes ``x`` cast to its dtype, and
    gives the product back in ``x``'s dtype, to which ``b`` is added."""

    def __init__(self, w: Tensor, rows: int, bias: Tensor | None = None) -> None:
        self.w = w  # (out, in), as in F.linear
        self.bias = bias  # (out,)
        self.onednn = uses_onednn(rows, w)
        self.packed = pack(w, rows) if self.onednn else None

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
