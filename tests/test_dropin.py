"""lstmkit.LSTM as a drop-in for torch.nn.LSTM beyond a single forward call: optimizers (fused,
foreach and plain loops), every way of writing a parameter (``.data``, new ``nn.Parameter``\\ s,
``load_state_dict``, parametrizations), ``gradcheck`` / ``gradgradcheck``, inference mode,
``torch.func`` transforms and double backward, on the default backend and on ``step()``.

nn.LSTM with the same weights is the oracle (float64, within 1e-10). Each mutation is made
after a first call, so that anything remembered from that call would be caught being stale.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_all_close, run_with_grads, twin_models
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstmkit

F64 = torch.float64
TOL = 1e-10
IN, H, P = 3, 4, 2
B, T = 2, 5

FORWARD_CONFIGS = {
    "1-layer": {"num_layers": 1},
    "2-layer-bi-proj": {"num_layers": 2, "bidirectional": True, "proj_size": P},
}
STEP_CONFIGS = {
    "1-layer": {"num_layers": 1},
    "2-layer-proj": {"num_layers": 2, "proj_size": P},
}


def twins(config: dict) -> tuple[lstmkit.LSTM, nn.LSTM]:
    return twin_models(F64, input_size=IN, hidden_size=H, **config)


def random_hx(model: nn.Module, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(h_0, c_0)`` for ``model``, float64."""
    states = model.num_layers * (2 if model.bidirectional else 1)
    out = model.proj_size or model.hidden_size
    return (
        torch.randn(states, batch, out, dtype=F64),
        torch.randn(states, batch, model.hidden_size, dtype=F64),
    )


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def flat(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of nested dicts, tuples and lists by path, for :func:`assert_all_close`."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, tuple | list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    result = {}
    for key, value in items:
        result |= flat(value, f"{prefix}/{key}")
    return result


def assert_same_parameters(ours: nn.Module, theirs: nn.Module, tol: float = TOL) -> None:
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == ref.keys()
    for name in mine:
        close(mine[name], ref[name], tol, name)


def max_change(before: dict, after: dict) -> float:
    return max((before[k] - after[k]).abs().max().item() for k in before)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def forward_results(model: nn.Module, x, hx, grad: bool) -> dict[str, torch.Tensor]:
    """Outputs, and with ``grad`` every gradient (:func:`conftest.run_with_grads`)."""
    if grad:
        return run_with_grads(model, x, hx)
    with torch.no_grad():
        output, (h_n, c_n) = model(x, hx)
    return {"output": output, "h_n": h_n, "c_n": c_n}


def streamed(model: nn.Module, x, hx, grad: bool) -> dict[str, torch.Tensor]:
    """Step through the time-major ``x`` carrying ``(h, c)``: ``step()`` for lstmkit, one-step
    sequences for nn.LSTM. Every step's output and state, and with ``grad`` the gradients of
    every parameter for a fixed random weighting of them."""
    model.zero_grad(set_to_none=True)
    state = hx
    ys, hs, cs = [], [], []
    with torch.set_grad_enabled(grad):
        for x_t in x:
            if isinstance(model, lstmkit.LSTM):
                y, state = model.step(x_t, state)
            else:
                out, state = model(x_t.unsqueeze(0), state)
                y = out[0]
            ys.append(y)
            hs.append(state[0])
            cs.append(state[1])
        results = {"y": torch.stack(ys), "h": torch.stack(hs), "c": torch.stack(cs)}
    if grad:
        generator = torch.Generator().manual_seed(99)
        loss = sum(
            (t * torch.randn(t.shape, generator=generator, dtype=F64)).sum()
            for t in results.values()
        )
        loss.backward()
        results |= {f"grad {n}": p.grad for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in results.items()}


def assert_streams_match(ours, theirs, x, hx) -> None:
    for grad in (True, False):
        assert_all_close(streamed(ours, x, hx, grad), streamed(theirs, x, hx, grad), TOL)


# ---------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 0.05}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
}
# fused=True steps write the parameters without moving their version counters. All three
# fused optimizers accept float64 CPU parameters in this torch, so every case is float64.
IMPLEMENTATIONS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "loop": {"foreach": False},
}
TRAIN_STEPS = 4


