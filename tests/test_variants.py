"""The cell variants and the in-layer regularisers against independent oracles.

Every cell (``lstm``, ``layernorm``, ``peephole``, ``cifg``) is checked against a float64 NumPy
implementation of its published equations written here from the papers (no lstmkit code), on
whole stacked, bidirectional models, with and without lengths, on both backends. The
regularisers are checked for their evaluation-mode expectation, their masks (shape, values,
rate, one recurrent mask per sequence) and, in training, against the same NumPy loop fed the
masks that lstmkit drew (replayed from a fixed seed through :func:`lstmkit.runner.draw_masks`
and :func:`lstmkit.runner.drop_weights`).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit import runner
from lstmkit.backends import native

IN, H, P, T, B = 3, 4, 2, 5, 4
F64 = torch.float64
TOL = 1e-10
CELL_NAMES = ("lstm", "layernorm", "peephole", "cifg")
BACKENDS = ("reference", "auto")
LN_EPS = 1e-5


# ------------------------------------------------------------------ the NumPy oracle


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def layer_norm(v, gain, shift):
    """Ba et al. (2016): normalise the whole vector (biased variance), then gain and shift."""
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    return gain * (v - mean) / np.sqrt(var + LN_EPS) + shift


def blocks(v, count):
    size = v.shape[0] // count
    return [v[k * size : (k + 1) * size] for k in range(count)]


def summed_bias(p, rows):
    if p["bias_ih"] is None:
        return np.zeros(rows)
    return p["bias_ih"] + p["bias_hh"]


def project(m, p):
    """LSTMP (Sak et al. 2014): ``h = W_hr m`` when there is a projection."""
    return m if p["weight_hr"] is None else p["weight_hr"] @ m


def step_lstm(x, h, c, p):
    """Hochreiter & Schmidhuber (1997) with the forget gate of Gers et al. (2000)."""
    z = p["weight_ih"] @ x + p["weight_hh"] @ h + summed_bias(p, p["weight_ih"].shape[0])
    zi, zf, zg, zo = blocks(z, 4)
    c_new = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zg)
    return project(sigmoid(zo) * np.tanh(c_new), p), c_new


def step_layernorm(x, h, c, p):
    """Ba, Kiros & Hinton (2016), section 3.1: LN of each product over all 4H gates, and of
    the new cell state (over H) before its tanh; the state carried on is the raw ``c``."""
    z = (
        layer_norm(p["weight_ih"] @ x, p["ln_ih_weight"], p["ln_ih_bias"])
        + layer_norm(p["weight_hh"] @ h, p["ln_hh_weight"], p["ln_hh_bias"])
        + summed_bias(p, p["weight_ih"].shape[0])
    )
    zi, zf, zg, zo = blocks(z, 4)
    c_new = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zg)
    m = sigmoid(zo) * np.tanh(layer_norm(c_new, p["ln_c_weight"], p["ln_c_bias"]))
    return project(m, p), c_new


def step_peephole(x, h, c, p):
    """Gers & Schmidhuber (2000): i and f peek at c_{t-1}, o at c_t."""
    z = p["weight_ih"] @ x + p["weight_hh"] @ h + summed_bias(p, p["weight_ih"].shape[0])
    zi, zf, zg, zo = blocks(z, 4)
    p_i, p_f, p_o = blocks(p["weight_ch"], 3)
    i = sigmoid(zi + p_i * c)
    f = sigmoid(zf + p_f * c)
    c_new = f * c + i * np.tanh(zg)
    o = sigmoid(zo + p_o * c_new)
    return project(o * np.tanh(c_new), p), c_new


def step_cifg(x, h, c, p):
    """Greff et al. (2017): three blocks (f, g, o) and the input gate coupled as 1 - f."""
    z = p["weight_ih"] @ x + p["weight_hh"] @ h + summed_bias(p, p["weight_ih"].shape[0])
    zf, zg, zo = blocks(z, 3)
    f = sigmoid(zf)
    c_new = f * c + (1.0 - f) * np.tanh(zg)
    return project(sigmoid(zo) * np.tanh(c_new), p), c_new


STEPS = {
    "lstm": step_lstm,
    "layernorm": step_layernorm,
    "peephole": step_peephole,
    "cifg": step_cifg,
}
KINDS = (
    "weight_ih",
    "weight_hh",
    "bias_ih",
    "bias_hh",
    "weight_hr",
    "ln_ih_weight",
    "ln_ih_bias",
    "ln_hh_weight",
    "ln_hh_bias",
    "ln_c_weight",
    "ln_c_bias",
    "weight_ch",
)


def numpy_params(model, layer, direction, overrides=None):
    """One layer-direction's parameters read from ``state_dict`` by name, ``None`` if absent."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    params = {kind: state.get(kind + suffix) for kind in KINDS}
    return params | (overrides or {})


