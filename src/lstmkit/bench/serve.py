"""``lstmkit bench --serve``: one model behind several client threads, as a server runs it.

For each model size and client count, lstmkit and ``torch.nn.LSTM`` (the same weights) each
run in a fresh process (``python -m lstmkit.bench.serve``): it times one request of the first
drawn size as the process's first call, then ``clients`` threads take the drawn requests
(batch sizes and lengths from a seeded generator) from a shared queue and serve them, in
inference under ``torch.no_grad()``, each request's latency taken by its thread. Afterwards
the process runs every request again, one at a time, and reports the largest difference from
the concurrent outputs (what a race would show), the first request's size again for a
steady-state time, and the intra-op threads torch had.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lstmkit.bench.suite import BASELINE
from lstmkit.modules import LSTM

LSTMKIT = "lstmkit"
IMPLEMENTATIONS = (LSTMKIT, BASELINE)
MODELS = {"M": 256, "T1": 128}  # hidden size = input size, one layer (the suite's M and T1)
CLIENTS = (1, 2, 4)
BATCHES = (1, 64)  # each request's batch size, drawn uniformly between these
LENGTHS = (10, 200)  # and its length
SEED = 0


class ServeError(RuntimeError):
    """A measuring process failed; the message names it and its last line of error output."""


def draw_requests(count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` request shapes ``(T, B)``, the same for every process given the seed."""
    rng = random.Random(seed)
    return [(rng.randint(*LENGTHS), rng.randint(*BATCHES)) for _ in range(count)]


def _model(implementation: str, hidden: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    model = torch.nn.LSTM(hidden, hidden)
    if implementation == LSTMKIT:
        model = LSTM.from_torch(model)
    return model.eval()


def serve(implementation: str, hidden: int, clients: int, count: int) -> dict[str, object]:
    """One fresh process's measurement (run it in a child: the first call must be the
    process's first)."""
    shapes = draw_requests(count, SEED)
    generator = torch.Generator().manual_seed(SEED)
    inputs = [torch.randn(t, b, hidden, generator=generator) for t, b in shapes]
    model = _model(implementation, hidden)
    with torch.no_grad():
        start = time.perf_counter()
        model(inputs[0])
        first = time.perf_counter() - start
    outputs: list[torch.Tensor | None] = [None] * count
    latencies: list[float] = [0.0] * count
    queue = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(queue, None)
            if index is None:
                return
            begin = time.perf_counter()
            with torch.no_grad():
                outputs[index] = model(inputs[index])[0]
            latencies[index] = time.perf_counter() - begin

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    with torch.no_grad():
        serial = [model(x)[0] for x in inputs]
        again = []
        for _ in range(5):
            begin = time.perf_counter()
            model(inputs[0])
            again.append(time.perf_counter() - begin)
    difference = max((a - b).abs().max().item() for a, b in zip(outputs, serial, strict=True))
    return {
        "latencies_s": latencies,
        "wall_s": wall,
        "first_s": first,
        "steady_s": sorted(again)[len(again) // 2],
        "max_abs_diff_vs_serial": difference,
        "intra_op_threads": torch.get_num_threads(),
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at ``fraction`` of the sorted ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def run_serve(models: Sequence[str], clients: Sequence[int], count: int, threads: int):
    """Every (model, client count, implementation), each in a fresh process, the two
    implementations alternating; returns one row per measurement."""
    rows = []
    for name in models:
        for n in clients:
            for implementation in IMPLEMENTATIONS:
                print(f"serving {name} with {n} client(s): {implementation}", flush=True)
                args = [implementation, str(MODELS[name]), str(n), str(count), str(threads)]
                done = subprocess.run(
                    [sys.executable, "-m", "lstmkit.bench.serve", *args],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
                    raise ServeError(
                        f"the {implementation} process serving {name} to {n} client(s) exited "
                        f"with status {done.returncode}: {last}"
                    )
                result = json.loads(done.stdout.splitlines()[-1])
                latencies = result["latencies_s"]
                rows.append(
                    {
                        "model": name,
                        "hidden_size": MODELS[name],
                        "clients": n,
                        "implementation": implementation,
                        "requests_per_s": count / result["wall_s"],
                        "p50_ms": 1e3 * percentile(latencies, 0.5),
                        "p99_ms": 1e3 * percentile(latencies, 0.99),
                        "max_ms": 1e3 * max(latencies),
                        "first_ms": 1e3 * result["first_s"],
                        "steady_ms": 1e3 * result["steady_s"],
                        "max_abs_diff_vs_serial": result["max_abs_diff_vs_serial"],
                        "stderr": done.stderr.strip(),
                    }
                )
    return rows


def ratio_table(rows: list[dict]) -> str:
    """lstmkit against nn.LSTM per model and client count: p99 latency and throughput ratios,
    and each one's first request against its steady time for the same request."""
    by = {(r["model"], r["clients"], r["implementation"]): r for r in rows}
    lines = [
        "| model | clients | p99 lstmkit ÷ nn.LSTM | requests/s lstmkit ÷ nn.LSTM | "
        "first ÷ steady, lstmkit | first ÷ steady, nn.LSTM |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for model, clients, implementation in by:
        if implementation != LSTMKIT or (model, clients, BASELINE) not in by:
            continue
        ours, theirs = by[model, clients, LSTMKIT], by[model, clients, BASELINE]
        lines.append(
            f"| {model} | {clients} | {ours['p99_ms'] / theirs['p99_ms']:.2f} "
            f"| {ours['requests_per_s'] / theirs['requests_per_s']:.2f} "
            f"| {ours['first_ms'] / ours['steady_ms']:.1f} "
            f"| {theirs['first_ms'] / theirs['steady_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_serve_reports(out: Path, rows: list[dict], machine: dict, settings: dict) -> str:
    """``serve.json`` and ``serve.md`` in ``out``; returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "results": rows}, indent=2)
    )
    header = (
        "| model | clients | implementation | requests/s | p50 ms | p99 ms | max ms | "
        "first request ms | same request, steady ms | max abs diff vs serial |\n"
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    lines = [
        f"| {r['model']} | {r['clients']} | {r['implementation']} | {r['requests_per_s']:.1f} "
        f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['first_ms']:.1f} "
        f"| {r['steady_ms']:.2f} | {r['max_abs_diff_vs_serial']:.1e} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n\n" + ratio_table(rows)
    described = "\n".join(f"- {key}: {value}" for key, value in {**machine, **settings}.items())
    (out / "serve.md").write_text(
        f"# lstmkit serving benchmark\n\n{described}\n\n{table}\n{__doc__}"
    )
    return table


if __name__ == "__main__":
    implementation, hidden, clients, count, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    print(json.dumps(serve(implementation, int(hidden), int(clients), int(count))))