def optimizer_pair(ours, theirs, optimizer: str, implementation: str):
    kind, options = OPTIMIZERS[optimizer]
    options = options | IMPLEMENTATIONS[implementation]
    return kind(ours.parameters(), **options), kind(theirs.parameters(), **options)


def train_step(model, opt, x, target) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    output, (h_n, c_n) = model(x)
    loss = (output - target).pow(2).mean() + h_n.pow(2).mean() + c_n.pow(2).mean()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_forward_reads_weights_written_by_fused_optimizers(config, optimizer, implementation):
    """Trained side by side, lstmkit and nn.LSTM see the same losses at every step and end with
    the same weights, outputs and gradients: every forward reads the weights the optimizer
    has just written, even when (fused) it did not move their version counters."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    opts = optimizer_pair(ours, theirs, optimizer, implementation)
    x = torch.randn(T, B, IN, dtype=F64)
    target = torch.randn(T, B, ours(x)[0].size(-1), dtype=F64)
    initial = snapshot(ours)
    for step in range(TRAIN_STEPS):
        loss = train_step(ours, opts[0], x, target)
        ref = train_step(theirs, opts[1], x, target)
        close(loss, ref, what=f"loss at step {step}")
    assert_same_parameters(ours, theirs)
    assert max_change(initial, snapshot(ours)) > 1e-2  # the weights did move
    hx = random_hx(ours)
    for grad in (True, False):
        assert_all_close(
            forward_results(ours, x, hx, grad), forward_results(theirs, x, hx, grad), TOL
        )


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_reads_weights_written_by_fused_optimizers(config, optimizer, implementation):
    """``step()`` (with and without grad) after each optimizer step equals nn.LSTM run on
    one-step sequences with the state carried."""
    ours, theirs = twins(STEP_CONFIGS[config])
    opts = optimizer_pair(ours, theirs, optimizer, implementation)
    x = torch.randn(T, B, IN, dtype=F64)
    target = torch.randn(T, B, ours.proj_size or H, dtype=F64)
    hx = random_hx(ours)
    assert_streams_match(ours, theirs, x, hx)  # a first call before any update
    initial = snapshot(ours)
    for step in range(TRAIN_STEPS):
        loss = train_step(ours, opts[0], x, target)
        ref = train_step(theirs, opts[1], x, target)
        close(loss, ref, what=f"loss at step {step}")
        assert_streams_match(ours, theirs, x, hx)
    assert_same_parameters(ours, theirs)
    assert max_change(initial, snapshot(ours)) > 1e-2


# ---------------------------------------------------------------- writes to parameters


def fresh(shape, generator) -> torch.Tensor:
    return 0.3 * torch.randn(shape, generator=generator, dtype=F64)


def data_mul(model, generator):
    for p in model.parameters():
        p.data.mul_(1.0 + fresh(p.shape, generator))


def data_assign(model, generator):
    for p in model.parameters():
        p.data = fresh(p.shape, generator)


def data_copy_ema(model, generator):
    """``p.data.copy_(ema)``, as code that swaps in an exponential moving average does."""
    for p in model.parameters():
        ema = p.detach().clone().mul_(0.5).add_(fresh(p.shape, generator))
        p.data.copy_(ema)


def vector_to_parameters(model, generator):
    vector = nn.utils.parameters_to_vector(model.parameters()).detach()
    nn.utils.vector_to_parameters(0.5 * vector + fresh(vector.shape, generator), model.parameters())


def new_parameters(model, generator):
    for name, p in list(model.named_parameters()):
        setattr(model, name, nn.Parameter(fresh(p.shape, generator)))


def load_state_dict(model, generator):
    model.load_state_dict({k: fresh(v.shape, generator) for k, v in model.state_dict().items()})


def load_state_dict_assign(model, generator):
    state = {k: fresh(v.shape, generator) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def in_place_no_grad(model, generator):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(fresh(p.shape, generator))


MUTATIONS = {
    f.__name__: f
    for f in (
        data_mul,
        data_assign,
        data_copy_ema,
        vector_to_parameters,
        new_parameters,
        load_state_dict,
        load_state_dict_assign,
        in_place_no_grad,
    )
}


def mutate_both(mutation, ours, theirs, seed: int) -> None:
    """The same mutation with the same random numbers on both models."""
    for model in (ours, theirs):
        mutation(model, torch.Generator().manual_seed(seed))
    assert_same_parameters(ours, theirs, 0.0)


def assert_forwards_match(ours, theirs, x, hx) -> None:
    """Both models' results, with and without gradients (two code paths), agree."""
    for grad in (True, False):
        assert_all_close(
            forward_results(ours, x, hx, grad), forward_results(theirs, x, hx, grad), TOL
        )


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_forward_reads_written_parameters(config, mutation):
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    previous = forward_results(ours, x, hx, grad=False)["output"]
    for seed in (1, 2):
        assert_forwards_match(ours, theirs, x, hx)  # first calls, before the write
        mutate_both(MUTATIONS[mutation], ours, theirs, seed)
        assert_forwards_match(ours, theirs, x, hx)
        output = forward_results(ours, x, hx, grad=False)["output"]
        assert (output - previous).abs().max().item() > 1e-3  # the write did change the result
        previous = output


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_reads_written_parameters(config, mutation):
    ours, theirs = twins(STEP_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    for seed in (1, 2):
        assert_streams_match(ours, theirs, x, hx)
        mutate_both(MUTATIONS[mutation], ours, theirs, seed)
        assert_streams_match(ours, theirs, x, hx)


REASSIGNMENTS = 50


def reassign(model, name, value):
    """A new ``nn.Parameter`` holding ``value``, made after the old one was freed, so that ids
    and storage addresses of earlier parameters come back (in the loops below, about 3 in 4
    new parameters reuse an earlier id and 1 in 2 an earlier address)."""
    setattr(model, name, None)
    setattr(model, name, nn.Parameter(torch.empty_like(value).copy_(value)))


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_forward_after_reassigning_new_parameters_repeatedly(config):
    """New ``nn.Parameter``\\ s of fresh random values, assigned again and again: freed ids and
    storage addresses are reused by the next ones, and every output must still be right."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    generator = torch.Generator().manual_seed(3)
    names = [name for name, _ in ours.named_parameters()]
    for i in range(REASSIGNMENTS):
        assert_all_close(
            forward_results(ours, x, hx, i % 2 == 0),
            forward_results(theirs, x, hx, i % 2 == 0),
            TOL,
        )
        name = names[i % len(names)] if i % 3 else None  # one parameter, or all of them
        for n in [name] if name else names:
            value = fresh(getattr(ours, n).shape, generator)
            for model in (ours, theirs):
                reassign(model, n, value)
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)


@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_after_reassigning_new_parameters_repeatedly(config):
    ours, theirs = twins(STEP_CONFIGS[config])
    x = torch.randn(3, B, IN, dtype=F64)
    hx = random_hx(ours)
    generator = torch.Generator().manual_seed(4)
    names = [name for name, _ in ours.named_parameters()]
    for i in range(REASSIGNMENTS):
        grad = i % 2 == 0
        assert_all_close(streamed(ours, x, hx, grad), streamed(theirs, x, hx, grad), TOL)
        for n in names:
            value = fresh(getattr(ours, n).shape, generator)
            for model in (ours, theirs):
                reassign(model, n, value)


def weight_norm(model, name):
    parametrizations.weight_norm(model, name)
    return parametrize_original(model, name, 0)


def spectral_norm(model, name):
    parametrizations.spectral_norm(model, name)
    return parametrize_original(model, name, None)


def parametrize_original(model, name, index):
    originals = model.parametrizations[name]
    return getattr(originals, "original" if index is None else f"original{index}")


@pytest.mark.parametrize("name", ["weight_hh_l0", "weight_ih_l0"])
@pytest.mark.parametrize("kind", [weight_norm, spectral_norm], ids=lambda f: f.__name__)
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_parametrized_weights(config, kind, name):
    """The same parametrization on both models. spectral_norm's power iteration starts from
    random vectors (drawn at registration, so both are seeded alike) and moves them at every
    computation of the weight in training mode, which nn.LSTM does more than once per call.
    So the comparison is in evaluation mode (no iteration), and in training mode inside
    ``parametrize.cached()``, where the weight is computed, and iterated, exactly once."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)
    originals = []
    for model in (ours, theirs):
        torch.manual_seed(5)
        originals.append(kind(model, name))
        model.eval()
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)
    for original in originals:  # a write to the parameter under the parametrization
        original.data.add_(fresh(original.shape, torch.Generator().manual_seed(6)))
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)
    for model in (ours, theirs):
        model.train()
    for _ in range(2):
        results = []
        for model in (ours, theirs):
            with parametrize.cached():
                results.append(run_with_grads(model, x, hx))
        assert_all_close(*results, TOL)
    assert_all_close(dict(ours.named_buffers()), dict(theirs.named_buffers()), TOL)