def _zone(new, old, zone, s, b):
    """Zoneout: keep ``old`` where the step-``s`` mask of row ``b`` says so (training), or move
    by the expectation ``p old + (1 - p) new`` (evaluation, ``zone`` is the float p)."""
    if zone is None:
        return new
    if isinstance(zone, float):
        return zone * old + (1.0 - zone) * new
    return np.where(zone[s, b], old, new)


def numpy_lstm(
    step,
    params,
    x,
    h0,
    c0,
    *,
    layers,
    directions,
    lengths=None,
    recurrent=None,
    zoneout=None,
):
    """A whole stacked, possibly bidirectional model, one sequence and one step at a time.

    ``params(layer, direction)`` gives a layer-direction's parameters; ``x`` ``(T, B, I)``,
    ``h0`` ``(L*D, B, P)``, ``c0`` ``(L*D, B, H)``. Sequence ``b`` runs its first
    ``lengths[b]`` steps (the reverse direction from its own last one) and outputs zeros after.
    ``recurrent[k]`` ``(B, P)`` multiplies ``h_{t-1}`` before the recurrent product of
    layer-direction ``k``; ``zoneout[k]`` is ``(z_h, z_c)``, each a float (evaluation) or a
    bool ``(T, B, .)`` mask indexed by the step count of that direction's loop.
    """
    steps, batch = x.shape[:2]
    lengths = [steps] * batch if lengths is None else list(lengths)
    layer_input, h_n, c_n = x, [], []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            p = params(layer, direction)
            z_h, z_c = (None, None) if zoneout is None else zoneout[k]
            out = np.zeros((steps, batch, h0.shape[2]))
            h_last, c_last = h0[k].copy(), c0[k].copy()
            for b in range(batch):
                h, c = h0[k, b], c0[k, b]
                times = range(lengths[b])
                for s, t in enumerate(reversed(times) if direction else times):
                    h_in = h if recurrent is None else h * recurrent[k][b]
                    h_new, c_new = step(layer_input[t, b], h_in, c, p)
                    h = _zone(h_new, h, z_h, s, b)
                    c = _zone(c_new, c, z_c, s, b)
                    out[t, b] = h
                h_last[b], c_last[b] = h, c
            outputs.append(out)
            h_n.append(h_last)
            c_n.append(c_last)
        layer_input = np.concatenate(outputs, axis=2)
    return layer_input, np.stack(h_n), np.stack(c_n)


def oracle(model, x, hx, overrides=None, **kwargs):
    """:func:`numpy_lstm` on ``model``'s parameters and configuration."""
    directions = 2 if model.bidirectional else 1
    return numpy_lstm(
        STEPS[model.cell.name],
        lambda layer, d: numpy_params(model, layer, d, (overrides or {}).get((layer, d))),
        x.numpy(),
        hx[0].numpy(),
        hx[1].numpy(),
        layers=model.num_layers,
        directions=directions,
        **kwargs,
    )


def assert_matches(ours, expected, tol=TOL):
    output, (h_n, c_n) = ours
    for name, a, e in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), e, rtol=tol, atol=tol, err_msg=name)


# ------------------------------------------------------------------ model helpers


