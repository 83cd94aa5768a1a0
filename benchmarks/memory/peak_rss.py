"""Peak resident memory of one long-sequence inference forward, each implementation in a
fresh process: T = 100,000, B = 8, I = H = 256, float32, 2 threads, torch.no_grad().

tracemalloc cannot see ATen's allocations, so each child reads its own peak RSS
(``ru_maxrss``) after the forward and reports it beside the RSS it had just before (model and
input built, one short warm-up call made): the difference is what the forward itself added at
its peak. Run from the repository root: ``python benchmarks/memory/peak_rss.py``; it writes
``peak_rss.json`` and ``peak_rss.md`` beside itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lstmkit.machine import machine_info

STEPS, BATCH, SIZE, THREADS = 100_000, 8, 256, 2
CHILD = """
import resource, sys, torch, lstmkit
torch.set_num_threads({threads})
torch.manual_seed(0)
kind = sys.argv[1]
reference = torch.nn.LSTM({size}, {size})
model = reference if kind == "nn.LSTM" else lstmkit.LSTM.from_torch(reference)
x = torch.randn({steps}, {batch}, {size})
with torch.no_grad():
    model(x[:10])
    before = open("/proc/self/statm").read().split()[1]
    output, _ = model(x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(int(before) * resource.getpagesize(), peak, output.numel() * 4)
"""


def measure(kind: str) -> dict[str, float]:
    code = CHILD.format(threads=THREADS, size=SIZE, steps=STEPS, batch=BATCH)
    out = subprocess.run(
        [sys.executable, "-c", code, kind], capture_output=True, text=True, check=True
    ).stdout.split()
    before, peak, output = (int(v) for v in out)
    return {"rss_before_mib": before / 2**20, "peak_rss_mib": peak / 2**20,
            "added_mib": (peak - before) / 2**20, "output_mib": output / 2**20}  # fmt: skip


def main() -> None:
    machine = machine_info(THREADS)
    results = {kind: measure(kind) for kind in ("nn.LSTM", "lstmkit")}
    ratio = results["lstmkit"]["peak_rss_mib"] / results["nn.LSTM"]["peak_rss_mib"]
    here = Path(__file__).parent
    settings = {"steps": STEPS, "batch": BATCH, "input_size": SIZE, "hidden_size": SIZE}
    data = {"machine": machine, "settings": settings, "results": results,
            "peak_ratio_lstmkit_vs_nn": ratio}  # fmt: skip
    (here / "peak_rss.json").write_text(json.dumps(data, indent=2) + "\n")
    rows = "\n".join(
        f"| {kind} | {r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['added_mib']:.0f} "
        f"| {r['output_mib']:.0f} |"
        for kind, r in results.items()
    )
    text = (
        f"# Peak memory of one long inference forward\n\n"
        f"T = {STEPS}, B = {BATCH}, I = H = {SIZE}, float32, {THREADS} threads, each in a fresh "
        f"process; CPU: {machine['cpu']} (family {machine['cpu_family']}, model "
        f"{machine['cpu_model']}; {machine['cpu_vector_flags']}).\n\n"
        f"| implementation | RSS before MiB | peak RSS MiB | added MiB | output MiB |\n"
        f"|---|--:|--:|--:|--:|\n{rows}\n\n"
        f"Peak RSS, lstmkit ÷ nn.LSTM: **{ratio:.2f}** (target ≤ 1.5).\n"
    )
    (here / "peak_rss.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
