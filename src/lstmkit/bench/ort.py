"""ONNX Runtime as a peer for inference: the model that :func:`lstmkit.export.to_onnx` writes
(ONNX's own LSTM operator), run by an ``InferenceSession`` on the CPU.

Its intra-op pool gets torch's thread count, and its idle threads do not spin: by default they
spin after each run and take the cores from whatever runs next (every torch timing after it
doubled on this project's 2-core machines)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lstmkit.modules import LSTM

NAME = "onnxruntime"
INSTALL = "pip install 'lstmkit[bench]'"


def missing() -> str | None:
    """Why the peer cannot run here (one line), or ``None``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        return f"{error.name} is not installed ({INSTALL})"
    return None


def _session(model: LSTM, threads: int, include_state: bool = False):
    """An ONNX Runtime session of ``model``'s export with ``threads`` intra-op threads that do
    not spin."""
    import onnxruntime

    from lstmkit.export import to_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    graph = to_onnx(model, None, include_state=include_state).SerializeToString()
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def forward(model: LSTM, x: torch.Tensor, threads: int) -> Callable[[], torch.Tensor]:
    """A function that runs ``model``'s ONNX export on ``x`` (float32, in ``model``'s
    ``batch_first`` layout) in one ONNX Runtime session with ``threads`` intra-op threads and
    returns its output."""
    session = _session(model, threads)
    feed = {session.get_inputs()[0].name: x.detach().numpy()}

    def run() -> torch.Tensor:
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def step(model: LSTM, threads: int):
    """``step(x_t, state) -> (output, (h, c))`` by ONNX Runtime, as ``model.step`` is called:
    ``x_t`` ``(B, I)``, ``state`` ``(h, c)`` of ``(num_layers, B, H)`` or ``None`` (zeros); one
    run of ``model``'s export (with ``h0``/``c0`` inputs) on a one-step sequence per call, the
    state carried as NumPy arrays between calls (time-major models only)."""
    import numpy as np

    session = _session(model, threads, include_state=True)

    def run(x_t: torch.Tensor, state):
        shape = (model.num_layers, x_t.shape[0], model.hidden_size)
        h, c = state if state is not None else (np.zeros(shape, np.float32),) * 2
        feed = {"input": x_t.numpy()[None], "h0": h, "c0": c}
        output, h_n, c_n = session.run(None, feed)
        return output[0], (h_n, c_n)

    return run
