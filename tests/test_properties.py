"""Property-based parity: random configurations and shapes, lstmkit against torch.nn.LSTM."""

from __future__ import annotations

import torch
from conftest import assert_all_close, run_with_grads, twin_models
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence


@st.composite
def configurations(draw):
    hidden = draw(st.integers(2, 6))
    config = {
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": hidden,
        "num_layers": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
        "proj_size": draw(st.integers(0, hidden - 1)),
    }
    batch, steps = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    lengths = draw(st.none() | st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    return config, batch, steps, lengths, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(configurations())
def test_random_configurations_match_nn_lstm(case):
    config, batch, steps, lengths, with_hx, seed = case
    torch.manual_seed(seed)
    ours, theirs = twin_models(torch.float64, **config)
    x = torch.randn(batch, steps, config["input_size"], dtype=torch.float64)
    if not config["batch_first"]:
        x = x.transpose(0, 1)
    hx = None
    if with_hx:
        states = config["num_layers"] * (2 if config["bidirectional"] else 1)
        out = config["proj_size"] or config["hidden_size"]
        hx = (
            torch.randn(states, batch, out, dtype=torch.float64),
            torch.randn(states, batch, config["hidden_size"], dtype=torch.float64),
        )
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, config["batch_first"], enforce_sorted=False)
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), 1e-10)
