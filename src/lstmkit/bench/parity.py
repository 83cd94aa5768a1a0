"""lstmkit against ``torch.nn.LSTM`` with shared weights: the yardstick the demo prints."""

from __future__ import annotations

import torch
from torch import nn

from lstmkit.modules import LSTM


def parity(seed: int = 0) -> dict[str, float]:
    """Largest absolute differences between lstmkit and ``torch.nn.LSTM`` with shared weights
    (2 layers, bidirectional, float64): outputs, final states, input and weight gradients."""
    torch.manual_seed(seed)
    config = {"num_layers": 2, "bidirectional": True, "batch_first": True}
    ours = LSTM(16, 32, **config).double()
    theirs = nn.LSTM(16, 32, **config).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 25, 16, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, (h, c) = model(xi)
        (out.sum() + h.sum() + c.sum()).backward()
        grads = [p.grad for p in model.parameters()]
        results.append((out, h, c, xi.grad, grads))
    (o1, h1, c1, dx1, g1), (o2, h2, c2, dx2, g2) = results
    return {
        "output": (o1 - o2).abs().max().item(),
        "h_n": (h1 - h2).abs().max().item(),
        "c_n": (c1 - c2).abs().max().item(),
        "input grad": (dx1 - dx2).abs().max().item(),
        "weight grads": max((a - b).abs().max().item() for a, b in zip(g1, g2, strict=True)),
    }
