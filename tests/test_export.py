"""lstmkit.export.to_onnx: the exported graph, run in onnxruntime on batch sizes and lengths
never seen at export, against lstmkit's own forward; onnx.checker on every file; the clear
errors for what cannot be exported."""

from __future__ import annotations

import itertools

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
np = pytest.importorskip("numpy")

import lstmkit  # noqa: E402
from lstmkit import cells  # noqa: E402
from lstmkit.export import to_onnx  # noqa: E402

TOL = 1e-5
INPUT, HIDDEN = 3, 4
# (batch, sequence length) pairs to run; nothing about them is fixed at export
RUNS = ((1, 1), (3, 6), (5, 2))


def _session(path) -> ort.InferenceSession:
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _lengths(batch: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Unsorted lengths in [1, steps] that include ``steps`` (and 1 when batch > 1)."""
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    if batch > 1:
        lengths[-1] = 1
    return lengths[torch.randperm(batch, generator=generator)]


def _compare(model, session, include_lengths, include_state, generator):
    directions = 2 if model.bidirectional else 1
    states = directions * model.num_layers
    for batch, steps in RUNS:
        shape = (batch, steps, INPUT) if model.batch_first else (steps, batch, INPUT)
        x = torch.randn(shape, generator=generator)
        feeds = {"input": x.numpy()}
        kwargs = {}
        if include_lengths:
            lengths = _lengths(batch, steps, generator)
            feeds["lengths"] = lengths.numpy().astype(np.int32)
            kwargs["lengths"] = lengths
        hx = None
        if include_state:
            hx = tuple(torch.randn(states, batch, HIDDEN, generator=generator) for _ in range(2))
            feeds["h0"], feeds["c0"] = hx[0].numpy(), hx[1].numpy()
        with torch.no_grad():
            output, (h_n, c_n) = model(x, hx, **kwargs)
        got = session.run(["output", "h_n", "c_n"], feeds)
        for name, want, have in zip(("output", "h_n", "c_n"), (output, h_n, c_n), got, strict=True):
            assert have.shape == tuple(want.shape), (name, batch, steps)
            np.testing.assert_allclose(have, want.numpy(), rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_lstmkit(tmp_path, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(num_layers * 8 + bidirectional * 4 + batch_first * 2 + bias)
    model = lstmkit.LSTM(
        INPUT,
        HIDDEN,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
    ).eval()
    generator = torch.Generator().manual_seed(0)
    for include_lengths, include_state in itertools.product([False, True], repeat=2):
        path = tmp_path / f"lstm_{include_lengths}_{include_state}.onnx"
        to_onnx(model, path, include_lengths=include_lengths, include_state=include_state)
        session = _session(path)
        names = [i.name for i in session.get_inputs()]
        assert names == ["input"] + ["lengths"] * include_lengths + ["h0", "c0"] * include_state
        _compare(model, session, include_lengths, include_state, generator)


def test_dynamic_dimensions_are_symbolic(tmp_path):
    model = lstmkit.LSTM(INPUT, HIDDEN, batch_first=True, bidirectional=True)
    proto = to_onnx(model, tmp_path / "m.onnx", include_lengths=True, include_state=True)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*proto.graph.input, *proto.graph.output]
    }
    assert dims == {
        "input": ["batch", "sequence", INPUT],
        "lengths": ["batch"],
        "h0": [2, "batch", HIDDEN],
        "c0": [2, "batch", HIDDEN],
        "output": ["batch", "sequence", 2 * HIDDEN],
        "h_n": [2, "batch", HIDDEN],
        "c_n": [2, "batch", HIDDEN],
    }
    assert [n.op_type for n in proto.graph.node].count("LSTM") == 1


@pytest.mark.parametrize("opset_version", [14, 21])
def test_opsets(tmp_path, opset_version):
    torch.manual_seed(1)
    model = lstmkit.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True).eval()
    path = tmp_path / "m.onnx"
    proto = to_onnx(
        model, path, include_lengths=True, include_state=True, opset_version=opset_version
    )
    assert proto.opset_import[0].version == opset_version
    _compare(model, _session(path), True, True, torch.Generator().manual_seed(2))


def test_exports_evaluation_semantics_and_keeps_training_mode(tmp_path):
    torch.manual_seed(2)
    model = lstmkit.LSTM(
        INPUT, HIDDEN, num_layers=2, dropout=0.5, recurrent_dropout=0.3, weight_drop=0.2
    ).train()
    path = tmp_path / "m.onnx"
    to_onnx(model, path, include_lengths=True)
    assert model.training
    _compare(model.eval(), _session(path), True, False, torch.Generator().manual_seed(3))


def test_path_none_returns_the_model_without_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proto = to_onnx(lstmkit.LSTM(INPUT, HIDDEN), None)
    assert isinstance(proto, onnx.ModelProto)
    assert list(tmp_path.iterdir()) == []


class _MyCell(cells.LSTM):
    """A subclass of the standard cell: its step could be anything, so it is not exported."""

    name = "lstm"


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"proj_size": 2}, NotImplementedError, r"projection \(proj_size=2\)"),
        ({"cell": "layernorm"}, NotImplementedError, "cell='layernorm'"),
        ({"cell": "peephole"}, NotImplementedError, "cell='peephole'"),
        ({"cell": "cifg"}, NotImplementedError, "cell='cifg'"),
        ({"cell": _MyCell()}, NotImplementedError, "cell='lstm' \\(_MyCell\\)"),
        ({"zoneout": 0.1}, NotImplementedError, r"zoneout=\(0.1, 0.1\)"),
        ({"dtype": torch.float64}, TypeError, "float32.*got torch.float64"),
    ],
)
def test_clear_errors(tmp_path, config, error, match):
    model = lstmkit.LSTM(INPUT, HIDDEN, **config)
    path = tmp_path / "m.onnx"
    with pytest.raises(error, match=match):
        to_onnx(model, path)
    assert not path.exists()


def test_argument_errors(tmp_path):
    model = lstmkit.LSTM(INPUT, HIDDEN)
    with pytest.raises(TypeError, match=r"model must be an lstmkit\.LSTM, got LSTM"):
        to_onnx(torch.nn.LSTM(INPUT, HIDDEN), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"opset_version must be in 14\.\.21, got 13"):
        to_onnx(model, tmp_path / "m.onnx", opset_version=13)
    with pytest.raises(TypeError, match="include_lengths must be a bool, got 1"):
        to_onnx(model, tmp_path / "m.onnx", include_lengths=1)