def make_model(cell, seed=0, **config):
    """A float64 lstmkit.LSTM with every parameter random, LayerNorm gains and shifts too (they
    start at 1 and 0, which would hide a missing or misplaced gain)."""
    config = {"num_layers": 2, "bidirectional": True} | config
    torch.manual_seed(seed)
    model = lstmkit.LSTM(IN, H, cell=cell, dtype=F64, **config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("ln_") and "_weight" in name:
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
            elif name.startswith("ln_"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def make_hx(model, batch=B):
    states = model.num_layers * (2 if model.bidirectional else 1)
    out = model.proj_size or model.hidden_size
    return (
        torch.randn(states, batch, out, dtype=F64),
        torch.randn(states, batch, model.hidden_size, dtype=F64),
    )


# ------------------------------------------------------------------ cells vs their equations


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj", [0, P])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cell_matches_published_equations(cell, proj, backend):
    """Two layers, both directions, random hx; ``auto`` runs ``lstm`` on the fused backend."""
    model = make_model(cell, proj_size=proj, backend=backend)
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    assert_matches(model(x, hx), oracle(model, x, hx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cell_with_lengths_matches_published_equations(cell, backend):
    """Unsorted lengths: each sequence runs its own steps only, padding outputs zero."""
    model = make_model(cell, proj_size=P, backend=backend)
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    lengths = [3, 5, 1, 4]
    assert_matches(model(x, hx, lengths=lengths), oracle(model, x, hx, lengths=lengths))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_cell_without_bias_matches_published_equations(cell, backend):
    model = make_model(cell, bias=False, backend=backend)
    assert not any("bias_ih" in name or "bias_hh" in name for name in model.state_dict())
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    assert_matches(model(x, hx), oracle(model, x, hx))


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_every_parameter_changes_the_output(cell):
    """A control for the oracle: perturbing any parameter changes the output (randomly, not
    by a constant: LayerNorm rightly ignores a shift of all of ``W_ih``'s rows alike)."""
    model = make_model(cell)
    x = torch.randn(T, B, IN, dtype=F64)
    before = model(x)[0]
    for name, param in model.named_parameters():
        with torch.no_grad():
            saved = param.clone()
            param.add_(0.1 * torch.randn_like(param))
            assert not torch.allclose(model(x)[0], before), name
            param.copy_(saved)


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_extra_parameter_names_and_shapes(cell):
    model = lstmkit.LSTM(IN, H, num_layers=2, bidirectional=True, proj_size=P, cell=cell)
    gates = 3 if cell == "cifg" else 4
    extra = {
        "lstm": {},
        "layernorm": {
            "ln_ih_weight": (gates * H,),
            "ln_ih_bias": (gates * H,),
            "ln_hh_weight": (gates * H,),
            "ln_hh_bias": (gates * H,),
            "ln_c_weight": (H,),
            "ln_c_bias": (H,),
        },
        "peephole": {"weight_ch": (3 * H,)},
        "cifg": {},
    }[cell]
    expected = {}
    for layer in range(2):
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            layer_in = IN if layer == 0 else 2 * P
            expected |= {
                "weight_ih" + suffix: (gates * H, layer_in),
                "weight_hh" + suffix: (gates * H, P),
                "bias_ih" + suffix: (gates * H,),
                "bias_hh" + suffix: (gates * H,),
                "weight_hr" + suffix: (P, H),
            }
            expected |= {kind + suffix: shape for kind, shape in extra.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    for name, value in model.state_dict().items():  # LayerNorm starts as the identity
        if name.startswith("ln_"):
            assert torch.equal(value, torch.full_like(value, 1.0 if "_weight" in name else 0.0))


# ------------------------------------------------------------------ lengths vs PackedSequence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_lengths_equal_packed_sequence(cell, backend):
    model = make_model(cell, proj_size=P if cell in ("lstm", "peephole") else 0, backend=backend)
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    lengths = torch.tensor([2, 5, 1, 4])
    out, (h_n, c_n) = model(x, hx, lengths=lengths)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_packed, (h_p, c_p) = model(packed, hx)
    out_p, lengths_p = pad_packed_sequence(out_packed, total_length=T)
    assert torch.equal(lengths_p, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[:n, b], out_p[:n, b], rtol=TOL, atol=TOL)
        assert torch.equal(out[n:, b], torch.zeros_like(out[n:, b]))
    torch.testing.assert_close(h_n, h_p, rtol=TOL, atol=TOL)
    torch.testing.assert_close(c_n, c_p, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------ forget_bias


@pytest.mark.parametrize(("cell", "block", "gates"), [
    ("lstm", 1, 4),
    ("layernorm", 1, 4),
    ("peephole", 1, 4),
    ("cifg", 0, 3),
])  # fmt: skip
def test_forget_bias_raises_exactly_the_forget_block(cell, block, gates):
    plain = make_model(cell, seed=3)
    raised = make_model(cell, seed=3, forget_bias=1.5)
    before, after = plain.state_dict(), raised.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        if not name.startswith("bias_ih"):
            assert torch.equal(before[name], after[name]), name
            continue
        expected = before[name].clone().view(gates, H)
        expected[block] += 1.5
        assert torch.equal(after[name], expected.view(-1)), name
        others = [k for k in range(gates) if k != block]
        assert torch.equal(after[name].view(gates, H)[others], before[name].view(gates, H)[others])


@pytest.mark.parametrize("cell", CELL_NAMES)
def test_forget_bias_needs_a_bias(cell):
    with pytest.raises(ValueError, match=re.escape("forget_bias=1.0 needs bias=True")) as info:
        lstmkit.LSTM(IN, H, bias=False, cell=cell, forget_bias=1.0)
    assert "got bias=False" in str(info.value)
    assert f"cell={cell!r}" in str(info.value)


# ------------------------------------------------------------------ regularisers: evaluation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_eval_dropouts_are_no_ops_and_deterministic(cell, backend):
    """In evaluation recurrent dropout and weight drop change nothing: two calls are equal
    exactly, and equal a twin without the regularisers (same backend choice, same numbers)."""
    regularised = make_model(cell, recurrent_dropout=0.4, weight_drop=0.3, backend=backend)
    plain = make_model(cell, backend=backend)
    regularised.eval()
    plain.eval()
    plain.load_state_dict(regularised.state_dict())
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(plain)
    first, (h1, c1) = regularised(x, hx)
    second, (h2, c2) = regularised(x, hx)
    expected, (h3, c3) = plain(x, hx)
    for a, b, c in ((first, second, expected), (h1, h2, h3), (c1, c2, c3)):
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert_matches((first, (h1, c1)), oracle(regularised, x, hx))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_zoneout_eval_is_the_expectation(cell, backend):
    """``h_t = p_h h_{t-1} + (1 - p_h) h~_t`` and the same for ``c`` with ``p_c``, where
    ``h~_t, c~_t`` is the cell's step from the previous (zoned) state; with lengths."""
    proj = P if cell != "cifg" else 0
    model = make_model(cell, proj_size=proj, zoneout=(0.3, 0.6), backend=backend).eval()
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    lengths = [4, 5, 2, 5]
    first = model(x, hx, lengths=lengths)
    second = model(x, hx, lengths=lengths)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][0], second[1][0])
    assert torch.equal(first[1][1], second[1][1])
    zones = {k: (0.3, 0.6) for k in range(4)}
    assert_matches(first, oracle(model, x, hx, lengths=lengths, zoneout=zones))
    # control: without zoneout the numbers differ, so the check above has teeth
    no_zone = oracle(model, x, hx, lengths=lengths)
    assert not np.allclose(first[0].detach().numpy(), no_zone[0])


# ------------------------------------------------------------------ regularisers: masks


def test_draw_masks_recurrent_shape_and_values():
    p = 0.25
    reg = runner.Regularizers(recurrent_dropout=p)
    h0, c0 = torch.zeros(6, P, dtype=F64), torch.zeros(6, H, dtype=F64)
    masks = runner.draw_masks(reg, True, T, h0, c0)
    assert masks.recurrent.shape == (6, P)
    assert masks.recurrent.dtype == F64
    values = set(masks.recurrent.unique().tolist())
    assert values <= {0.0, 1.0 / (1.0 - p)}
    assert masks.zoneout_h is None and masks.zoneout_c is None
    evaluation = runner.draw_masks(reg, False, T, h0, c0)
    assert evaluation.recurrent is None and not evaluation.active()


def _drawn(kind, p):
    """A large sample of one regulariser's mask; returns (the mask, whether an entry is
    dropped / zoned out)."""
    batch, units = 4000, 64
    torch.manual_seed(11)
    h0, c0 = torch.zeros(batch, units, dtype=F64), torch.zeros(batch, units, dtype=F64)
    if kind == "weight_drop":
        weight = torch.ones(batch, units, dtype=F64)
        mask = runner.drop_weights({"weight_hh": weight}, p, True)["weight_hh"]
        return mask, mask == 0
    # every other regulariser on at a different rate, so that a mix-up shows
    rates = {"recurrent_dropout": 0.05, "zoneout_h": 0.15, "zoneout_c": 0.25} | {kind: p}
    masks = runner.draw_masks(runner.Regularizers(**rates), True, 1, h0, c0)
    if kind == "recurrent_dropout":
        return masks.recurrent, masks.recurrent == 0
    zone = masks.zoneout_h if kind == "zoneout_h" else masks.zoneout_c
    assert zone.dtype == torch.bool and zone.shape == (1, batch, units)
    return zone, zone


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["recurrent_dropout", "weight_drop", "zoneout_h", "zoneout_c"])
def test_observed_rate_matches_p(kind, p):
    """The fraction dropped (zoned out, for zoneout) lies within 4 standard deviations
    ``sqrt(p (1 - p) / N)`` of ``p``; kept dropout entries are scaled by ``1 / (1 - p)``."""
    mask, dropped = _drawn(kind, p)
    n = dropped.numel()
    rate = dropped.double().mean().item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n), rate
    if kind in ("recurrent_dropout", "weight_drop"):
        kept = mask[~dropped]
        assert torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - p)))


