"""lstmkit against ``torch.nn.LSTM`` with shared weights: the yardstick the demo prints, and
the twin that ``lstmkit train --backend nn`` trains."""

from __future__ import annotations

import torch
from torch import nn

from lstmkit.modules import LSTM


def torch_twin(lstm: LSTM) -> nn.LSTM:
    """A ``torch.nn.LSTM`` of ``lstm``'s sizes and options holding its very weights (the plain
    cell only). Its own initialisation runs on a forked generator, so building it does not
    shift the caller's random stream."""
    options = ("num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")
    weight = lstm.weight_ih_l0
    with torch.random.fork_rng(devices=[]):
        twin = nn.LSTM(
            lstm.input_size,
            lstm.hidden_size,
            **{name: getattr(lstm, name) for name in options},
            device=weight.device,
            dtype=weight.dtype,
        )
    twin.load_state_dict(lstm.state_dict())
    return twin


def parity(seed: int = 0) -> dict[str, float]:
    """Largest absolute differences between lstmkit and ``torch.nn.LSTM`` with shared weights
    (2 layers, bidirectional, float64): outputs, final states, input and weight gradients."""
    torch.manual_seed(seed)
    config = {"num_layers": 2, "bidirectional": True, "batch_first": True}
    ours = LSTM(16, 32, **config).double()
    theirs = torch_twin(ours)
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
