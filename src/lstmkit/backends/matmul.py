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


def uses_onednn(rows: int, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` with ``rows`` rows of ``x`` goes to oneDNN."""
    return (
        ONEDNN
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and rows * weight.numel() >= MIN_ONEDNN_MACS
    )


def cached(param: Tensor, key: Hashable, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(param)``, remembered per ``(param, key)`` until ``param`` changes."""
    if not isinstance(param, torch.nn.Parameter):
        return make(param)
    stamp = (param._version, param.data_ptr())
    entries = _packed.setdefault(param, {})
    hit = entries.get(key)
    if hit is None or hit[0] != stamp:
        hit = entries[key] = (stamp, make(param))
    return hit[1]


def clear_cache() -> None:
    """Forget every cached weight (needed only after writes through ``param.data``)."""
    _packed.clear()


class Weight:
    """A matrix ``W`` ready for repeated products ``x @ W.T`` with ``rows``-row inputs."""

    def __init__(self, w: Tensor, rows: int, packed: Tensor | None = None) -> None:
        self.w = w  # (out, in), as in F.linear
        self.onednn = uses_onednn(rows, w)
        self.packed = None
        if self.onednn:
            self.packed = packed if packed is not None else pack(w, rows)

    def __call__(self, x: Tensor, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """``x @ W.T``, plus ``add`` when given; written into ``out`` when given."""
        if not self.onednn:
            if add is None:
                return torch.mm(x, self.w.t(), out=out)
            return torch.addmm(add, x, self.w.t(), out=out)
        if add is None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            y = torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed, None, "add")
        return y if out is None else out.copy_(y)


def pack(w: Tensor, rows: int) -> Tensor:
    """``w`` reordered into oneDNN's blocked layout for inputs of ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for one large product (weight gradients, input projections)."""
    return Weight(b.t(), a.size(0))(a)