def test_recurrent_mask_is_the_same_at_every_step():
    """Behavioural, without replaying the RNG. ``weight_hh`` is zero except its column 0, so
    ``h_{t-1}`` reaches the gates only through unit 0. A twin with ``weight_hh = 0`` (in eval)
    gives what a sequence computes when unit 0 is dropped. With one mask per sequence each
    sequence either equals the twin at *every* step (unit 0 dropped) or at *none* (kept); a
    mask drawn per step would mix the two within most sequences (all 6 steps alike has
    probability 2 / 2^6). The fraction of dropped sequences is within 4 sd of p."""
    p, batch, steps = 0.5, 400, 6
    torch.manual_seed(7)
    model = lstmkit.LSTM(IN, H, dtype=F64, recurrent_dropout=p, backend="reference")
    twin = lstmkit.LSTM(IN, H, dtype=F64, backend="reference").eval()
    with torch.no_grad():
        model.weight_hh_l0[:, 1:] = 0.0
        model.weight_hh_l0[:, 0] = 1.0 + torch.rand(4 * H, dtype=F64)
        twin.load_state_dict(model.state_dict())
        twin.weight_hh_l0.zero_()
    x = torch.randn(steps, batch, IN, dtype=F64)
    hx = (torch.randn(1, batch, H, dtype=F64) + 2.0, torch.randn(1, batch, H, dtype=F64))
    model.train()
    out = model(x, hx)[0]
    same = (out == twin(x, hx)[0]).all(dim=2)  # (T, B): step equals the dropped-unit twin
    constant = same.all(dim=0) | (~same).all(dim=0)
    assert bool(constant.all()), f"{int((~constant).sum())} sequences changed mask mid-way"
    rate = same[0].double().mean().item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / batch), rate


