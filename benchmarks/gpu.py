"""The GPU benchmark of the triton backend (``docs/gpu.md``): ONE script, meant to finish within
about 8 minutes on one H200.

1. Correctness: on fresh random inputs, lstmkit-triton's outputs, final states and every
   gradient against the float64 reference backend, for each precision and each way of dividing
   the hidden units (registers, barrier, host), with lengths, both directions and a projection,
   for the lstm and the peephole cells, and the layernorm cell in ``registers`` (its only mode).
2. Timing with CUDA events (warm-up, then the median): lstmkit-triton, lstmkit-fused and cuDNN
   ``torch.nn.LSTM``, inference and training (forward + backward), float32 (TF32 off
   everywhere) and bfloat16, over the issue's grid (batch_first, one layer, I = H); where the
   triton backend splits units across programs with a grid barrier, the per-step ``host`` plan
   is timed too, so that the choice between them is measured. Also the layernorm cell, on the
   triton backend (where it fits ``registers``, else the refusal is recorded) and on the fused
   one, against plain cuDNN.

Results are rewritten after every configuration to ``benchmarks/gpu-<device>.{md,json}``: a
crash or the time guard (``--budget-s``) leaves what was measured; an error in one
configuration is recorded in its row and the script goes on.

    python benchmarks/gpu.py            # the full grid
    python benchmarks/gpu.py --quick    # a few configurations, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import lstmkit
from lstmkit.backends import triton as triton_backend
from lstmkit.bench.report import _markdown_table
from lstmkit.bench.suite import inference_run, training_run

HERE = Path(__file__).parent
BATCHES, HIDDENS, STEPS = (1, 4, 16, 64, 256), (64, 128, 256, 512, 1024), (100, 1024)
EXTRA = [(16, 1024, 768)]  # (B, T, H); B=64, T=100, I=H=512 is already in the grid
QUICK = [(4, 100, 128), (16, 1024, 256), (64, 100, 512)]
# (B, T, H) of the layernorm cell: the size, and one that fits "registers"
LAYERNORM = [(64, 100, 512), (16, 1024, 64)]
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
# max |error| / max |float64 value|, per tensor, that a correctness check passes with
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2}
IMPLEMENTATIONS = ("triton", "fused", "cudnn")


def grid(quick: bool) -> list[tuple[int, int, int]]:
    """``(B, T, H)`` configurations, the issue's targets first (they are measured before the
    time guard can stop the run)."""
    if quick:
        return QUICK
    every = [(b, t, h) for t in STEPS for h in HIDDENS for b in BATCHES] + EXTRA

    def priority(config):
        b, t, h = config
        return 0 if (b <= 16 and h <= 256 and t == 1024) or (b, t, h) == (64, 100, 512) else 1

    return sorted(every, key=priority)


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """TF32 on (``"tf32"``) or off (otherwise) for cuBLAS, cuDNN and the triton kernels."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def forced_plan(mode: str | None) -> Iterator[None]:
    """The triton backend's plans forced to ``mode`` (``None``: as it chooses): ``"host"``
    one step per launch, ``"barrier"`` units split as far as the weights require."""
    if mode is None:
        yield
        return
    natural = triton_backend._plan

    def plan(batch, hidden, out_size, proj, itemsize, programs):
        chosen = natural(batch, hidden, out_size, proj, itemsize, programs)
        if chosen is None or chosen.mode == mode:
            return chosen
        block_h = 16 if mode == "host" else chosen.block_h
        slices = -(-hidden // block_h)
        return triton_backend.Plan(chosen.block_b, block_h, chosen.block_k, block_h, slices, mode)

    triton_backend._plan = plan
    try:
        yield
    finally:
        triton_backend._plan = natural


def plan_mode(batch: int, hidden: int, dtype: torch.dtype, proj: int = 0) -> str:
    plan = triton_backend._layer_plan(
        torch.empty(1, batch, 1, dtype=dtype, device="cuda"),
        {"weight_hh": torch.empty(4 * hidden, proj or hidden), "weight_hr": proj or None},
        None,
    )
    return "refused" if plan is None else f"{plan.mode}x{plan.slices}"


def max_relative_errors(model: nn.Module, reference: nn.Module, x, lengths) -> dict[str, float]:
    """Forward and backward of a fixed random weighting of every output through both models;
    per output and gradient, max |difference| / max |reference|."""
    results = []
    for m, inp in ((model, x), (reference, x.double())):
        m.zero_grad(set_to_none=True)
        inp = inp.detach().requires_grad_()
        output, (h_n, c_n) = m(inp, lengths=lengths)
        generator = torch.Generator(device="cuda").manual_seed(7)
        outs = {"output": output, "h_n": h_n, "c_n": c_n}
        weights = {
            k: torch.randn(v.shape, generator=generator, device="cuda", dtype=torch.float64)
            for k, v in outs.items()
        }
        sum((v.double() * weights[k]).sum() for k, v in outs.items()).backward()
        grads = {"grad input": inp.grad} | {f"grad {k}": p.grad for k, p in m.named_parameters()}
        results.append({k: v.detach().double() for k, v in (outs | grads).items()})
    ours, want = results
    return {
        k: ((ours[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)).item()
        for k in want
    }


CHECKS = [  # (name, cell, B, T, H, proj, bidirectional, with lengths, forced plan)
    ("registers", "lstm", 4, 50, 64, 0, True, True, None),
    ("registers+proj", "lstm", 8, 50, 64, 32, True, True, None),
    ("multi batch blocks", "lstm", 300, 20, 64, 0, False, True, None),
    ("barrier", "lstm", 16, 50, 256, 0, True, True, "barrier"),
    ("host", "lstm", 16, 20, 1024, 0, True, True, "host"),
    ("host H=256", "lstm", 16, 50, 256, 0, False, True, "host"),
    ("peephole registers+proj", "peephole", 8, 50, 64, 32, True, True, None),
    ("peephole barrier", "peephole", 16, 50, 256, 0, True, True, "barrier"),
    ("peephole host", "peephole", 16, 20, 1024, 0, False, True, "host"),
    ("layernorm registers", "layernorm", 16, 50, 64, 0, True, True, None),
    ("layernorm registers+proj", "layernorm", 8, 50, 64, 32, False, True, None),
]


def check_correctness(precisions) -> list[dict[str, object]]:
    rows = []
    for name, cell, batch, steps, hidden, proj, bidirectional, with_lengths, mode in CHECKS:
        for label in precisions:
            dtype = PRECISIONS[label]
            row = {"check": name, "precision": label, "B": batch, "T": steps, "H": hidden}
            try:
                torch.manual_seed(len(rows))
                config = {
                    "cell": cell,
                    "proj_size": proj,
                    "bidirectional": bidirectional,
                    "batch_first": True,
                }
                model = lstmkit.LSTM(32, hidden, **config, backend="triton").to("cuda", dtype)
                reference = lstmkit.LSTM(32, hidden, **config, backend="reference")
                reference.load_state_dict(model.state_dict())
                reference.to("cuda", torch.float64)
                x = torch.randn(batch, steps, 32, device="cuda").to(dtype)
                lengths = torch.randint(1, steps + 1, (batch,)) if with_lengths else None
                with precision(label), forced_plan(mode):
                    row["plan"] = plan_mode(batch, hidden, dtype, proj)
                    errors = max_relative_errors(model, reference, x, lengths)
                row["max_error"] = max(errors.values())
                row["worst"] = max(errors, key=errors.get)
                row["passed"] = row["max_error"] <= TOLERANCE[label]
            except Exception as error:  # recorded in the report, the run goes on
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc(limit=4)
            rows.append(row)
            print(row)
    return rows


def time_ms(run: Callable[[], None], budget_s: float) -> float:
    """Median milliseconds of ``run`` with CUDA events: one untimed call (compilation, caches),
    then as many timed ones as fit ``budget_s`` (3 to 20), after one more warm-up."""
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    repeats = int(min(20, max(3, budget_s * 1000 / max(once, 1e-3))))
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def models(batch_hidden: tuple[int, int], dtype, cell: str = "lstm") -> dict[str, nn.Module]:
    """The compared models with one set of weights, on the GPU in ``dtype``."""
    _, hidden = batch_hidden
    cudnn = nn.LSTM(hidden, hidden, batch_first=True)
    built = {
        "triton": lstmkit.LSTM(hidden, hidden, batch_first=True, cell=cell, backend="triton"),
        "fused": lstmkit.LSTM(hidden, hidden, batch_first=True, cell=cell, backend="fused"),
        "cudnn": cudnn,
    }
    if cell == "lstm":
        for model in built.values():
            model.load_state_dict(cudnn.state_dict())
    return {name: model.to("cuda", dtype) for name, model in built.items()}


def time_config(batch, steps, hidden, label, budget_s) -> dict[str, object]:
    """One row: the median ms of each implementation in inference and training."""
    dtype = PRECISIONS[label]
    row: dict[str, object] = {"B": batch, "T": steps, "I": hidden, "H": hidden}
    row["precision"] = label
    row["plan"] = plan_mode(batch, hidden, dtype)
    compared = models((batch, hidden), dtype)
    variants = [(name, None) for name in compared]
    if row["plan"].startswith("barrier"):
        variants.append(("triton", "host"))
    x = torch.randn(batch, steps, hidden, device="cuda", dtype=dtype)
    for mode, make in (("inference", inference_run), ("training", training_run)):
        for name, forced in variants:
            key = f"{mode} {name}" + (f" ({forced})" if forced else "")
            try:
                with precision(label), forced_plan(forced):
                    inp = x.detach().requires_grad_(mode == "training")
                    row[key] = time_ms(make(compared[name], inp), budget_s)
            except Exception as error:  # recorded in the report, the run goes on
                row[key] = f"{type(error).__name__}: {str(error)[:200]}"
                torch.cuda.empty_cache()
    return row


def layernorm_row(batch, steps, hidden, label, budget_s) -> dict[str, object]:
    """Training of the layernorm cell on the triton and the fused backends, and of plain cuDNN,
    at I = H (the triton backend refuses where the layer does not fit ``registers``: the
    refusal is recorded)."""
    dtype = PRECISIONS[label]
    compared = models((batch, hidden), dtype, cell="layernorm")
    x = torch.randn(batch, steps, hidden, device="cuda", dtype=dtype, requires_grad=True)
    row: dict[str, object] = {"B": batch, "T": steps, "I": hidden, "H": hidden}
    row["precision"] = label
    row["plan"] = plan_mode(batch, hidden, dtype)
    with precision(label):
        for name in ("triton", "fused", "cudnn"):
            try:
                row[f"training {name}"] = time_ms(training_run(compared[name], x), budget_s)
            except Exception as error:  # recorded in the report, the run goes on
                row[f"training {name}"] = f"{type(error).__name__}: {str(error)[:200]}"
    return row


def ratio(row: dict[str, object], mode: str, name: str = "triton") -> float | None:
    ours, cudnn = row.get(f"{mode} {name}"), row.get(f"{mode} cudnn")
    if isinstance(ours, float) and isinstance(cudnn, float):
        return ours / cudnn
    return None


def targets(rows: list[dict[str, object]], layernorm: list[dict[str, object]]) -> list[str]:
    """The issue's targets (training, triton / cuDNN) against what was measured."""
    lines = []
    for row in rows:
        b, t, h, label = row["B"], row["T"], row["H"], row["precision"]
        limit = None
        if b <= 16 and h <= 256 and t == 1024:
            limit = 0.67
        elif (b, t, h) == (64, 100, 512):
            limit = 1.10
        value = ratio(row, "training")
        if limit is not None:
            verdict = "not measured" if value is None else ("met" if value <= limit else "MISSED")
            shown = "-" if value is None else f"{value:.2f}"
            lines.append(f"- B={b} T={t} H={h} {label}: {shown} (target <= {limit}): {verdict}")
    for row in layernorm:
        size = f"B={row['B']} T={row['T']} H={row['H']} {row['precision']}"
        for name in ("triton", "fused"):
            value = ratio(row, "training", name)
            shown = "-" if value is None else f"{value:.2f}"
            verdict = "not measured" if value is None else ("met" if value <= 1.3 else "MISSED")
            lines.append(
                f"- layernorm ({name}) / plain cuDNN, {size}: {shown} (target <= 1.3): {verdict}"
            )
    return lines


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else f"error: {str(value)[:60]}"


def markdown(report: dict[str, object]) -> str:
    rows = report["timings"]
    keys = sorted({k for row in rows for k in row if k.startswith(("inference", "training"))})
    header = ["B", "T", "H", "prec", "plan", *[f"{k} ms" for k in keys]]
    header += ["inference triton/cuDNN", "training triton/cuDNN"]
    table = [
        [str(row["B"]), str(row["T"]), str(row["H"]), row["precision"], row["plan"]]
        + [cell(row.get(k)) for k in keys]
        + [cell(ratio(row, "inference")), cell(ratio(row, "training"))]
        for row in rows
    ]
    checks = [
        [c["check"], c["precision"], str(c.get("plan", "-")), f"{error:.1e}", verdict]
        for c in report["correctness"]
        for error in [c.get("max_error", float("nan"))]
        for verdict in [str(c["passed"]) if "passed" in c else cell(c.get("error"))]
    ]
    return "\n\n".join(
        [
            f"# GPU benchmark: {report['device']}",
            f"torch {report['torch']}, triton {report['triton']}, cuDNN {report['cudnn']}; "
            f"{'complete' if report['complete'] else 'INCOMPLETE: ' + report['stopped']}; "
            f"{report['elapsed_s']:.0f} s. Median ms of CUDA events; ratio < 1: triton faster.",
            "## Correctness against float64 (max |error| / max |value| over all tensors)",
            _markdown_table(["check", "precision", "plan", "max error", "passed"], checks),
            "## Targets (training, triton / cuDNN)",
            "\n".join(targets(rows, report["layernorm"])) or "none measured",
            "## Times",
            _markdown_table(header, table),
        ]
    )


def write(report: dict[str, object], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--budget-s", type=float, default=420, help="stop timing after this")
    parser.add_argument("--precisions", default="fp32,bf16", help="of fp32, tf32, bf16")
    parser.add_argument("--out", type=Path, default=None, help="stem of the .md / .json files")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    labels = [p.strip() for p in args.precisions.split(",")]
    device = torch.cuda.get_device_name()
    stem = args.out or HERE / f"gpu-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}"
    began = time.perf_counter()
    report: dict[str, object] = {
        "device": device,
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cudnn": torch.backends.cudnn.version(),
        "on_chip_bytes": triton_backend.ON_CHIP_BYTES,
        "correctness": [],
        "timings": [],
        "layernorm": [],
        "complete": False,
        "stopped": "running",
        "elapsed_s": 0.0,
    }
    report["correctness"] = check_correctness(["fp32", "tf32", "bf16"])
    configs = [(b, t, h, label) for b, t, h in grid(args.quick) for label in labels]
    per_timing = 0.05 if args.quick else 0.15
    for label in labels:
        for batch, steps, hidden in LAYERNORM:
            row = layernorm_row(batch, steps, hidden, label, per_timing)
            report["layernorm"].append(row)
    for done, (batch, steps, hidden, label) in enumerate(configs):
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            report["stopped"] = f"time guard after {done} of {len(configs)} configurations"
            break
        try:
            row = time_config(batch, steps, hidden, label, per_timing)
        except Exception as error:  # recorded in the report, the run goes on
            row = {"B": batch, "T": steps, "H": hidden, "precision": label, "plan": "-"}
            row["error"] = f"{type(error).__name__}: {error}"
            torch.cuda.empty_cache()
        report["timings"].append(row)
        report["elapsed_s"] = time.perf_counter() - began
        write(report, stem)
        print(f"{done + 1}/{len(configs)} {report['elapsed_s']:.0f}s", row)
    else:
        report["complete"], report["stopped"] = True, ""
    report["elapsed_s"] = time.perf_counter() - began
    write(report, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
