"""``torch.compile(model, fullgraph=True)`` against the same model eager, on the CPU, with the
default backend (the native custom operator inside the compiled graph): per call, inference
and a training step (forward + backward), medians of interleaved runs after warm-up (the
compilation itself is not timed). Run from the repository root:

    .venv/bin/python benchmarks/compile/compile_vs_eager.py

It writes ``compile.json`` and ``compile.md`` beside itself.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import lstmkit
from lstmkit.machine import machine_info

CONFIGS = {"S": (8, 50, 64), "M": (32, 100, 256)}  # batch, steps, input = hidden
CELLS = ("lstm", "layernorm")
REPEATS, WARMUP = 15, 3


def infer(model, x) -> None:
    with torch.no_grad():
        model(x)


def train(model, x) -> None:
    model(x)[0].square().mean().backward()


def compare(model, x, run) -> tuple[float, float]:
    """Median milliseconds of ``run`` eager and compiled, calls interleaved."""
    compiled = torch.compile(model, fullgraph=True)
    times = {"eager": [], "compiled": []}
    for k in range(WARMUP + REPEATS):
        for label, m in (("eager", model), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            run(m, x)
            if k >= WARMUP:
                times[label].append(time.perf_counter() - started)
    return tuple(statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for cell in CELLS:
        for name, (batch, steps, size) in CONFIGS.items():
            model = lstmkit.LSTM(size, size, cell=cell, batch_first=True)
            x = torch.randn(batch, steps, size)
            for mode, run in (("inference", infer), ("training", train)):
                eager, compiled = compare(model, x, run)
                row = {"cell": cell, "config": name, "mode": mode, "eager_ms": eager}
                rows.append({**row, "compiled_ms": compiled, "ratio": compiled / eager})
                print(rows[-1], flush=True)
    here = Path(__file__).parent
    info = machine_info(torch.get_num_threads())
    settings = {"repeats": REPEATS, "warmup": WARMUP, "configs": CONFIGS}
    result = {"machine": info, "settings": settings, "rows": rows}
    (here / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# torch.compile(fullgraph=True) against eager, default backend",
        "",
        f"torch {torch.__version__}, 2 threads, float32, batch-first, 1 layer; medians of "
        f"{REPEATS} interleaved calls after {WARMUP} warm-up rounds; CPU {info['cpu']}, family "
        f"{info['cpu_family']}, model {info['cpu_model']} ({info['cpu_vector_flags']}).",
        "",
        "| cell | config (B, T, I=H) | mode | eager ms | compiled ms | compiled / eager |",
        "|---|---|---|--:|--:|--:|",
    ]
    for r in rows:
        shape = ", ".join(map(str, CONFIGS[r["config"]]))
        lines.append(
            f"| {r['cell']} | {r['config']} ({shape}) | {r['mode']} | {r['eager_ms']:.2f} | "
            f"{r['compiled_ms']:.2f} | {r['ratio']:.2f} |"
        )
    (here / "compile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
