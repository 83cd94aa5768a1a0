"""The native backend's float32 inference operator (lstmkit::inference) against the reference
backend in float64 and torch.nn.LSTM: every cell, projection, lengths, given state, zoneout's
evaluation form, both ways of sharing the work between threads (forced in turn), 1 to 3
threads, batches smaller and larger than the thread count."""

from __future__ import annotations

import pytest
import torch
from test_fused_cells import LAYERNORM_FLOAT32_TOLERANCE
from test_native import needs_native

import lstmkit

FLOAT32_TOLERANCE = 1e-5
CELLS = ("lstm", "peephole", "cifg", "layernorm")


def twins(cell: str, **options) -> tuple[lstmkit.LSTM, lstmkit.LSTM]:
    """A float32 native model in evaluation mode and its float64 reference twin."""
    ours = lstmkit.LSTM(5, options.pop("hidden", 40), cell=cell, backend="native", **options)
    reference = lstmkit.LSTM(
        5, ours.hidden_size, cell=cell, backend="reference", dtype=torch.float64, **options
    )
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours.eval(), reference.eval()


def assert_close_to_reference(ours, reference, x, hx=None, lengths=None):
    with torch.no_grad():
        got = ours(x, hx, lengths=lengths)
        want = reference(x.double(), None if hx is None else tuple(s.double() for s in hx),
                         lengths=lengths)  # fmt: skip
    tolerance = LAYERNORM_FLOAT32_TOLERANCE if ours.cell.kind == "layernorm" else FLOAT32_TOLERANCE
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=tolerance, rtol=0)


@needs_native
@pytest.mark.parametrize("steps", [9, 1])
@pytest.mark.parametrize("directions", ["together", "apart"])
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_equals_reference(monkeypatch, threads, cell, batch, split, directions, steps):
    """Two stacked bidirectional layers, lengths, a given state and zoneout; H = 40 has a
    partial panel and, split by units, a partial vector. One step runs on the weights as they
    lie (plain products), in one thread at this size. Without lengths the stack operator runs
    both directions of a layer, at once (one thread each) or one after the other (forced)."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    monkeypatch.setenv("LSTMKIT_NATIVE_DIRECTIONS", directions)
    torch.manual_seed(batch)
    ours, reference = twins(cell, num_layers=2, bidirectional=True, zoneout=(0.2, 0.1))
    x = torch.randn(steps, batch, 5)
    lengths = torch.randint(1, steps + 1, (batch,))
    hx = (torch.randn(4, batch, 40), torch.randn(4, batch, 40))
    assert_close_to_reference(ours, reference, x, hx, lengths)
    assert_close_to_reference(ours, reference, x, hx)
    assert_close_to_reference(ours, reference, x)


@needs_native
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_step_on_large_weights(monkeypatch, cell, split):
    """One step of weights of several MB (H = 384, 2.4 and 4.7 MB a layer) at 2 threads: plain
    products split by units (or rows, forced), as step() runs a large model; sizes not a
    multiple of the 8 columns a plain product takes at once (H = 381) included."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for hidden in (384, 381):
            torch.manual_seed(hidden)
            ours, reference = twins(cell, hidden=hidden, num_layers=2)
            hx = (torch.randn(2, 3, hidden), torch.randn(2, 3, hidden))
            assert_close_to_reference(ours, reference, torch.randn(1, 3, 5), hx)
    finally:
        torch.set_num_threads(previous)


