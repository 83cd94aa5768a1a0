"""What the backends with a hand-written backward share: the stacked step weight, per-step
views of the running rows, whether a backward will run, what stops them from running, and
higher-order gradients through the reference equations.

Nothing derived from a parameter outlives the forward call that computed it: optimizers with
``fused=True``, writes through ``.data`` and re-assigned parameters change values without any
signal a cache could trust (version counters, data pointers and ids all lie), so every forward
reorders and packs the weights it is given. That costs one copy of the weights per
layer-direction and call, amortised over the time steps (``docs/performance.md``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from lstmkit import cells
from lstmkit.backends import matmul, reference


def cast(w: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``w`` in ``dtype`` for low-precision products, or as it is for ``None``."""
    return w if dtype is None else w.to(dtype)


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager:
    """A block with autocast off on ``x``'s device (devices without autocast, such as
    ``meta``, have nothing to turn off)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def step_weight(
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    rows: int,
    layout: Callable[[Tensor], Tensor],
    dtype: torch.dtype | None = None,
) -> matmul.Weight:
    """``[x, h] -> [x, h] @ [W_ih, W_hh].T + b_ih + b_hh`` with the gate rows of the weight and
    bias rearranged by ``layout``, the product in ``dtype`` when given (the bias stays in its
    own). Built from the parameters' values at this call, never remembered across calls."""
    bias = None if b_ih is None else layout(b_ih + b_hh)
    return matmul.Weight(cast(layout(torch.cat([w_ih, w_hh], 1)), dtype), rows, bias)


def head(rows: Tensor, n: int) -> Tensor:
    """The first ``n`` rows: the sequences still running at a step."""
    return rows if n == rows.size(0) else rows[:n]


def running_rows(buffers: Sequence[Tensor], slots: Sequence[int], sizes: list[int]) -> list[Tensor]:
    """For each step ``t``, the running rows of ``buffers[slots[t]]``."""
    return [head(buffers[k], n) for k, n in zip(slots, sizes, strict=True)]


def last_step(batch_sizes: list[int] | None, steps: int, batch: int, device) -> Tensor:
    """``(B,)`` index of each sequence's last step."""
    if batch_sizes is None:
        return torch.full((batch,), steps - 1, device=device)
    running = torch.tensor(batch_sizes).unsqueeze(0) > torch.arange(batch).unsqueeze(1)  # (B, T)
    return (running.sum(1) - 1).to(device)


def needs_backward(tensors: Sequence[Tensor | None]) -> bool:
    """Whether autograd will differentiate a function of ``tensors``: the forward must then
    keep what its backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def opaque_refusal(tensors: Sequence[Tensor | None]) -> str | None:
    """Why an ``autograd.Function`` with a hand-written backward cannot run on ``tensors``
    here, or ``None``: ``torch.func`` transforms and forward-mode AD need formulas it does not
    have, and ``torch.jit.trace`` cannot record its in-place steps."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "inside a torch.func transform (grad, vmap, jvp, jacrev, ...)"
    if torch.jit.is_tracing():
        return "under torch.jit.trace"
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return "with forward-mode AD tangents"
    return None


def rerun_reference(
    cell: cells.Cell,
    names: Sequence[str],
    batch_sizes: list[int] | None,
    masks,
    run: Callable[..., tuple[Tensor, Tensor, Tensor]] = reference.run,
) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``(x, h0, c0, *weights) -> (output, h_n, c_n)`` by the reference backend, the weights
    named by ``names``, with the given ``batch_sizes`` and ``masks``; ``run`` is
    :func:`lstmkit.backends.reference.run`, or :func:`~lstmkit.backends.reference.recur` for
    a function of the input half of the gates instead of the input."""

    def rerun(x: Tensor, h0: Tensor, c0: Tensor, *weights: Tensor | None):
        params = dict(zip(names, weights, strict=True))
        return run(cell, x, h0, c0, params, batch_sizes, masks)

    return rerun


def reference_backward(
    rerun: Callable[..., tuple[Tensor, ...]],
    inputs: Sequence[Tensor | None],
    grad_outputs: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients of ``rerun(*inputs)`` for ``grad_outputs``, as a differentiable function
    of both: what a hand-written backward returns when autograd asks it for higher-order
    gradients (``create_graph=True``). The forward is recomputed by the reference equations,
    whose autograd graph then carries the next derivative. ``None`` where ``needs`` is False."""
    wanted = [k for k, (t, n) in enumerate(zip(inputs, needs, strict=True)) if n and t is not None]
    pairs = [(o, g) for o, g in zip(rerun(*inputs), grad_outputs, strict=True) if g is not None]
    grads: list[Tensor | None] = [None] * len(inputs)
    if wanted and pairs:
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[k] for k in wanted],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
        for k, grad in zip(wanted, found, strict=True):
            grads[k] = grad
    return grads
