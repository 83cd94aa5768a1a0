"""A short demonstration: lstmkit agrees with ``torch.nn.LSTM``, then learns a small task.

Run with ``lstmkit demo`` (or ``python -m lstmkit demo``). The comparison with
``torch.nn.LSTM`` lives with the other comparisons, in :mod:`lstmkit.bench.parity`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lstmkit.bench.parity import parity
from lstmkit.modules import LSTM


class _NextValue(nn.Module):
    """An LSTM that reads a noisy sine wave and predicts its next value."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


def train_sine(steps: int = 200, seed: int = 0) -> tuple[float, float]:
    """Train next-value prediction on random-phase sine waves; return (first, last) loss."""
    torch.manual_seed(seed)
    model = _NextValue(32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = float("nan")
    for step in range(steps):
        phase = torch.rand(32, 1) * 6.283
        t = torch.arange(41, dtype=torch.float32) * 0.3
        wave = torch.sin(t + phase).unsqueeze(-1)  # (32, 41, 1)
        x, y = wave[:, :-1], wave[:, 1:]
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
    return first, last


def main() -> int:
    print("lstmkit vs torch.nn.LSTM (2 layers, bidirectional, float64, shared weights)")
    for name, diff in parity().items():
        print(f"  max |difference| in {name:<13} {diff:.2e}")
    start = time.perf_counter()
    first, last = train_sine()
    seconds = time.perf_counter() - start
    print("training lstmkit.LSTM on next-value prediction of sine waves, 200 Adam steps:")
    print(f"  MSE {first:.4f} -> {last:.4f} in {seconds:.1f} s")
    return 0
