"""Shared oracles for the tests: run lstmkit and ``torch.nn.LSTM`` with the same weights and
compare outputs, final states and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import lstmkit

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(params=[1, 2, 3], ids=["1 thread", "2 threads", "3 threads"])
def threads(request):
    """torch's intra-op thread count set for the test (1, 2, then 3: more threads than this
    machine's cores, and workers with uneven shares), restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(params=["1", "2"], ids=["1 panel a tile", "2 panels a tile"])
def tile_panels(request, monkeypatch):
    """The native products' panels per row tile forced (LSTMKIT_NATIVE_TILE): one (the default
    with AVX2) and two (with AVX-512), so that every machine runs both."""
    monkeypatch.setenv("LSTMKIT_NATIVE_TILE", request.param)
    return request.param


def twin_models(dtype: torch.dtype = torch.float64, **config) -> tuple[lstmkit.LSTM, nn.LSTM]:
    """An lstmkit.LSTM and a torch.nn.LSTM holding the same weights."""
    ours = lstmkit.LSTM(**config, dtype=dtype)
    theirs = nn.LSTM(**{k: v for k, v in config.items() if k != "backend"}, dtype=dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _data(output):
    return output.data if isinstance(output, PackedSequence) else output


def run_with_grads(model: nn.Module, input, hx=None, **kwargs) -> dict[str, torch.Tensor]:
    """Forward ``model``, back-propagate a fixed random weighting of every output, and return
    the outputs with the gradients of the input, of ``hx`` and of every parameter."""
    model.zero_grad(set_to_none=True)
    leaves = {}
    if isinstance(input, PackedSequence):
        data = input.data.detach().requires_grad_()
        input = PackedSequence(
            data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
        leaves["input"] = data
    else:
        input = input.detach().requires_grad_()
        leaves["input"] = input
    if hx is not None:
        hx = tuple(s.detach().requires_grad_() for s in hx)
        leaves["h_0"], leaves["c_0"] = hx
    output, (h_n, c_n) = model(input, hx, **kwargs)
    results = {"output": _data(output), "h_n": h_n, "c_n": c_n}
    generator = torch.Generator().manual_seed(1234)
    loss = sum(
        (t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
        for t in results.values()
    )
    loss.backward()
    results = {k: v.detach() for k, v in results.items()}
    results |= {f"grad {k}": v.grad for k, v in leaves.items()}
    results |= {f"grad {k}": p.grad for k, p in model.named_parameters()}
    return results


def second_derivatives(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a double backward computes: the gradients, with respect to ``x`` and every
    parameter, of the sum of squares of a fixed loss's first-order gradients."""
    out, (h_n, c_n) = model(x)
    loss = out.square().sum() + h_n.sum() + c_n.square().sum()
    leaves = (x, *model.parameters())
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


def assert_all_close(ours: dict, theirs: dict, tol: float) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(
            ours[key], theirs[key], atol=tol, rtol=tol, msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
