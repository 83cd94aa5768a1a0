"""The benchmark suite: configurations, the implementations compared, and the run over both."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lstmkit.bench.measure import (
    SavedBytes,
    Timing,
    intra_op_threads,
    saved_bytes,
    time_interleaved,
)
from lstmkit.bench.naive import NaiveLSTM
from lstmkit.modules import LSTM

BASELINE = "nn.LSTM"
NAIVE = "naive"
ORACLE = "lstmkit reference in float64 (oracle)"
AGREEMENT_TOLERANCE = 1e-4  # largest |output - nn.LSTM's| in float32 worth timing


@dataclass(frozen=True)
class Config:
    """One benchmarked shape; always float32 and ``batch_first=True``."""

    name: str
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False

    def describe(self) -> str:
        direction = "bi" if self.bidirectional else "uni"
        return (
            f"B={self.batch} T={self.seq_len} I={self.input_size} H={self.hidden_size} "
            f"layers={self.num_layers} {direction}"
        )


GRID = {
    config.name: config
    for config in (
        Config("S", batch=8, seq_len=50, input_size=64, hidden_size=64),
        Config("M", batch=32, seq_len=100, input_size=256, hidden_size=256),
        Config("L", batch=64, seq_len=100, input_size=512, hidden_size=512),
        Config(
            "D",
            batch=32,
            seq_len=100,
            input_size=256,
            hidden_size=256,
            num_layers=2,
            bidirectional=True,
        ),
        Config("T1", batch=1, seq_len=200, input_size=128, hidden_size=128),
    )
}


@dataclass(frozen=True)
class ConfigResult:
    """Everything measured for one configuration.

    ``timings[mode][implementation]``, ``saved[implementation]`` (one training forward), and
    ``max_abs_diff[implementation]``: the largest difference of its inference output from
    the oracle's (``nn.LSTM`` for the plain cell, lstmkit's reference backend in float64 for
    the others), checked before any timing.
    """

    config: Config
    timings: dict[str, dict[str, Timing]]
    saved: dict[str, SavedBytes]
    max_abs_diff: dict[str, float]


def _sizes(config: Config) -> dict[str, object]:
    return {
        "input_size": config.input_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "batch_first": True,
        "bidirectional": config.bidirectional,
    }


def implementation_name(backend: str, cell: str = "lstm") -> str:
    return f"lstmkit[{backend}]" if cell == "lstm" else f"lstmkit[{cell}, {backend}]"


def build_models(
    config: Config, backends: Sequence[str], cell: str = "lstm"
) -> dict[str, nn.Module]:
    """The compared models with one set of weights, in timing order: an ``lstmkit.LSTM`` of
    ``cell`` per backend, then ``torch.nn.LSTM``, then :class:`~lstmkit.bench.naive.NaiveLSTM`.

    The baselines are always the plain LSTM; lstmkit models of another cell share nn.LSTM's
    weights only when the cell is the plain LSTM."""
    sizes = _sizes(config)
    baseline = nn.LSTM(**sizes)
    models: dict[str, nn.Module] = {
        implementation_name(backend, cell): LSTM(**sizes, cell=cell, backend=backend)
        for backend in backends
    }
    models[BASELINE] = baseline
    models[NAIVE] = NaiveLSTM(**sizes)
    first = models[implementation_name(backends[0], cell)]
    if cell == "lstm":
        first.load_state_dict(baseline.state_dict())
    for name, model in models.items():
        model.load_state_dict((baseline if name in (BASELINE, NAIVE) else first).state_dict())
    return models


def inference_run(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """One forward pass under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def training_run(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """Clear the gradients of ``x`` and the parameters (to ``None``), then forward and
    backward of ``output.sum()``. ``x`` must require grad."""
    parameters = list(model.parameters())

    def run() -> None:
        x.grad = None
        for parameter in parameters:
            parameter.grad = None
        output, _ = model(x)
        output.sum().backward()

    return run


def run_config(
    config: Config, backends: Sequence[str], repeats: int, warmup: int, cell: str = "lstm"
) -> ConfigResult:
    """Check every implementation agrees with its oracle, count what each saves for
    backward, then time each mode with all implementations interleaved.

    Raises:
        RuntimeError: an implementation's output differs from its oracle's by more than
            :data:`AGREEMENT_TOLERANCE` (for a variant cell: or twice what the float32
            reference backend differs by).
    """
    torch.manual_seed(0)
    models = build_models(config, backends, cell)
    x = torch.randn(config.batch, config.seq_len, config.input_size)
    x_grad = x.clone().requires_grad_()

    with torch.no_grad():
        outputs = {name: model(x)[0] for name, model in models.items()}
    tolerance = {name: AGREEMENT_TOLERANCE for name in models}
    oracle = {name: BASELINE for name in models}
    if cell != "lstm":
        # lstmkit models of a variant against its reference backend in float64; each may be as
        # far from it as twice the float32 reference backend is (layer norm amplifies float32
        # rounding: ~8e-4 at M), and at least AGREEMENT_TOLERANCE.
        exact = LSTM(**_sizes(config), cell=cell, backend="reference", dtype=torch.float64)
        exact.load_state_dict(models[implementation_name(backends[0], cell)].state_dict())
        reference = LSTM(**_sizes(config), cell=cell, backend="reference")
        reference.load_state_dict(exact.state_dict())
        with torch.no_grad():
            outputs[ORACLE] = exact(x.double())[0]
            float32_error = (reference(x)[0] - outputs[ORACLE]).abs().max().item()
        for name in models:
            if name.startswith("lstmkit"):
                oracle[name] = ORACLE
                tolerance[name] = max(AGREEMENT_TOLERANCE, 2 * float32_error)
    max_abs_diff = {
        name: (outputs[name].double() - outputs[oracle[name]]).abs().max().item() for name in models
    }
    wrong = {name: diff for name, diff in max_abs_diff.items() if diff > tolerance[name]}
    if wrong:
        raise RuntimeError(f"{config.name}: outputs differ from their oracles': {wrong}")

    saved = {
        name: saved_bytes(lambda model=model: model(x_grad), model.parameters())
        for name, model in models.items()
    }
    runs = {"inference": (inference_run, x), "training": (training_run, x_grad)}
    timings = {
        mode: time_interleaved(
            {name: make(model, data) for name, model in models.items()}, repeats, warmup
        )
        for mode, (make, data) in runs.items()
    }
    return ConfigResult(config, timings, saved, max_abs_diff)


def run_suite(
    configs: Sequence[Config],
    backends: Sequence[str],
    repeats: int,
    warmup: int,
    threads: int,
    cell: str = "lstm",
) -> list[ConfigResult]:
    """:func:`run_config` for each configuration with ``threads`` intra-op threads; the
    previous thread count is restored afterwards."""
    with intra_op_threads(threads):
        results = []
        for config in configs:
            print(f"running {config.name}: {config.describe()}", flush=True)
            results.append(run_config(config, backends, repeats, warmup, cell))
        return results