# ---------------------------------------------------------------- gradcheck

SMALL = {"input_size": 3, "hidden_size": 2}
SMALL_CONFIGS = {
    "1-layer": {"num_layers": 1},
    "2-layer-bi-proj": {"num_layers": 2, "bidirectional": True, "proj_size": 1},
}


def small_case(config: str):
    ours, theirs = twin_models(F64, **SMALL, **SMALL_CONFIGS[config])
    x = torch.randn(3, 2, SMALL["input_size"], dtype=F64, requires_grad=True)  # (T, B, I)
    hx = tuple(t.requires_grad_() for t in random_hx(ours))
    return ours, theirs, x, hx


@pytest.mark.parametrize("config", list(SMALL_CONFIGS))
def test_gradcheck_with_parameters_as_inputs(config):
    """gradcheck and gradgradcheck of ``functional_call(model, params, ...)`` in the input,
    the state and every parameter, whose values are first checked against nn.LSTM."""
    ours, theirs, x, hx = small_case(config)
    names = [name for name, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]

    def f(x, h0, c0, *weights):
        output, (h_n, c_n) = functional_call(
            ours, dict(zip(names, weights, strict=True)), (x, (h0, c0))
        )
        return output, h_n, c_n

    output, (h_n, c_n) = theirs(x, hx)
    assert_all_close(flat(f(x, *hx, *params)), flat((output, h_n, c_n)), TOL)
    inputs = (x, *hx, *params)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("config", list(SMALL_CONFIGS))
