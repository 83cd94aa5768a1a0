"""lstmkit.LSTM against torch.nn.LSTM: same weights, same numbers, same gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TOLERANCES, assert_all_close, run_with_grads, twin_models
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit

IN, H, P = 4, 6, 3
GRID = list(
    itertools.product(
        [1, 2, 3],  # num_layers
        [False, True],  # bidirectional
        [0, P],  # proj_size
        [False, True],  # batch_first
        [True, False],  # bias
        ["batched", "unbatched", "packed"],
        [False, True],  # hx given
    )
)


def make_input(kind: str, batch: int, steps: int, batch_first: bool, dtype, lengths=None):
    """A random input of the given kind; packed inputs use unsorted ``lengths``."""
    if kind == "unbatched":
        return torch.randn(steps, IN, dtype=dtype)
    x = torch.randn(batch, steps, IN, dtype=dtype)
    if kind == "packed":
        return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return x if batch_first else x.transpose(0, 1).contiguous()


def make_hx(layers, bidirectional, proj, batch, dtype, unbatched=False):
    states = layers * (2 if bidirectional else 1)
    lead = (states,) if unbatched else (states, batch)
    return torch.randn(*lead, proj or H, dtype=dtype), torch.randn(*lead, H, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("layers", "bidirectional", "proj", "batch_first", "bias", "kind", "with_hx"), GRID
)
def test_matches_nn_lstm(dtype, layers, bidirectional, proj, batch_first, bias, kind, with_hx):
    ours, theirs = twin_models(
        dtype,
        input_size=IN,
        hidden_size=H,
        num_layers=layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj,
    )
    batch, steps = 3, 5
    x = make_input(kind, batch, steps, batch_first, dtype, lengths=[2, 5, 1])
    hx = (
        make_hx(layers, bidirectional, proj, batch, dtype, kind == "unbatched") if with_hx else None
    )
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOLERANCES[dtype])


@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (1, 7), (4, 1), (0, 3)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_edge_shapes(batch, steps, bidirectional):
    """T = 1, B = 1 and an empty batch."""
    ours, theirs = twin_models(
        input_size=IN, hidden_size=H, num_layers=2, bidirectional=bidirectional, proj_size=P
    )
    x = torch.randn(steps, batch, IN, dtype=torch.float64)
    hx = make_hx(2, bidirectional, P, batch, torch.float64)
    if batch == 0:  # nothing to back-propagate; compare the (empty) forward values
        out, (h, c) = ours(x, hx)
        ref, (h_ref, c_ref) = theirs(x, hx)
        for a, b in ((out, ref), (h, h_ref), (c, c_ref)):
            torch.testing.assert_close(a, b)
        return
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), 1e-10)


def _padding(lengths: torch.Tensor, output: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """The padded steps of a (batch-first or time-major) ``output``, as a boolean index."""
    steps = output.size(1 if batch_first else 0)
    padding = torch.arange(steps).unsqueeze(1) >= lengths  # (T, B)
    return padding.T if batch_first else padding


class _PackedOutput(lstmkit.LSTM):
    """lstmkit.LSTM on padded input with ``lengths=``; checks that padded steps output zeros,
    then packs the output so that it lines up with nn.LSTM's PackedSequence output."""

    def forward(self, x, hx, *, lengths):
        output, state = super().forward(x, hx, lengths=lengths)
        assert not output[_padding(lengths, output, self.batch_first)].any()
        return pack_padded_sequence(output, lengths, self.batch_first, enforce_sorted=False), state


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_equal_packed_sequence(bidirectional, batch_first):
    """``lengths=`` on padded input gives nn.LSTM's PackedSequence results: the same outputs
    (zeros past each length), each sequence's last valid state, and the same gradients."""
    config = {
        "input_size": IN,
        "hidden_size": H,
        "num_layers": 2,
        "bidirectional": bidirectional,
        "proj_size": P,
        "batch_first": batch_first,
    }
    ours = _PackedOutput(**config, dtype=torch.float64)
    theirs = nn.LSTM(**config, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    lengths = torch.tensor([3, 7, 1, 7, 5])
    x = torch.randn(5, 7, IN, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    hx = make_hx(2, bidirectional, P, 5, torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    ref = run_with_grads(theirs, packed, hx)
    got = run_with_grads(ours, x, hx, lengths=lengths)
    # padded steps get a zero input gradient; compare the valid steps, packed like nn.LSTM's
    grad_x = got.pop("grad input")
    assert not grad_x[_padding(lengths, grad_x, batch_first)].any()
    grad_packed = pack_padded_sequence(grad_x, lengths, batch_first, enforce_sorted=False).data
    torch.testing.assert_close(grad_packed, ref.pop("grad input"), atol=1e-10, rtol=1e-10)
    assert_all_close(got, ref, 1e-10)


def test_same_seed_same_weights():
    config = {"num_layers": 3, "bidirectional": True, "proj_size": 2}
    torch.manual_seed(7)
    ours = lstmkit.LSTM(5, 4, **config)
    torch.manual_seed(7)
    theirs = nn.LSTM(5, 4, **config)
    names = [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_parameters()] == names
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_state_dict_both_directions_and_introspection():
    config = {"num_layers": 2, "bidirectional": True, "proj_size": 2, "bias": False}
    ours, theirs = lstmkit.LSTM(5, 4, **config), nn.LSTM(5, 4, **config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert len(ours.all_weights) == len(theirs.all_weights)
    for mine, ref in zip(ours.all_weights, theirs.all_weights, strict=True):
        assert [w.shape for w in mine] == [w.shape for w in ref]
        assert all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True))
    ours.flatten_parameters()  # a no-op that must exist for code written for nn.LSTM
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=1e-5)


def test_dropout_only_between_layers_and_only_in_training():
    """In training the output of every layer but the last goes through F.dropout; the oracle is
    a chain of one-layer nn.LSTMs with F.dropout between them, under the same seed."""
    ours = lstmkit.LSTM(IN, H, num_layers=3, dropout=0.4, dtype=torch.float64)
    layers = [nn.LSTM(IN if k == 0 else H, H, dtype=torch.float64) for k in range(3)]
    for k, layer in enumerate(layers):
        layer.load_state_dict(
            {n.replace("_l0", ""): p for n, p in ours.state_dict().items() if n.endswith(f"_l{k}")}
            | {},
            strict=False,
        )
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").data.copy_(getattr(ours, f"{name}_l{k}"))
    x = torch.randn(6, 2, IN, dtype=torch.float64)

    torch.manual_seed(3)
    out, (h, _) = ours(x)
    torch.manual_seed(3)
    ref, h_ref = x, []
    for k, layer in enumerate(layers):
        ref, (h_k, _) = layer(ref)
        h_ref.append(h_k)
        if k < 2:
            ref = nn.functional.dropout(ref, 0.4, training=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(h, torch.cat(h_ref), atol=1e-10, rtol=1e-10)

    ours.eval()
    theirs = nn.LSTM(IN, H, num_layers=3, dropout=0.4, dtype=torch.float64).eval()
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-10, rtol=1e-10)


def test_gradcheck_reference_backend():
    model = lstmkit.LSTM(
        3,
        4,
        num_layers=2,
        bidirectional=True,
        proj_size=2,
        dtype=torch.float64,
        backend="reference",
    )
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    params = list(model.parameters())

    def f(x, h0, c0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(
            model, dict(zip([n for n, _ in model.named_parameters()], weights, strict=True))
        ):
            out, (h, c) = model(x, (h0, c0), lengths=lengths)
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))
