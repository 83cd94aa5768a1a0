"""The benchmark suite: configurations, the implementations compared, and the run over both."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lstmkit.bench import ort
from lstmkit.bench.measure import (
    SavedBytes,
    Timing,
    intra_op_threads,
    saved_bytes,
    time_interleaved,
)
from lstmkit.bench.naive import NaiveLSTM
from lstmkit.bench.torchscript import ScriptedLayerNormLSTM
from lstmkit.modules import LSTM

BASELINE = "nn.LSTM"
NAIVE = "naive"
PEER = "TorchScript layernorm"  # the layer-norm LSTM written as a scripted loop, --cell layernorm
AGREEMENT_TOLERANCE = 1e-4  # float32 error against float64 that is never marked


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
        Config("D2", batch=32, seq_len=100, input_size=256, hidden_size=256, num_layers=2),
        Config("T1", batch=1, seq_len=200, input_size=128, hidden_size=128),
    )
}


@dataclass(frozen=True)
class ConfigResult:
    """Everything measured for one configuration.

    ``timings[mode][implementation]`` (a peer for inference only, such as ONNX Runtime, has no
    training timing), ``saved[implementation]`` (one training forward, the nn.Modules),
    ``errors[implementation]``: the largest difference of its float32 inference output from
    the same model run in float64 (``nn.LSTM`` in float64 for the baselines, lstmkit's
    reference backend in float64 for the rest), measured before any timing, and
    ``bounds[implementation]``: the error above which it is marked as suspect (not dropped).
    """

    config: Config
    timings: dict[str, dict[str, Timing]]
    saved: dict[str, SavedBytes]
    errors: dict[str, float]
    bounds: dict[str, float]

    def suspect(self) -> dict[str, float]:
        """The implementations whose error exceeds their bound, with the error."""
        return {name: e for name, e in self.errors.items() if e > self.bounds[name]}


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
    ``cell`` per backend, for the layernorm cell of one layer and direction its TorchScript
    peer (:mod:`lstmkit.bench.torchscript`), then ``torch.nn.LSTM``, then
    :class:`~lstmkit.bench.naive.NaiveLSTM`.

    The baselines are always the plain LSTM; lstmkit models of another cell share nn.LSTM's
    weights only when the cell is the plain LSTM."""
    sizes = _sizes(config)
    baseline = nn.LSTM(**sizes)
    models: dict[str, nn.Module] = {
        implementation_name(backend, cell): LSTM(**sizes, cell=cell, backend=backend)
        for backend in backends
    }
    if cell == "layernorm" and config.num_layers == 1 and not config.bidirectional:
        models[PEER] = ScriptedLayerNormLSTM(config.input_size, config.hidden_size, True)
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
    config: Config,
    backends: Sequence[str],
    repeats: int,
    warmup: int,
    cell: str = "lstm",
    peers: Sequence[str] = (),
) -> ConfigResult:
    """Measure every implementation's float32 error against float64, count what each saves
    for backward, then time each mode with all implementations interleaved. ``peers`` may name
    ``"ort"``: ONNX Runtime (:mod:`lstmkit.bench.ort`) timed for inference after nn.LSTM, on the
    plain cell's export.

    An implementation is marked (:meth:`ConfigResult.suspect`, and a printed line) but still
    timed when its error exceeds :data:`AGREEMENT_TOLERANCE` and, for a variant cell's
    implementations, twice the float32 reference backend's own error.
    """
    torch.manual_seed(0)
    models = build_models(config, backends, cell)
    x = torch.randn(config.batch, config.seq_len, config.input_size)
    x_grad = x.clone().requires_grad_()

    # float64 twins: nn.LSTM for the baselines, lstmkit's reference backend for the rest
    first = models[implementation_name(backends[0], cell)]
    exact = {
        "plain": nn.LSTM(**_sizes(config), dtype=torch.float64),
        "cell": LSTM(**_sizes(config), cell=cell, backend="reference", dtype=torch.float64),
    }
    exact["plain"].load_state_dict(models[BASELINE].state_dict())
    exact["cell"].load_state_dict(first.state_dict())
    reference = LSTM(**_sizes(config), cell=cell, backend="reference")
    reference.load_state_dict(first.state_dict())
    with torch.no_grad():
        want = {kind: model(x.double())[0] for kind, model in exact.items()}
        reference_error = (reference(x)[0].double() - want["cell"]).abs().max().item()
        errors = {
            name: (model(x)[0].double() - want[_twin(name)]).abs().max().item()
            for name, model in models.items()
        }
    # layer norm amplifies float32 rounding over time (~1e-3 at M for every implementation)
    variant_bound = max(AGREEMENT_TOLERANCE, 2 * reference_error)
    bounds = {
        name: variant_bound if cell != "lstm" and _twin(name) == "cell" else AGREEMENT_TOLERANCE
        for name in models
    }
    peer = None
    if "ort" in peers and cell == "lstm":
        peer = ort.forward(first, x, torch.get_num_threads())
        errors[ort.NAME] = (peer().double() - want["plain"]).abs().max().item()
        bounds[ort.NAME] = AGREEMENT_TOLERANCE
    for name, error in errors.items():
        if error > bounds[name]:
            print(
                f"  {config.name}: {name} is {error:.2e} from float64, above its bound "
                f"{bounds[name]:.2e}: marked in the tables",
                flush=True,
            )

    saved = {
        name: saved_bytes(lambda model=model: model(x_grad), model.parameters())
        for name, model in models.items()
    }
    inference = {}
    for name, model in models.items():
        inference[name] = inference_run(model, x)
        if name == BASELINE and peer is not None:  # after nn.LSTM, before the naive loop
            inference[ort.NAME] = peer
    training = {name: training_run(model, x_grad) for name, model in models.items()}
    timings = {
        mode: time_interleaved(runs, repeats, warmup)
        for mode, runs in (("inference", inference), ("training", training))
    }
    return ConfigResult(config, timings, saved, errors, bounds)


def _twin(name: str) -> str:
    """Which float64 twin an implementation is measured against: ``"plain"`` (nn.LSTM's
    weights: the baselines) or ``"cell"`` (the lstmkit models' weights and cell)."""
    return "plain" if name in (BASELINE, NAIVE) else "cell"


def run_suite(
    configs: Sequence[Config],
    backends: Sequence[str],
    repeats: int,
    warmup: int,
    threads: int,
    cell: str = "lstm",
    peers: Sequence[str] = (),
) -> list[ConfigResult]:
    """:func:`run_config` for each configuration with ``threads`` intra-op threads; the
    previous thread count is restored afterwards."""
    with intra_op_threads(threads):
        results = []
        for config in configs:
            print(f"running {config.name}: {config.describe()}", flush=True)
            results.append(run_config(config, backends, repeats, warmup, cell, peers))
        return results