def test_gradcheck_perturbing_the_module_parameters(config):
    """gradcheck perturbs its inputs in place through ``.data``: here the inputs are the
    parameters the module itself holds, so each perturbed forward must read them anew."""
    ours, theirs, x, hx = small_case(config)
    output, (h_n, c_n) = theirs(x, hx)
    assert_all_close(flat(ours(x, hx)), flat((output, (h_n, c_n))), TOL)

    def f(*_weights):
        output, (h_n, c_n) = ours(x, hx)
        return output, h_n, c_n

    # full Jacobians for one weight; for all of them gradgradcheck's fast mode (random
    # projections of the same Jacobians), which keeps the test to a second
    assert torch.autograd.gradcheck(f, (ours.weight_hh_l0,))
    assert torch.autograd.gradgradcheck(f, (ours.weight_hh_l0,))
    assert torch.autograd.gradcheck(f, tuple(ours.parameters()))
    assert torch.autograd.gradgradcheck(f, tuple(ours.parameters()), fast_mode=True)


# ---------------------------------------------------------------- inference mode


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_built_and_run_in_inference_mode(config):
    x = torch.randn(T, B, IN, dtype=F64)
    with torch.inference_mode():
        ours, theirs = twins(FORWARD_CONFIGS[config])
        hx = random_hx(ours)
        for state in (None, hx, None):
            assert_all_close(flat(ours(x, state)), flat(theirs(x, state)), TOL)


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_run_in_inference_mode_between_training_calls(config):
    """Built outside, run outside, inside inference mode, then outside again with gradients:
    nothing made inside inference mode may leak into the later autograd call."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)
    with torch.inference_mode():
        for state in (hx, None):
            assert_all_close(flat(ours(x, state)), flat(theirs(x, state)), TOL)
    assert_all_close(run_with_grads(ours, x, hx), run_with_grads(theirs, x, hx), TOL)
    for grad in (True, False):  # and a fresh model whose first call is in inference mode
        ours, theirs = twins(FORWARD_CONFIGS[config])
        with torch.inference_mode():
            assert_all_close(flat(ours(x, hx)), flat(theirs(x, hx)), TOL)
        assert_all_close(
            forward_results(ours, x, hx, grad), forward_results(theirs, x, hx, grad), TOL
        )


@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_step_in_inference_mode(config):
    x = torch.randn(T, B, IN, dtype=F64)
    with torch.inference_mode():  # built and stepped inside
        ours, theirs = twins(STEP_CONFIGS[config])
        hx = random_hx(ours)
        assert_all_close(streamed(ours, x, hx, False), streamed(theirs, x, hx, False), TOL)
    ours, theirs = twins(STEP_CONFIGS[config])  # built outside, stepped inside, then outside
    hx = random_hx(ours)
    assert_streams_match(ours, theirs, x, hx)
    with torch.inference_mode():
        assert_all_close(streamed(ours, x, hx, False), streamed(theirs, x, hx, False), TOL)
    assert_streams_match(ours, theirs, x, hx)


# ---------------------------------------------------------------- torch.func


def detached_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def weighted_loss(generator_seed: int = 7):
    """A function of ``(output, h_n, c_n)``: a fixed random weighting of all three."""
    cache = {}

    def loss(output, h_n, c_n):
        total = 0
        for key, t in (("output", output), ("h_n", h_n), ("c_n", c_n)):
            if key not in cache:
                generator = torch.Generator().manual_seed(generator_seed + len(cache))
                cache[key] = torch.randn(t.shape, generator=generator, dtype=F64)
            total = total + (t * cache[key]).sum()
        return total

    return loss


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_func_grad(config):
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    h0, c0 = random_hx(ours)
    loss = weighted_loss()
    ours(x, (h0, c0))  # a first call outside the transform

    def grads(model):
        def f(params, x, h0, c0):
            output, (h_n, c_n) = functional_call(model, params, (x, (h0, c0)))
            return loss(output, h_n, c_n)

        transform = torch.func.grad_and_value(f, argnums=(0, 1, 2, 3))
        return transform(detached_params(model), x, h0, c0)

    assert_all_close(flat(grads(ours)), flat(grads(theirs)), TOL)


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_func_jacrev(config):
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(3, B, IN, dtype=F64)
    ours(x)

    def jacobians(model):
        def f(params, x):
            output, (h_n, c_n) = functional_call(model, params, (x,))
            return output, h_n, c_n

        return torch.func.jacrev(f, argnums=(0, 1))(detached_params(model), x)

    assert_all_close(flat(jacobians(ours)), flat(jacobians(theirs)), TOL)


# nn.LSTM's forward-mode derivative goes through torch.jit.script, which warns it is deprecated
JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@JIT_DEPRECATED
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_func_jvp(config):
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    tangent_x = torch.randn_like(x)
    tangent_hx = random_hx(ours)
    tangent_params = {k: torch.randn_like(v) for k, v in detached_params(ours).items()}
    ours(x, hx)

    def pushforward(model):
        def f(params, x, h0, c0):
            output, (h_n, c_n) = functional_call(model, params, (x, (h0, c0)))
            return output, h_n, c_n

        primals = (detached_params(model), x, *hx)
        return torch.func.jvp(f, primals, (tangent_params, tangent_x, *tangent_hx))

    assert_all_close(flat(pushforward(ours)), flat(pushforward(theirs)), TOL)


@JIT_DEPRECATED
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_forward_mode_ad_dual_numbers(config):
    """torch.autograd.forward_ad directly: dual input, state and weights."""
    fwad = torch.autograd.forward_ad
    ours, theirs = twins(FORWARD_CONFIGS[config])
    x = torch.randn(T, B, IN, dtype=F64)
    hx = random_hx(ours)
    tangents = [torch.randn_like(t) for t in (x, *hx)]
    tangent_params = {k: torch.randn_like(v) for k, v in detached_params(ours).items()}
    ours(x, hx)

    def pushforward(model):
        with fwad.dual_level():
            x_d, h0_d, c0_d = (
                fwad.make_dual(t, d) for t, d in zip((x, *hx), tangents, strict=True)
            )
            params = {
                k: fwad.make_dual(v, tangent_params[k]) for k, v in detached_params(model).items()
            }
            output, (h_n, c_n) = functional_call(model, params, (x_d, (h0_d, c0_d)))
            return [tuple(fwad.unpack_dual(t)) for t in (output, h_n, c_n)]

    assert_all_close(flat(pushforward(ours)), flat(pushforward(theirs)), TOL)


SEQUENCES = 4


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_func_vmap_over_sequences(config):
    """vmap of the model on one unbatched ``(L, H_in)`` sequence over a stack of them. nn.LSTM
    has no batching rule for vmap (``aten::lstm.input``), so its oracle is a loop."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    xs = torch.randn(SEQUENCES, T, IN, dtype=F64)
    h0s, c0s = (t.transpose(0, 1) for t in random_hx(ours, SEQUENCES))  # (N, D * layers, *)
    ours(xs[0])

    got = torch.func.vmap(ours)(xs)
    loop = [theirs(s) for s in xs]
    expected = (
        torch.stack([o for o, _ in loop]),
        tuple(torch.stack([s[k] for _, s in loop]) for k in (0, 1)),
    )
    assert_all_close(flat(got), flat(expected), TOL)

    got = torch.func.vmap(lambda s, h, c: ours(s, (h, c)))(xs, h0s, c0s)
    loop = [theirs(s, (h, c)) for s, h, c in zip(xs, h0s, c0s, strict=True)]
    expected = (
        torch.stack([o for o, _ in loop]),
        tuple(torch.stack([s[k] for _, s in loop]) for k in (0, 1)),
    )
    assert_all_close(flat(got), flat(expected), TOL)


