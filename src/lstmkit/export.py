"""Export an :class:`lstmkit.LSTM` to ONNX as the native ``LSTM`` operator.

The graph is written directly from the model's weights with ``onnx.helper`` (no tracing):
one ONNX ``LSTM`` node per layer, ``direction="bidirectional"`` when the model is, with the
batch and sequence dimensions left dynamic.

Graph inputs (``N`` batch, ``L`` sequence length, ``D`` = 2 if bidirectional else 1,
``H`` = ``hidden_size``; all float32 except ``lengths``):

- ``input``: ``(L, N, input_size)``, or ``(N, L, input_size)`` when ``batch_first``. Always
  present.
- ``lengths``: int32 ``(N,)``, each sequence's valid length in ``[1, L]``, fed to the
  ``sequence_lens`` of every layer. Present only with ``include_lengths=True``.
- ``h0``, ``c0``: ``(D * num_layers, N, H)``, the initial state laid out as ``torch.nn.LSTM``'s
  ``hx``. Present only with ``include_state=True`` (otherwise the state starts at zero).

Graph outputs, as :meth:`lstmkit.LSTM.forward` returns them:

- ``output``: ``(L, N, D * H)``, or ``(N, L, D * H)`` when ``batch_first``; zero at steps past
  a sequence's length.
- ``h_n``, ``c_n``: ``(D * num_layers, N, H)``, the state after each sequence's last valid
  step, layer by layer, forward direction before reverse.

The export has evaluation semantics: dropout between layers, ``recurrent_dropout`` and
``weight_drop`` act in training only and are left out. Not exportable (each raises
``NotImplementedError`` naming the feature): ``proj_size > 0`` and any cell whose ``kind``
is not the standard ``"lstm"`` (both need a Scan/Loop graph, future work), and ``zoneout``,
which changes the evaluation-mode equations. Only float32 models are exported.
"""

from __future__ import annotations

import os

import torch

from lstmkit import validation as check
from lstmkit.modules import LSTM

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPSETS", "to_onnx"]

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 22)  # opsets whose LSTM / Slice / Reshape this graph uses

# ONNX orders the gate blocks (i, o, f, c); torch and lstmkit (i, f, g, o), with g the
# candidate that ONNX calls c. Row block j of the ONNX weight is torch's block _ONNX_GATES[j].
_ONNX_GATES = (0, 3, 1, 2)


def _import_onnx():
    try:
        import onnx
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lstmkit.export needs the onnx package: pip install 'lstmkit[export]'"
        ) from error
    return onnx


def _check_exportable(model: object) -> None:
    if not isinstance(model, LSTM):
        raise TypeError(f"model must be an lstmkit.LSTM, got {type(model).__name__}")
    if model.proj_size > 0:
        raise NotImplementedError(
            f"cannot export an LSTM with projection (proj_size={model.proj_size}) to ONNX: "
            "the native ONNX LSTM operator has no projection; only proj_size=0 is exportable"
        )
    if model.cell.kind != "lstm":
        raise NotImplementedError(
            f"cannot export cell={model.cell.name!r} ({type(model.cell).__qualname__}) of kind "
            f"{model.cell.kind!r} to ONNX: only a cell of kind 'lstm' (lstmkit.cells.LSTM, or a "
            "subclass that sets kind = 'lstm') maps onto the native ONNX LSTM operator"
        )
    zoneout = (model.regularizers.zoneout_h, model.regularizers.zoneout_c)
    if any(zoneout):
        raise NotImplementedError(
            f"cannot export zoneout={zoneout} to ONNX: zoneout changes the evaluation-mode "
            "equations, which the native ONNX LSTM operator cannot express; only zoneout=0 is "
            "exportable"
        )
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        found = ", ".join(sorted(str(d) for d in dtypes))
        raise TypeError(f"model parameters must be torch.float32 to export, got {found}")


def _reorder(weight: torch.Tensor):
    """A torch ``(4H, ...)`` weight or bias as a numpy array with its gate blocks in ONNX's
    (i, o, f, c) order."""
    import numpy as np

    array = weight.detach().cpu().numpy()
    blocks = np.split(array, 4, axis=0)
    return np.concatenate([blocks[j] for j in _ONNX_GATES], axis=0)


def _layer_weights(model: LSTM, layer: int):
    """ONNX ``W`` ``(D, 4H, in)``, ``R`` ``(D, 4H, H)`` and ``B`` ``(D, 8H)`` (``None`` without
    bias) of one layer, as numpy arrays."""
    import numpy as np

    directions = 2 if model.bidirectional else 1
    ws, rs, bs = [], [], []
    for direction in range(directions):
        p = model._layer_params(layer, direction)
        ws.append(_reorder(p["weight_ih"]))
        rs.append(_reorder(p["weight_hh"]))
        if model.bias:
            bs.append(np.concatenate([_reorder(p["bias_ih"]), _reorder(p["bias_hh"])]))
    b = np.stack(bs).astype(np.float32) if model.bias else None
    return np.stack(ws).astype(np.float32), np.stack(rs).astype(np.float32), b