def _replay(model, hx, steps, seed):
    """The masks lstmkit draws in a training forward, re-drawn from ``seed`` in the runner's
    order: per layer-direction, draw_masks then drop_weights on weight_hh."""
    torch.manual_seed(seed)
    drawn = []
    directions = 2 if model.bidirectional else 1
    for k in range(model.num_layers * directions):
        masks = runner.draw_masks(model.regularizers, True, steps, hx[0][k], hx[1][k])
        layer, direction = divmod(k, directions)
        name = f"weight_hh_l{layer}" + ("_reverse" if direction else "")
        ones = {"weight_hh": torch.ones_like(getattr(model, name))}
        weight = runner.drop_weights(ones, model.regularizers.weight_drop, True)["weight_hh"]
        drawn.append((masks, weight))
    return drawn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_recurrent_dropout_training_matches_one_mask_per_sequence(cell, backend):
    """Training output equals the NumPy loop that multiplies ``h_{t-1}`` by one replayed
    ``(B, P)`` mask at every step of each layer-direction."""
    model = make_model(cell, proj_size=P, recurrent_dropout=0.4, backend=backend).train()
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    torch.manual_seed(21)
    ours = model(x, hx)
    drawn = _replay(model, hx, T, seed=21)
    recurrent = {k: masks.recurrent.numpy() for k, (masks, _) in enumerate(drawn)}
    assert all(set(np.unique(m)) <= {0.0, 1.0 / 0.6} for m in recurrent.values())
    assert_matches(ours, oracle(model, x, hx, recurrent=recurrent))
    # control: the masks matter
    assert not np.allclose(ours[0].detach().numpy(), oracle(model, x, hx)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELL_NAMES)