@pytest.mark.parametrize("config", list(FORWARD_CONFIGS))
def test_func_vmap_of_grad_per_sequence_gradients(config):
    """Per-sequence parameter gradients, ``vmap(grad(...))``; the oracle is autograd.grad of
    nn.LSTM on each sequence in a loop (nn.LSTM cannot run under vmap)."""
    ours, theirs = twins(FORWARD_CONFIGS[config])
    xs = torch.randn(SEQUENCES, T, IN, dtype=F64)
    loss = weighted_loss()
    output, (h_n, c_n) = ours(xs[0])
    loss(output, h_n, c_n)  # draws the loss's weights outside vmap, which forbids randomness

    def f(params, x):
        output, (h_n, c_n) = functional_call(ours, params, (x,))
        return loss(output, h_n, c_n)

    got = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(detached_params(ours), xs)
    params = dict(theirs.named_parameters())
    per_sequence = []
    for s in xs:
        output, (h_n, c_n) = theirs(s)
        grads = torch.autograd.grad(loss(output, h_n, c_n), list(params.values()))
        per_sequence.append(dict(zip(params, grads, strict=True)))
    expected = {k: torch.stack([g[k] for g in per_sequence]) for k in params}
    assert_all_close(got, expected, TOL)


# ---------------------------------------------------------------- double backward

