"""The native backend's pool of training buffers (csrc/pool.cpp, lstmkit.memory_pool): blocks
given back hold the last owner's values, and the next owner must not see them; the pool keeps no
more than its limit and gives everything back on request. Sizes here are just over the pool's
1 MB threshold (B = 16, T = 80, H = 256: the output is 1.3 MB, the kept gates 5.2 MB)."""

from __future__ import annotations

import pytest
import torch
from test_native import needs_native

import lstmkit

BATCH, STEPS, HIDDEN = 16, 80, 256
TOLERANCE = 2e-4  # float32 over 80 steps against nn.LSTM's float32


def models(layers=1):
    torch.manual_seed(0)
    ours = lstmkit.LSTM(HIDDEN, HIDDEN, layers, backend="native")
    oracle = torch.nn.LSTM(HIDDEN, HIDDEN, layers)
    oracle.load_state_dict(ours.state_dict())
    return ours, oracle


def poison_the_pool(model, x):
    """A training forward whose output (a pooled block) is overwritten with NaN, then freed:
    its block, and the kept gates' and cell states', go back to the pool dirty."""
    output, _ = model(x)
    with torch.no_grad():
        output.fill_(float("nan"))
    del output


@needs_native
def test_a_block_given_back_dirty_serves_a_ragged_step_as_new(threads):
    """Lengths: the rows of a finished sequence must read zero in the output (and its
    gradients), so a reused block must be zeroed, whatever it held."""
    ours, oracle = models()
    x = torch.randn(STEPS, BATCH, HIDDEN)
    lengths = torch.randint(1, STEPS + 1, (BATCH,))
    lengths[0] = STEPS
    for _ in range(2):
        poison_the_pool(ours, x)
        out, (h_n, c_n) = ours(x, lengths=lengths)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        want_packed, (want_h, want_c) = oracle(packed)
        want, _ = torch.nn.utils.rnn.pad_packed_sequence(want_packed, total_length=STEPS)
        for got, expected in ((out, want), (h_n, want_h), (c_n, want_c)):
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
        weights = torch.randn_like(out)
        grads = torch.autograd.grad((out * weights).sum(), list(ours.parameters()))
        want_grads = torch.autograd.grad((want * weights).sum(), list(oracle.parameters()))
        for got, expected in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@needs_native
def test_training_steps_on_reused_blocks_equal_nn_lstm():
    """Two layers, every step after the first on blocks of the step before (and a poisoned
    one), gradients of every parameter against nn.LSTM's."""
    ours, oracle = models(layers=2)
    for step in range(3):
        x = torch.randn(STEPS, BATCH, HIDDEN)
        if step == 1:
            poison_the_pool(ours, x)
        for model in (ours, oracle):
            model.zero_grad(set_to_none=True)
            output, (h_n, c_n) = model(x)
            (output.square().sum() + h_n.sum() + c_n.sum()).backward()
        for (name, a), b in zip(ours.named_parameters(), oracle.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=TOLERANCE, rtol=0, msg=name)


@needs_native
def test_the_pool_keeps_at_most_its_limit_and_gives_everything_back():
    ours, _ = models()
    x = torch.randn(STEPS, BATCH, HIDDEN)
    before = lstmkit.memory_pool()
    try:
        ours(x)[0].sum().backward()
        state = lstmkit.memory_pool()
        assert state.limit == before.limit > 0
        # the output, kept gates and cell states, dz and the input's gradient at least
        assert 8 << 20 <= state.kept <= state.limit
        assert state.in_use >= 2 << 20  # the weights' gradients, held by .grad
        ours.zero_grad(set_to_none=True)
        assert lstmkit.memory_pool().in_use == 0

        kept = lstmkit.memory_pool().kept
        assert lstmkit.empty_cache() == kept
        assert lstmkit.memory_pool(3 << 20) == (before.limit, 0, 0)
        ours(x)[0].sum().backward()
        ours.zero_grad(set_to_none=True)
        assert 1 << 20 <= lstmkit.memory_pool().kept <= 3 << 20

        assert lstmkit.memory_pool(0).limit == 3 << 20
        assert lstmkit.memory_pool().kept == 0
    finally:
        lstmkit.memory_pool(before.limit)


@pytest.mark.parametrize("limit", [-1, 1.5, True, "1GB"])
def test_a_bad_limit_is_refused_by_name(limit):
    with pytest.raises(ValueError, match=r"limit must be a whole number of bytes >= 0.*got"):
        lstmkit.memory_pool(limit)
