"""``lstmkit bench --stream``: per-step latency of :meth:`lstmkit.LSTM.step` against
``torch.nn.LSTM`` fed one-step sequences with its state carried in ``hx`` and, with
``--peers ort``, ONNX Runtime running the model's export on one-step sequences with its state
carried in the ``h0``/``c0`` inputs."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lstmkit.bench import ort
from lstmkit.bench.measure import intra_op_threads, time_interleaved
from lstmkit.bench.suite import BASELINE
from lstmkit.modules import LSTM

LSTMKIT = "lstmkit.step"
HIDDEN_SIZES = (128, 512)
NUM_LAYERS = 2
AGREEMENT_TOLERANCE = 1e-4  # largest |state - nn.LSTM's| in float32 after the checked steps

NOTES = f"""\
Each timed run is `steps` consecutive one-step calls at B=1, I=H, {NUM_LAYERS} layers,
float32, eval mode under `torch.no_grad()`, carrying the state from call to call: lstmkit's
`LSTM.step(x_t, state)` against `{BASELINE}(x_t.unsqueeze(0), hx)` and, where timed,
{ort.NAME} running `lstmkit.export.to_onnx(model, include_state=True)` on a one-step sequence
with the state fed back as `h0`, `c0` (intra-op threads = torch's, no spinning). They
alternate, in an order shuffled per round, after untimed warm-up runs; per-step latency is
the median run divided by `steps`.
"""


def stepper(step: Callable[[Tensor, object], tuple[Tensor, object]], x: Tensor, steps: int):
    """A callable running ``steps`` steps of ``step`` from a zero state, under no_grad."""

    def run() -> None:
        with torch.no_grad():
            state = None
            for _ in range(steps):
                _, state = step(x, state)

    return run


def run_stream(
    hidden_sizes: Sequence[int],
    steps: int,
    repeats: int,
    warmup: int,
    threads: int,
    peers: Sequence[str] = (),
) -> list[dict[str, object]]:
    """Check lstmkit's (and each peer's) streamed state against nn.LSTM's, then time them all
    per size. ``peers`` may name ``"ort"`` (:func:`lstmkit.bench.ort.step`)."""
    with intra_op_threads(threads):
        rows = []
        for hidden in hidden_sizes:
            print(f"running stream: B=1 I=H={hidden} layers={NUM_LAYERS}", flush=True)
            torch.manual_seed(0)
            baseline = nn.LSTM(hidden, hidden, NUM_LAYERS).eval()
            model = LSTM(hidden, hidden, NUM_LAYERS).eval()
            model.load_state_dict(baseline.state_dict())
            steps_of = {
                LSTMKIT: model.step,
                BASELINE: lambda x_t, s, m=baseline: m(x_t.unsqueeze(0), s),
            }
            if "ort" in peers:
                steps_of[ort.NAME] = ort.step(model, threads)
            xs = torch.randn(8, 1, hidden)
            final = {}  # each one's state after the steps
            with torch.no_grad():
                for name, step in steps_of.items():
                    state = None
                    for x_t in xs:
                        _, state = step(x_t, state)
                    final[name] = [torch.as_tensor(s) for s in state]
            want = final[BASELINE]
            diff = {
                name: max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
                for name, got in final.items()
            }
            if max(diff.values()) > AGREEMENT_TOLERANCE:
                raise RuntimeError(f"H={hidden}: streamed state differs from nn.LSTM's: {diff}")
            x = xs[0]
            runs = {name: stepper(step, x, steps) for name, step in steps_of.items()}
            timings = time_interleaved(runs, repeats, warmup)
            per_step = {name: t.median_s / steps for name, t in timings.items()}
            rows.append(
                {
                    "hidden_size": hidden,
                    "per_step_us": {name: s * 1e6 for name, s in per_step.items()},
                    "ratio": per_step[LSTMKIT] / per_step[BASELINE],
                    "ratio_vs_peers": {
                        name: per_step[LSTMKIT] / s
                        for name, s in per_step.items()
                        if name != LSTMKIT
                    },
                    "max_abs_diff": diff[LSTMKIT],
                    "max_abs_diff_peers": {n: d for n, d in diff.items() if n != LSTMKIT},
                    "runs_s": {name: list(t.runs_s) for name, t in timings.items()},
                }
            )
        return rows


def markdown_table(rows: Sequence[dict[str, object]]) -> str:
    """Per size: each implementation's µs a step, lstmkit's ratio to each other one (lower is
    better) and lstmkit's largest state difference from nn.LSTM's."""
    names = list(rows[0]["per_step_us"])
    others = [name for name in names if name != LSTMKIT]
    header = [
        "H",
        *(f"{name} µs/step" for name in names),
        *(f"{LSTMKIT} ÷ {name}" for name in others),
        "max abs diff",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        us, ratios = row["per_step_us"], row["ratio_vs_peers"]
        cells = [
            str(row["hidden_size"]),
            *(f"{us[name]:.1f}" for name in names),
            *(f"{ratios[name]:.2f}x" for name in others),
            f"{row['max_abs_diff']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_stream_reports(
    out: Path,
    rows: Sequence[dict[str, object]],
    machine: dict[str, object],
    settings: dict[str, object],
) -> str:
    """Write ``stream.json`` and ``stream.md`` into ``out``; return the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine, "settings": settings, "results": list(rows)}
    (out / "stream.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(rows)
    header = "\n".join(f"- {key}: {value}" for key, value in {**machine, **settings}.items())
    markdown = f"# lstmkit streaming benchmark\n\n{header}\n\n{table}\n{NOTES}"
    (out / "stream.md").write_text(markdown, encoding="utf-8")
    return table