DOUBLE_CONFIGS = {
    "1-layer": {"num_layers": 1},
    "2-layer": {"num_layers": 2},
    "bi": {"num_layers": 1, "bidirectional": True},
    "2-layer-bi": {"num_layers": 2, "bidirectional": True},
    "proj": {"num_layers": 1, "proj_size": P},
    "2-layer-bi-proj": {"num_layers": 2, "bidirectional": True, "proj_size": P},
}
LENGTHS = torch.tensor([4, 5, 1])  # unsorted, one of full length
INPUT_KINDS = ["padded", "lengths", "packed"]


def run_kind(model, x, hx, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, h_n, c_n)`` of the padded ``x`` (``T, B, I``), for each input ``kind``:
    ``"padded"``, ``x`` as it is; ``"lengths"``, ``lengths=LENGTHS`` for lstmkit and for
    nn.LSTM a PackedSequence made from ``x`` whose output is padded back (zeros past each
    length); ``"packed"``, that PackedSequence for both, and its output's data."""
    if kind == "padded":
        output, (h_n, c_n) = model(x, hx)
        return output, h_n, c_n
    if kind == "lengths" and isinstance(model, lstmkit.LSTM):
        output, (h_n, c_n) = model(x, hx, lengths=LENGTHS)
        return output, h_n, c_n
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    output, (h_n, c_n) = model(packed, hx)
    assert isinstance(output, PackedSequence)
    if kind == "lengths":
        output = pad_packed_sequence(output, total_length=x.size(0))[0]
    else:
        output = output.data
    return output, h_n, c_n