def to_onnx(
    model: LSTM,
    path: str | os.PathLike | None,
    *,
    include_lengths: bool = False,
    include_state: bool = False,
    opset_version: int = DEFAULT_OPSET,
):
    """Write ``model`` to ``path`` as an ONNX graph of native ``LSTM`` nodes.

    Args:
        model: a float32 :class:`lstmkit.LSTM` with the standard cell and ``proj_size=0``.
        path: where to save the ``.onnx`` file; ``None`` only builds and returns the model.
        include_lengths: add the int32 ``lengths`` ``(N,)`` graph input. Default ``False``
            (every sequence uses all ``L`` steps).
        include_state: add the ``h0`` and ``c0`` ``(D * num_layers, N, H)`` graph inputs.
            Default ``False`` (zero initial state).
        opset_version: ONNX opset of the default domain, in 14..21. Default 17.

    Returns:
        The ``onnx.ModelProto``, already checked with ``onnx.checker.check_model(...,
        full_check=True)``.

    Raises:
        NotImplementedError: for ``proj_size > 0``, a cell of a kind other than ``"lstm"``
            (:attr:`lstmkit.cells.Cell.kind`; a subclass has none unless it sets one) or
            ``zoneout > 0``, which the native operator cannot express (a Scan-based export is
            future work).
        TypeError: for a model that is not an :class:`lstmkit.LSTM` or not float32.
        ValueError: for an unsupported ``opset_version``.

    The inputs, outputs and semantics are described in :mod:`lstmkit.export`.
    """
    _check_exportable(model)
    check.check_bool("include_lengths", include_lengths)
    check.check_bool("include_state", include_state)
    if isinstance(opset_version, bool) or not isinstance(opset_version, int):
        raise TypeError(f"opset_version must be an int, got {opset_version!r}")
    if opset_version not in SUPPORTED_OPSETS:
        raise ValueError(
            f"opset_version must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, "
            f"got {opset_version}"
        )
    onnx = _import_onnx()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    hidden = model.hidden_size
    directions = 2 if model.bidirectional else 1
    states = directions * model.num_layers
    float_ = TensorProto.FLOAT

    nodes, initializers = [], []

    def constant(name: str, array) -> str:
        initializers.append(numpy_helper.from_array(array, name))
        return name

    x_shape = ["batch", "sequence"] if model.batch_first else ["sequence", "batch"]
    inputs = [helper.make_tensor_value_info("input", float_, [*x_shape, model.input_size])]
    if include_lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    if include_state:
        for name in ("h0", "c0"):
            inputs.append(helper.make_tensor_value_info(name, float_, [states, "batch", hidden]))

    x = "input"
    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["input_tm"], perm=[1, 0, 2]))
        x = "input_tm"  # (L, N, in)

    if include_state:
        axes = constant("state_axes", np.array([0], dtype=np.int64))
    # (L, N, D, H) -> (L, N, D * H) whatever L and N are
    merge = constant("merge_directions", np.array([0, 0, -1], dtype=np.int64))

    h_parts, c_parts = [], []
    for layer in range(model.num_layers):
        w, r, b = _layer_weights(model, layer)
        lstm_inputs = [x, constant(f"W_l{layer}", w), constant(f"R_l{layer}", r)]
        lstm_inputs.append(constant(f"B_l{layer}", b) if b is not None else "")
        lstm_inputs.append("lengths" if include_lengths else "")
        if include_state:
            starts = constant(f"state_start_l{layer}", np.array([layer * directions], np.int64))
            ends = constant(f"state_end_l{layer}", np.array([(layer + 1) * directions], np.int64))
            for name in ("h0", "c0"):
                part = f"{name}_l{layer}"
                nodes.append(helper.make_node("Slice", [name, starts, ends, axes], [part]))
                lstm_inputs.append(part)
        y, y_h, y_c = f"Y_l{layer}", f"Y_h_l{layer}", f"Y_c_l{layer}"
        nodes.append(
            helper.make_node(
                "LSTM",
                lstm_inputs,
                [y, y_h, y_c],
                name=f"lstm_l{layer}",
                hidden_size=hidden,
                direction="bidirectional" if model.bidirectional else "forward",
            )
        )
        h_parts.append(y_h)
        c_parts.append(y_c)
        # Y (L, D, N, H) -> (L, N, D, H) -> (L, N, D * H): the next layer's input
        nodes.append(helper.make_node("Transpose", [y], [f"{y}_tm"], perm=[0, 2, 1, 3]))
        x = f"layer_output_l{layer}"
        nodes.append(helper.make_node("Reshape", [f"{y}_tm", merge], [x]))

    if model.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["output"]))
    for name, parts in (("h_n", h_parts), ("c_n", c_parts)):
        if len(parts) == 1:
            nodes.append(helper.make_node("Identity", parts, [name]))
        else:
            nodes.append(helper.make_node("Concat", parts, [name], axis=0))

    outputs = [
        helper.make_tensor_value_info("output", float_, [*x_shape, directions * hidden]),
        helper.make_tensor_value_info("h_n", float_, [states, "batch", hidden]),
        helper.make_tensor_value_info("c_n", float_, [states, "batch", hidden]),
    ]
    graph = helper.make_graph(nodes, "lstmkit_lstm", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset_version)]
    onnx_model = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="lstmkit",
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    if path is not None:
        onnx.save(onnx_model, os.fspath(path))
    return onnx_model