@pytest.mark.parametrize("zoneout", [(0.5, 0.3), (0.999, 0.999)])
def test_zoneout_training_matches_replayed_masks(cell, zoneout, backend):
    """Training zoneout equals ``h_t = where(mask_t, h_{t-1}, h~_t)`` (same for c) with the
    replayed masks. At p = 0.999 the state barely moves: nearly every unit keeps h_0 / c_0."""
    model = make_model(cell, zoneout=zoneout, backend=backend).train()
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    torch.manual_seed(5)
    ours = model(x, hx)
    drawn = _replay(model, hx, T, seed=5)
    zones = {k: (m.zoneout_h.numpy(), m.zoneout_c.numpy()) for k, (m, _) in enumerate(drawn)}
    assert_matches(ours, oracle(model, x, hx, zoneout=zones))
    _, (h_n, c_n) = ours
    moved_h = (h_n != hx[0]).double().mean().item()
    moved_c = (c_n != hx[1]).double().mean().item()
    if zoneout[0] > 0.99:
        assert moved_h <= 0.05 and moved_c <= 0.05, (moved_h, moved_c)
    else:
        assert moved_h >= 0.5 and moved_c >= 0.5, (moved_h, moved_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_drop_training_keeps_the_parameter_and_masks_its_gradient(backend):
    """DropConnect acts on a copy: the parameter is the same object with the same value and
    state_dict keys after forward and backward, and it gets the gradient of the dropped copy
    times the mask (so exactly zero where the replayed mask dropped)."""
    p = 0.5
    model = make_model("lstm", num_layers=1, proj_size=P, weight_drop=p, backend=backend)
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    names = ("weight_hh_l0", "weight_hh_l0_reverse")
    params = {name: getattr(model, name) for name in names}
    values = {name: param.detach().clone() for name, param in params.items()}
    keys = list(model.state_dict())
    weights = torch.randn(T, B, 2 * P, dtype=F64)

    model.train()
    torch.manual_seed(9)
    output, _ = model(x, hx)
    (output * weights).sum().backward()
    masks = [weight for _, weight in _replay(model, hx, T, seed=9)]

    assert list(model.state_dict()) == keys
    named = dict(model.named_parameters())
    for name, mask in zip(names, masks, strict=True):
        assert getattr(model, name) is params[name] and named[name] is params[name]
        assert torch.equal(params[name].detach(), values[name])
        assert params[name].grad is not None
        assert bool((params[name].grad[mask == 0] == 0).all())
        assert bool((params[name].grad[mask != 0] != 0).all())

    # the forward used the dropped weights ...
    dropped = {name: values[name] * mask for name, mask in zip(names, masks, strict=True)}
    overrides = {(0, d): {"weight_hh": dropped[name].numpy()} for d, name in enumerate(names)}
    np.testing.assert_allclose(
        output.detach().numpy(), oracle(model, x, hx, overrides)[0], rtol=TOL, atol=TOL
    )
    # ... and the gradient is d(loss)/d(dropped copy) * mask
    leaves = {name: w.clone().requires_grad_() for name, w in dropped.items()}
    model.eval()
    out_eval, _ = torch.func.functional_call(model, leaves, (x, hx))
    (out_eval * weights).sum().backward()
    for name, mask in zip(names, masks, strict=True):
        expected = leaves[name].grad * mask
        torch.testing.assert_close(params[name].grad, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["layernorm", "peephole", "cifg"])
def test_weight_drop_training_matches_oracle(cell, backend):
    model = make_model(cell, weight_drop=0.3, backend=backend).train()
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(model)
    torch.manual_seed(4)
    ours = model(x, hx)
    drawn = _replay(model, hx, T, seed=4)
    overrides = {}
    for k, (_, mask) in enumerate(drawn):
        layer, d = divmod(k, 2)
        name = f"weight_hh_l{layer}" + ("_reverse" if d else "")
        overrides[(layer, d)] = {"weight_hh": (getattr(model, name) * mask).detach().numpy()}
    assert_matches(ours, oracle(model, x, hx, overrides))


REGULARISER_CASES = [
    ({}, True),
    ({"weight_drop": 0.3}, True),
    ({"recurrent_dropout": 0.3}, False),
    ({"recurrent_dropout": 0.3}, True),
    ({"zoneout_h": 0.3}, False),
    ({"zoneout_c": 0.3}, True),
]


@pytest.mark.parametrize(("regularizers", "training"), REGULARISER_CASES)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_auto_backend_is_fused_where_supported(cell, regularizers, training):
    """``auto`` picks ``native`` where it is available and supports the cell and masks, else
    ``fused`` exactly where the fused backend supports them, ``reference`` otherwise. Every
    built-in cell with any regulariser runs natively where the extension loads; the standard
    LSTM without in-loop masks (weight drop is applied before the loop; recurrent dropout is
    off in eval) is always native or fused; ``cifg``, which the fused backend lacks, is native
    or reference."""
    reg = runner.Regularizers(**regularizers)
    h0, c0 = torch.zeros(B, H, dtype=F64), torch.zeros(B, H, dtype=F64)
    masks = runner.draw_masks(reg, training, T, h0, c0)
    cell_object = lstmkit.cells.CELLS[cell]
    chosen = runner.choose_backend("auto", cell_object, masks)
    # what each backend runs, written here rather than asked of the backends: every built-in
    # cell natively, all but cifg fused, with any regulariser
    native_runs = lstmkit.native_available()[0]
    fused_runs = cell != "cifg"
    assert native.supports(cell_object, masks) is True
    assert runner.BACKENDS["fused"].supports(cell_object, masks) is fused_runs
    assert chosen == ("native" if native_runs else "fused" if fused_runs else "reference")
    if cell == "lstm" and not masks.active():
        assert chosen in ("native", "fused")
    if lstmkit.native_available()[0]:
        assert chosen == "native"
    if cell == "cifg":
        assert chosen in ("native", "reference")
    assert runner.choose_backend("reference", cell_object, masks) == "reference"


@pytest.mark.parametrize(("regularizers", "training"), REGULARISER_CASES)
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_explicit_fused_backend_runs_or_refuses_clearly(cell, regularizers, training):
    """``backend="fused"`` either equals the reference backend (same seed, same masks) at
    1e-10, or raises a ValueError naming the backend and the cell."""
    options = {
        "recurrent_dropout": regularizers.get("recurrent_dropout", 0.0),
        "weight_drop": regularizers.get("weight_drop", 0.0),
        "zoneout": (regularizers.get("zoneout_h", 0.0), regularizers.get("zoneout_c", 0.0)),
    }
    fused = make_model(cell, proj_size=P, backend="fused", **options).train(training)
    reference = make_model(cell, proj_size=P, backend="reference", **options).train(training)
    x = torch.randn(T, B, IN, dtype=F64)
    hx = make_hx(fused)
    h0, c0 = torch.zeros(B, P, dtype=F64), torch.zeros(B, H, dtype=F64)
    masks = runner.draw_masks(fused.regularizers, training, T, h0, c0)
    if not runner.BACKENDS["fused"].supports(fused.cell, masks):
        expected = f"backend='fused' cannot run cell={cell!r}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            fused(x, hx)
        return
    torch.manual_seed(8)
    out, (h_n, c_n) = fused(x, hx)
    torch.manual_seed(8)
    out_r, (h_r, c_r) = reference(x, hx)
    torch.testing.assert_close(out, out_r, rtol=TOL, atol=TOL)
    torch.testing.assert_close(h_n, h_r, rtol=TOL, atol=TOL)
    torch.testing.assert_close(c_n, c_r, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------ bad option values


BAD_RATES = [
    (-0.1, ValueError, "must be in [0, 1), got -0.1"),
    (1.0, ValueError, "must be in [0, 1), got 1.0"),
    ("0.1", TypeError, "must be a float in [0, 1), got '0.1' (str)"),
    (True, TypeError, "must be a float in [0, 1), got True (bool)"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD_RATES)
@pytest.mark.parametrize("option", ["recurrent_dropout", "weight_drop", "zoneout"])
def test_bad_rates(option, value, error, message):
    with pytest.raises(error, match=re.escape(option) + ".*" + re.escape(message)):
        lstmkit.LSTM(IN, H, **{option: value})


@pytest.mark.parametrize(("value", "which"), [((0.1, 1.0), "c"), ((-0.1, 0.1), "h")])
def test_bad_zoneout_pair(value, which):
    with pytest.raises(ValueError, match=re.escape(f"zoneout (for {which}) must be in [0, 1)")):
        lstmkit.LSTM(IN, H, zoneout=value)


@pytest.mark.parametrize("value", [(0.1,), (0.1, 0.2, 0.3)])
def test_zoneout_tuple_of_wrong_length_names_the_argument(value):
    expected = f"zoneout must be a float or a pair (for h, for c), got {len(value)} values"
    with pytest.raises(ValueError, match=re.escape(expected)):
        lstmkit.LSTM(IN, H, zoneout=value)


def test_unknown_cell_name():
    expected = (
        "cell must be one of 'lstm', 'layernorm', 'peephole', 'cifg' or a lstmkit.cells.Cell "
        "instance, got 'gru'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        lstmkit.LSTM(IN, H, cell="gru")


@pytest.mark.parametrize(
    ("value", "shown"),
    [(3, "3 (int)"), (lstmkit.cells.LayerNorm, "the class LayerNorm: pass cell=LayerNorm()")],
)
def test_cell_of_wrong_type_message(value, shown):
    with pytest.raises(TypeError) as info:
        lstmkit.LSTM(IN, H, cell=value)
    assert "cell must be one of 'lstm'" in str(info.value)
    assert "or a lstmkit.cells.Cell instance" in str(info.value)
    assert str(info.value).endswith(f"got {shown}")


@pytest.mark.parametrize(
    ("value", "shown"), [("1", "'1' (str)"), (None, "None (NoneType)"), (True, "True (bool)")]
)
def test_forget_bias_must_be_a_number(value, shown):
    expected = f"forget_bias must be a real number, got {shown}"
    with pytest.raises(TypeError, match=re.escape(expected)):
        lstmkit.LSTM(IN, H, forget_bias=value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_forget_bias_must_be_finite(value):
    with pytest.raises(ValueError, match=re.escape(f"forget_bias must be finite, got {value}")):
        lstmkit.LSTM(IN, H, forget_bias=value)


def test_fused_backend_rejects_cifg():
    model = lstmkit.LSTM(IN, H, cell="cifg", backend="fused", dtype=F64)
    with pytest.raises(ValueError, match=re.escape("backend='fused' cannot run cell='cifg'")):
        model(torch.randn(T, B, IN, dtype=F64))