def second_order(model, x, hx, kind: str) -> dict[str, torch.Tensor]:
    """The first-order gradients of a weighted sum of the outputs (made with
    ``create_graph=True``), and the gradients of their sum of squares with respect to the
    input, the initial state and every parameter."""
    names = ["input", "h_0", "c_0", *(n for n, _ in model.named_parameters())]
    leaves = [t.detach().clone().requires_grad_() for t in (x, *hx)]
    inputs = [*leaves, *model.parameters()]
    loss = weighted_loss(11)(*run_kind(model, leaves[0], tuple(leaves[1:]), kind))
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    input_penalty = first[0].pow(2).sum()
    second = torch.autograd.grad(penalty, inputs, retain_graph=True)
    second_input = torch.autograd.grad(input_penalty, inputs)
    results = {"loss": loss, "penalty": penalty}
    for name, g, gg, gx in zip(names, first, second, second_input, strict=True):
        results |= {f"d {name}": g, f"dd {name}": gg, f"dd(input) {name}": gx}
    return {k: v.detach() for k, v in results.items()}


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("config", list(DOUBLE_CONFIGS))
def test_double_backward_matches_nn_lstm(config, kind):
    """Gradients of gradients (``create_graph=True``) on the default backend: the gradient of
    the squared first-order gradients, and of the squared input gradient alone, with respect
    to the input, the state and every parameter, against nn.LSTM's."""
    ours, theirs = twins(DOUBLE_CONFIGS[config])
    x = torch.randn(T, len(LENGTHS), IN, dtype=F64)
    hx = random_hx(ours, len(LENGTHS))
    assert_all_close(second_order(ours, x, hx, kind), second_order(theirs, x, hx, kind), TOL)


@pytest.mark.parametrize("kind", ["padded", "lengths"])
@pytest.mark.parametrize("config", ["1-layer", "2-layer-bi-proj"])
@pytest.mark.parametrize("cell", ["layernorm", "peephole"])
def test_double_backward_variant_cells_match_reference(cell, config, kind):
    """nn.LSTM has no such cells: the oracle is lstmkit's own ``backend="reference"``."""
    options = {"input_size": IN, "hidden_size": H, "cell": cell, "dtype": F64}
    ours = lstmkit.LSTM(**options, **DOUBLE_CONFIGS[config])
    reference = lstmkit.LSTM(**options, **DOUBLE_CONFIGS[config], backend="reference")
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(T, len(LENGTHS), IN, dtype=F64)
    hx = random_hx(ours, len(LENGTHS))
    results = [second_order(m, x, hx, kind) for m in (ours, reference)]
    assert_all_close(*results, TOL)


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_built_on_meta_then_materialised(backend):
    """The meta-device pattern (build without memory, run for shapes, ``to_empty``, load real
    weights) works as with nn.LSTM, and the materialised model computes nn.LSTM's values."""
    ours = lstmkit.LSTM(3, 4, num_layers=2, device="meta", dtype=torch.float64, backend=backend)
    theirs = nn.LSTM(3, 4, num_layers=2, device="meta", dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    (out, (h_n, _)), (want, (h_want, _)) = ours(x.to("meta")), theirs(x.to("meta"))
    assert out.device.type == "meta" and (out.shape, h_n.shape) == (want.shape, h_want.shape)
    reference = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    for model in (ours, theirs):
        model.to_empty(device="cpu").load_state_dict(reference.state_dict())
    torch.testing.assert_close(ours(x)[0], reference(x)[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(theirs(x)[0], reference(x)[0], atol=1e-10, rtol=0)
