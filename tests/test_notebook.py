"""The notebook's SimpleLSTM, BidirectionalLSTM and DeepLSTM, fixed, against torch.nn.LSTM.

Each test pins one of the notebook's bugs (see ../shared/DESIGN.md)."""

from __future__ import annotations

import torch
from torch import nn

import lstmkit


def _oracle(model: nn.Module, **config) -> nn.LSTM:
    theirs = nn.LSTM(batch_first=True, **config)
    theirs.load_state_dict(model.lstm.state_dict())
    return theirs


def test_simple_lstm_carries_the_hidden_state_not_the_cell_state():
    model = lstmkit.SimpleLSTM(6, 5)
    theirs = _oracle(model, input_size=6, hidden_size=5)
    x = torch.randn(2, 9, 6)
    output, h, c = model(x)
    ref, (h_ref, c_ref) = theirs(x)
    torch.testing.assert_close(output, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h, c, atol=1e-2)  # the notebook returned c where h belongs


def test_bidirectional_final_state_is_per_sequence_and_uses_the_reverse_state():
    model = lstmkit.BidirectionalLSTM(6, 5)
    theirs = _oracle(model, input_size=6, hidden_size=5, bidirectional=True)
    x = torch.randn(3, 4, 6)
    output, h, c = model(x)
    ref, (h_ref, c_ref) = theirs(x)
    torch.testing.assert_close(output, ref, atol=1e-5, rtol=1e-5)
    assert h.shape == (3, 10)  # one row per batch element, not outputs[-1]
    torch.testing.assert_close(h, torch.cat([h_ref[0], h_ref[1]], dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, torch.cat([c_ref[0], c_ref[1]], dim=-1), atol=1e-5, rtol=1e-5)
    # the reverse direction ends at step 0, so its state is output[:, 0, H:]
    torch.testing.assert_close(h[:, 5:], output[:, 0, 5:])


def test_deep_lstm_with_more_layers_than_steps_returns_its_state():
    model = lstmkit.DeepLSTM(6, 5, num_layers=4)
    theirs = _oracle(model, input_size=6, hidden_size=5, num_layers=4)
    x = torch.randn(2, 2, 6)  # 4 layers > 2 steps: an IndexError in the notebook
    output, (h, c) = model(x)
    ref, (h_ref, c_ref) = theirs(x)
    for a, b in ((output, ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_initialisation_does_not_saturate_the_gates():
    """nn.LSTM's U(-1/sqrt(H), 1/sqrt(H)), not the notebook's N(0, 1)."""
    model = lstmkit.SimpleLSTM(8, 64)
    bound = 1 / 64**0.5
    for p in model.parameters():
        assert p.abs().max() <= bound
        assert p.std() > 0.5 * bound / 3**0.5  # uniform on [-b, b] has std b / sqrt(3)