@needs_native
@pytest.mark.parametrize("route", ["plain", "packed"])
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_row_a_worker_reads_w_hh_either_way(monkeypatch, threads, cell, split, route):
    """Where each worker has one row (B = 1, or a row per thread), W_hh is read as it lies or
    packed by its size (LSTMKIT_NATIVE_ONE_ROW forces either): both against the reference, with
    lengths, a given state, zoneout and a projection."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    monkeypatch.setenv("LSTMKIT_NATIVE_ONE_ROW", route)
    for batch in (1, threads):
        torch.manual_seed(batch)
        ours, reference = twins(cell, num_layers=2, bidirectional=True, zoneout=(0.2, 0.1))
        hx = (torch.randn(4, batch, 40), torch.randn(4, batch, 40))
        lengths = torch.randint(1, 10, (batch,))
        assert_close_to_reference(ours, reference, torch.randn(9, batch, 5), hx, lengths)
        ours, reference = twins(cell, hidden=33, proj_size=7)
        assert_close_to_reference(ours, reference, torch.randn(9, batch, 5))


def triplets(cell: str, size: int, hidden: int, proj_size: int):
    """Two stacked layers with zoneout, float32 (`ours`) and its float64 reference twin, and
    the same weights without zoneout (what training's forward runs)."""
    options = {"cell": cell, "proj_size": proj_size, "zoneout": (0.2, 0.1)}
    ours = lstmkit.LSTM(size, hidden, 2, **options)
    reference = lstmkit.LSTM(size, hidden, 2, backend="reference", dtype=torch.float64, **options)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    plain = lstmkit.LSTM(size, hidden, 2, cell=cell, proj_size=proj_size)
    plain.load_state_dict(ours.state_dict())
    return ours, reference, plain


@needs_native
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_input_half_beside_the_one_row_product_or_ahead_in_blocks(
    monkeypatch, threads, cell, split
):
    """A worker of one row computes the next block's input half beside each step's recurrent
    product or all of it at the block's start (LSTMKIT_NATIVE_AHEAD forces either): the same
    sums in the same order, so the same bits, in inference and training's forward, and both
    equal the reference. T = 150 runs blocks of 1, 2, 4, ..., 64 and a short last one; H = 40
    and 33 have short panel groups; I = 5 and I = 50 give the input a K shorter and longer than
    W_hh's; lengths, a given state, zoneout and a projection."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    shapes = [(1, 5, 40, 0), (threads, 50, 33, 7 if cell != "layernorm" else 0)]
    for batch, size, hidden, proj_size in shapes:
        torch.manual_seed(batch)
        ours, reference, plain = triplets(cell, size, hidden, proj_size)
        x = torch.randn(150, batch, size)
        hx = (torch.randn(2, batch, proj_size or hidden), torch.randn(2, batch, hidden))
        lengths = torch.randint(100, 151, (batch,))
        runs = {}
        for route in ("beside", "block"):
            monkeypatch.setenv("LSTMKIT_NATIVE_AHEAD", route)
            assert_close_to_reference(ours.eval(), reference.eval(), x, hx, lengths)
            with torch.no_grad():
                inference = ours(x, hx, lengths=lengths), ours(x)
            x_grad = x.clone().requires_grad_()
            output, (h_n, c_n) = plain(x_grad, hx)
            (output.sum() + h_n.sum() + c_n.sum()).backward()
            runs[route] = (inference, output, h_n, c_n, x_grad.grad)
        leaves = torch.utils._pytree.tree_leaves
        for a, b in zip(leaves(runs["beside"]), leaves(runs["block"]), strict=True):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_many_rows_input_ahead_or_each_step_fetching_or_not(
    monkeypatch, threads, tile_panels, cell, split
):
    """A worker of many rows computes its input half ahead, four steps at once, or at each step
    with the recurrent half (LSTMKIT_NATIVE_INPUT forces either),
    and its row tiles fetch the panels after them into the level-2 cache or not
    (LSTMKIT_NATIVE_FETCH): the same sums in the same order, so the same bits in inference and
    in training's forward and backward, all equal to the reference. 30 rows give every worker
    12 or more at up to 2 threads (row tiles, not the tiles of one or two rows); T = 11 runs
    blocks of 4, 4 and 3, lengths a shorter last block; H = 40 and 33 have short panel groups
    (one panel left after the tiles of two); I = 5 and 50 give the input a K shorter and longer
    than W_hh's; a given state, zoneout and a projection."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    for size, hidden, proj_size in [(5, 40, 0), (50, 33, 7 if cell != "layernorm" else 0)]:
        torch.manual_seed(hidden)
        ours, reference, plain = triplets(cell, size, hidden, proj_size)
        x = torch.randn(11, 30, size)
        hx = (torch.randn(2, 30, proj_size or hidden), torch.randn(2, 30, hidden))
        lengths = torch.randint(5, 12, (30,))
        runs = []
        for route in ("ahead", "each-step"):
            for fetch in ("on", "off"):
                monkeypatch.setenv("LSTMKIT_NATIVE_INPUT", route)
                monkeypatch.setenv("LSTMKIT_NATIVE_FETCH", fetch)
                assert_close_to_reference(ours.eval(), reference.eval(), x, hx, lengths)
                with torch.no_grad():
                    inference = ours(x, hx, lengths=lengths), ours(x)
                x_grad = x.clone().requires_grad_()
                plain.zero_grad(set_to_none=True)
                output, (h_n, c_n) = plain(x_grad, hx)
                (output.sum() + h_n.sum() + c_n.sum()).backward()
                grads = [p.grad for p in plain.parameters()]
                runs.append((inference, output, h_n, c_n, x_grad.grad, grads))
        leaves = torch.utils._pytree.tree_leaves
        for run in runs[1:]:
            for a, b in zip(leaves(runs[0]), leaves(run), strict=True):
                assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("route", ["plain", "packed"])
@pytest.mark.parametrize("split", ["rows", "units"])
def test_an_empty_batch_equals_nn_lstm(monkeypatch, threads, split, route):
    """B = 0 (no worker has a row): the output and states of nn.LSTM's shapes, and in training
    the input's (empty) gradient and the parameters' zero ones."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    monkeypatch.setenv("LSTMKIT_NATIVE_ONE_ROW", route)
    oracle = torch.nn.LSTM(5, 40, num_layers=2)
    ours = lstmkit.LSTM.from_torch(oracle)
    x = torch.randn(6, 0, 5, requires_grad=True)
    with torch.no_grad():
        got, want = ours.eval()(x), oracle(x)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b)
    ours.train()(x)[0].sum().backward()
    assert x.grad.shape == x.shape
    for parameter in ours.parameters():
        torch.testing.assert_close(parameter.grad, torch.zeros_like(parameter))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_batch_runs_every_cell(threads, cell, dtype):
    """B = 0 (it once stopped the process with SIGFPE: a division by the number of workers)
    for every cell, bidirectional, with zoneout and recurrent dropout in training, and lengths:
    the reference backend's outputs and zero gradients."""
    ours = lstmkit.LSTM(5, 40, 2, cell=cell, bidirectional=True, zoneout=(0.2, 0.1),
                        recurrent_dropout=0.2, dtype=dtype)  # fmt: skip
    reference = lstmkit.LSTM(5, 40, 2, cell=cell, bidirectional=True, zoneout=(0.2, 0.1),
                             recurrent_dropout=0.2, dtype=dtype, backend="reference")  # fmt: skip
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(6, 0, 5, dtype=dtype, requires_grad=True)
    for lengths in (None, torch.zeros(0, dtype=torch.long)):
        with torch.no_grad():
            got, want = ours.eval()(x, lengths=lengths), reference.eval()(x, lengths=lengths)
        for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
            torch.testing.assert_close(a, b)
        output, (h_n, c_n) = ours.train()(x, lengths=lengths)
        (output.sum() + h_n.sum() + c_n.sum()).backward()
        for parameter in ours.parameters():
            torch.testing.assert_close(parameter.grad, torch.zeros_like(parameter))


@needs_native
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("split", ["rows", "units"])
@pytest.mark.parametrize("cell", CELLS)
def test_projection_and_no_bias(monkeypatch, threads, cell, split, bidirectional):
    """A projection runs split by rows whatever is forced: each row's projection needs all of
    its hidden units. Bidirectional: both directions' projected outputs side by side."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", split)
    torch.manual_seed(1)
    ours, reference = twins(cell, hidden=33, num_layers=2, proj_size=7, bias=False,
                            bidirectional=bidirectional)  # fmt: skip
    assert_close_to_reference(ours, reference, torch.randn(6, 5, 5))
    assert_close_to_reference(ours, reference, torch.randn(6, 5, 5), lengths=[6, 1, 3, 6, 2])
    assert_close_to_reference(ours, reference, torch.randn(1, 5, 5))  # plain products


@needs_native
@pytest.mark.parametrize("hidden", [8, 16, 31, 64, 100])
@pytest.mark.parametrize("batch", [1, 2, 7, 13])
def test_sizes_around_the_tiles_equal_nn_lstm(threads, tile_panels, batch, hidden):
    """Batch sizes that fill one, two and several row tiles of one and of two panels, hidden
    sizes below, at and past a vector and a panel, against torch.nn.LSTM (batch-first, so the
    input is strided)."""
    torch.manual_seed(hidden)
    oracle = torch.nn.LSTM(hidden + 3, hidden, num_layers=2, batch_first=True)
    ours = lstmkit.LSTM.from_torch(oracle).eval()
    x = torch.randn(batch, 11, hidden + 3)
    with torch.no_grad():
        got, (h, c) = ours(x)
        want, (h_want, c_want) = oracle(x)
    for a, b in ((got, want), (h, h_want), (c, c_want)):
        torch.testing.assert_close(a, b, atol=FLOAT32_TOLERANCE, rtol=0)


@needs_native
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg"])
@pytest.mark.parametrize("hidden", [20, 64])
def test_saturated_and_nan_gates_equal_the_reference(cell, hidden):
    """Pre-activations far past exp's range (biases of +-200 on half the gate units) saturate
    those gates as the float64 reference does, and a NaN in one sequence's input turns that
    sequence's outputs and state into NaN and leaves the others' finite and equal to the
    reference: the gate passes on whole vectors (hidden 64) and on the units past them (hidden
    20) alike."""
    torch.manual_seed(hidden)
    ours, reference = twins(cell, hidden=hidden)
    with torch.no_grad():
        bias = ours.bias_ih_l0
        bias[::2] = 200.0 * torch.randn(bias[::2].shape).sign()
        reference.bias_ih_l0.copy_(bias)
    x = torch.randn(9, 4, 5)
    assert_close_to_reference(ours, reference, x)
    x[3, 1, 2] = float("nan")
    with torch.no_grad():
        got, (h, c) = ours(x)
        want, (h_want, c_want) = reference(x.double())
    for a, b in ((got[3:, 1], want[3:, 1]), (h[:, 1], h_want[:, 1]), (c[:, 1], c_want[:, 1])):
        assert a.isnan().all() and b.isnan().all()
    finite = [0, 2, 3]
    for a, b in ((got[:, finite], want[:, finite]), (h[:, finite], h_want[:, finite])):
        torch.testing.assert_close(a.double(), b, atol=FLOAT32_TOLERANCE, rtol=0)


@needs_native
def test_a_thread_count_change_between_calls():
    torch.manual_seed(0)
    ours, reference = twins("lstm", num_layers=2)
    x = torch.randn(7, 6, 5)
    previous = torch.get_num_threads()
    try:
        for count in (2, 1, 2):
            torch.set_num_threads(count)
            assert_close_to_reference(ours, reference, x)
    finally:
        torch.set_num_threads(previous)


@needs_native
@pytest.mark.parametrize("count", [3, 4, 6])
@pytest.mark.parametrize("hidden", [48, 64, 65, 97])
def test_units_shared_by_more_threads_than_whole_vectors(monkeypatch, count, hidden):
    """Split by units, the shares are rounded up to whole vectors, which can leave the last
    threads no units at all (H = 64 at three threads with 16 lanes, H = 65 at four with 8): the
    others cover every unit. This crashed the process (a division by zero) on AVX-512."""
    monkeypatch.setenv("LSTMKIT_NATIVE_SPLIT", "units")
    torch.manual_seed(hidden)
    ours, reference = twins("lstm", hidden=hidden)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(count)
        assert_close_to_reference(ours, reference, torch.randn(4, 1, 5))
        assert_close_to_reference(ours, reference, torch.randn(1, 2, 5))  # plain products
    finally:
        torch.set_num_threads(previous)


@needs_native
def test_weights_changed_between_calls_take_effect():
    """Packed at every call: a write through .data after a first call is seen by the next."""
    torch.manual_seed(0)
    ours, reference = twins("peephole")
    x = torch.randn(4, 3, 5)
    assert_close_to_reference(ours, reference, x)
    with torch.no_grad():
        for p in ours.parameters():
            p.data.mul_(-1.5)
        for p in reference.parameters():
            p.data.mul_(-1.5)
    assert_close_to_reference(ours, reference, x)


def stack_counter(taken: list[bool]):
    """runner.infer_stack, recording in ``taken`` whether each call ran (or declined)."""
    infer_stack = lstmkit.runner.infer_stack

    def counted(*args, **kwargs):
        result = infer_stack(*args, **kwargs)
        taken.append(result is not None)
        return result

    return counted


@needs_native
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("proj_size", [0, 3])
def test_the_stack_without_run_layer_equals_it(monkeypatch, cell, proj_size):
    """forward and step in evaluation run a unidirectional stack through runner.infer_stack (one
    call of the stack operator): the same numbers, bit for bit, as the layers one by one
    through run_layer, for 2 layers, projection, zoneout's expectation, a given state,
    unbatched input, and in training mode without regularisers. It declines where a gradient is
    needed, for float64, and in training mode with masks to draw."""
    torch.manual_seed(0)
    if cell == "layernorm" and proj_size:
        pytest.skip("the layernorm cell has no projection")
    model = lstmkit.LSTM(5, 8, num_layers=2, cell=cell, proj_size=proj_size, zoneout=0.3)
    model.eval()
    x, hx = torch.randn(4, 6, 5), (torch.randn(2, 6, proj_size or 8), torch.randn(2, 6, 8))
    taken = []
    counted = stack_counter(taken)

    def layer_by_layer(*args, **kwargs):
        return None

    def calls():
        with torch.no_grad():
            return [model(x, hx), model(x[:, 0]), model.step(x[0], hx), model.step(x[0, 0])]

    # the Python path to the stack (runner.infer_whole, C++ checks, declining: see
    # test_native_entry.py)
    monkeypatch.setattr(lstmkit.runner, "infer_whole", lambda *args, **kwargs: None)
    monkeypatch.setattr(lstmkit.runner, "infer_stack", counted)
    got = calls()
    assert taken == [True] * 4
    monkeypatch.setattr(lstmkit.runner, "infer_stack", layer_by_layer)
    want = calls()
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(got), leaves(want), strict=True):
        assert torch.equal(a, b)

    monkeypatch.setattr(lstmkit.runner, "infer_stack", counted)
    taken.clear()
    model(x)  # parameters require grad: the training recurrence
    with torch.no_grad():
        model.double()(x.double())
    assert taken == [False, False]
    model.float().train()
    with torch.no_grad():
        model(x)  # training mode, zoneout's masks to draw
    assert taken == [False, False, False]

    plain = lstmkit.LSTM(5, 8, num_layers=2, cell=cell, proj_size=proj_size).train()
    with torch.no_grad():
        got = plain(x, hx)  # training mode without regularisers or dropout: the stack
        assert taken[-1]
        monkeypatch.setattr(lstmkit.runner, "infer_stack", layer_by_layer)
        want = plain(x, hx)
    for a, b in zip(leaves(got), leaves(want), strict=True):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_a_bidirectional_stack_equals_its_layers_one_by_one(monkeypatch, threads, cell):
    """The stack operator's reverse direction reads and writes time backwards where run_layer
    flips the input and output, and writes each direction's half of the layer's output where
    run_layer concatenates them: one after the other (apart), the same numbers bit for bit;
    at once, one thread each, the same within float32 rounding."""
    torch.manual_seed(2)
    model = lstmkit.LSTM(5, 24, num_layers=2, cell=cell, bidirectional=True, zoneout=0.3)
    model.eval()
    x, hx = torch.randn(7, 6, 5), (torch.randn(4, 6, 24), torch.randn(4, 6, 24))
    taken = []
    counted = stack_counter(taken)

    def calls():
        with torch.no_grad():
            return [model(x, hx), model(x), model(x[:, 0])]

    leaves = torch.utils._pytree.tree_leaves
    monkeypatch.setattr(lstmkit.runner, "infer_stack", lambda *args, **kwargs: None)
    want = calls()
    monkeypatch.setattr(lstmkit.runner, "infer_stack", counted)
    monkeypatch.setenv("LSTMKIT_NATIVE_DIRECTIONS", "apart")
    for a, b in zip(leaves(calls()), leaves(want), strict=True):
        assert torch.equal(a, b)
    monkeypatch.setenv("LSTMKIT_NATIVE_DIRECTIONS", "together")
    tolerance = LAYERNORM_FLOAT32_TOLERANCE if cell == "layernorm" else FLOAT32_TOLERANCE
    for a, b in zip(leaves(calls()), leaves(want), strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=0)
    assert taken == [True] * 6


@needs_native
def test_inference_runs_the_inference_operators_and_training_does_not():
    ours, _ = twins("lstm")
    x = torch.randn(4, 3, 5)

    def operators(run) -> set[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        return {e.name for e in prof.events() if e.name.startswith("lstmkit::")}

    inference = {"lstmkit::inference", "lstmkit::inference_stack"}
    with torch.no_grad():
        assert operators(lambda: ours(x)) == {"lstmkit::inference_stack"}
        assert operators(lambda: ours.step(x[0])) == {"lstmkit::inference_stack"}
        assert operators(lambda: ours(x, lengths=[4, 2, 1])) == {"lstmkit::inference"}
    assert not inference & operators(lambda: ours(x)[0].sum().backward())
    with torch.no_grad():
        assert not inference & operators(lambda: ours.double()(x.double()))


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(cell):
    ours, _ = twins(cell, hidden=6, proj_size=4 if cell == "lstm" else 0)
    params = ours._layer_params(0, 0)
    names = lstmkit.backends.native.LAYER_NAMES
    out = ours.proj_size or 6
    args = (
        torch.randn(5, 3, 5), torch.randn(3, out), torch.randn(3, 6),
        *(None if params.get(n) is None else params[n].detach() for n in names),
        cell, 0.1, 0.2, [3, 3, 2, 1, 1],
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lstmkit.inference.default, args)


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_stack(cell):
    ours, _ = twins(cell, hidden=6, num_layers=2, proj_size=4 if cell == "lstm" else 0)
    names = lstmkit.backends.native.LAYER_NAMES
    params = [ours._layer_params(layer, 0) for layer in range(2)]
    out = ours.proj_size or 6
    args = (
        torch.randn(5, 3, 5), torch.randn(2, 3, out), torch.randn(2, 3, 6),
        [None if p.get(n) is None else p[n].detach() for p in params for n in names],
        cell, 0.1, 0.2,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lstmkit.inference_stack.default, args)
    torch.library.opcheck(
        torch.ops.lstmkit.inference_stack.default, (args[0], None, None, *args[3:])
    )
    # bidirectional: layer 1 takes both directions' outputs side by side
    both = lstmkit.LSTM(5, 6, 2, cell=cell, bidirectional=True, proj_size=ours.proj_size)
    layers = [both._layer_params(k // 2, k % 2) for k in range(4)]
    weights = [None if p.get(n) is None else p[n].detach() for p in layers for n in names]
    states = (torch.randn(4, 3, out), torch.randn(4, 3, 6))
    for directions in ("together", "apart"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LSTMKIT_NATIVE_DIRECTIONS", directions)
            torch.library.opcheck(
                torch.ops.lstmkit.inference_stack.default,
                (args[0], *states, weights, cell, 0.1, 0.2, 2),
            )


@needs_native
@pytest.mark.parametrize("cell", CELLS)
def test_stack_without_states_starts_from_zeros(cell):
    """inference_stack without h0 and c0 makes zero states of the layers' sizes (P and H from
    W_hh: cifg's has 3H rows) and gives bit for bit what explicit zeros give; one of the two
    alone is refused by name."""
    ours, _ = twins(cell, hidden=6, num_layers=2, proj_size=4 if cell == "lstm" else 0)
    names = lstmkit.backends.native.LAYER_NAMES
    weights = [ours._layer_params(layer, 0).get(n) for layer in range(2) for n in names]
    out = ours.proj_size or 6
    x = torch.randn(5, 3, 5)
    stack = torch.ops.lstmkit.inference_stack.default
    with torch.no_grad():
        want = stack(x, torch.zeros(2, 3, out), torch.zeros(2, 3, 6), weights, cell, 0.0, 0.0)
        got = stack(x, None, None, weights, cell, 0.0, 0.0)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            assert torch.equal(a, b)
        torch.testing.assert_close(got[0], ours(x)[0], atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="h0 and c0 or neither, got h0 alone"):
            stack(x, torch.zeros(2, 3, out), None, weights, cell, 0.0, 0.0)


@needs_native
@pytest.mark.parametrize("directions", [1, 2])
def test_stack_refuses_bad_arguments_by_name(directions):
    """Zoneout probabilities outside [0, 1), a direction count other than 1 or 2, and states
    for the wrong number of layer-directions: each refused naming the operator and what it
    got."""
    ours, _ = twins("lstm", hidden=6, num_layers=2, bidirectional=directions == 2)
    names = lstmkit.backends.native.LAYER_NAMES
    layers = [ours._layer_params(k // directions, k % directions) for k in range(2 * directions)]
    weights = [p.get(n) for p in layers for n in names]
    x = torch.randn(5, 3, 5)
    stack = torch.ops.lstmkit.inference_stack.default
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"inference_stack: zoneout .* got 1.5 and 0"):
            stack(x, None, None, weights, "lstm", 1.5, 0.0, directions)
        with pytest.raises(RuntimeError, match="runs 1 or 2 directions, got 3"):
            stack(x, None, None, weights, "lstm", 0.0, 0.0, 3)
        count = 2 * directions + 1  # one layer-direction too many
        states = torch.zeros(count, 3, 6)
        with pytest.raises(RuntimeError, match=rf"takes h0 \(L D, B, P\).* got h0 \[{count}, 3"):
            stack(x, states, states, weights, "lstm", 0.0, 0.0, directions)


@needs_native
def test_compile_keeps_the_inference_operator():
    torch._dynamo.reset()
    model = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True).eval()
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,))
        got = torch.compile(model, fullgraph=True)(x)
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.lstmkit.inference.default) == 4
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
