"""Conversion both ways between lstmkit.LSTM and torch.nn.LSTM: the converted module computes
the same outputs and gradients (float64, within 1e-10) and the caller's random stream is not
moved by the conversion."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_all_close, run_with_grads
from torch import nn

import lstmkit

CONFIGS = [
    {},
    {"num_layers": 2, "bidirectional": True, "batch_first": True},
    {"num_layers": 2, "proj_size": 3, "bias": False, "dropout": 0.5},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_to_torch_computes_the_same(config):
    ours = lstmkit.LSTM(4, 5, **config, dtype=torch.float64).eval()
    state = torch.random.get_rng_state()
    theirs = lstmkit.to_torch(ours)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(theirs, nn.LSTM) and not theirs.training
    assert theirs.weight_ih_l0.dtype == torch.float64
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    assert_all_close(run_with_grads(theirs, x), run_with_grads(ours, x), TOLERANCES[torch.float64])
    theirs.weight_hh_l0.data.zero_()  # a copy: the original's weights stay
    assert ours.weight_hh_l0.abs().sum() > 0


@pytest.mark.parametrize("config", CONFIGS)
def test_from_torch_computes_the_same(config):
    theirs = nn.LSTM(4, 5, **config, dtype=torch.float64)
    state = torch.random.get_rng_state()
    ours = lstmkit.LSTM.from_torch(theirs, backend="fused")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert ours.training and ours.backend == "fused"
    theirs.eval(), ours.eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    assert_all_close(run_with_grads(ours, x), run_with_grads(theirs, x), TOLERANCES[torch.float64])


def test_round_trip_keeps_every_weight():
    ours = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    back = lstmkit.LSTM.from_torch(lstmkit.to_torch(ours))
    assert back.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_from_torch_takes_lstmkit_regularisers():
    ours = lstmkit.LSTM.from_torch(nn.LSTM(3, 4), zoneout=0.25).eval()
    assert ours.regularizers.zoneout_h == ours.regularizers.zoneout_c == 0.25


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"cell": "peephole"},
            r"only the standard cell \(kind 'lstm'\); model has cell='peephole' \(Peephole\) "
            "of kind 'peephole'",
        ),
        ({"zoneout": 0.1}, r"no recurrent_dropout, weight_drop or zoneout; model has zoneout_h"),
        ({"weight_drop": 0.2}, r"model has weight_drop=0.2"),
    ],
)
def test_to_torch_refuses_what_nn_lstm_cannot_run(options, message):
    with pytest.raises(ValueError, match=message):
        lstmkit.to_torch(lstmkit.LSTM(3, 4, **options))


def test_wrong_types_are_named():
    with pytest.raises(TypeError, match=r"model must be an lstmkit.LSTM, got LSTM"):
        lstmkit.to_torch(nn.LSTM(3, 4))
    with pytest.raises(TypeError, match=r"module must be a torch.nn.LSTM, got GRU"):
        lstmkit.LSTM.from_torch(nn.GRU(3, 4))
