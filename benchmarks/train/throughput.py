"""Training throughput of the charlm task: lstmkit against ``--backend nn`` (torch.nn.LSTM).

Both models start from the same weights and train on the same batches; their training steps
(forward, backward, gradient clipping, Adam) alternate in one process, and the medians are
compared. Run from the repository root:

    .venv/bin/python benchmarks/train/throughput.py --batch-size 32 64

It writes ``benchmarks/train/throughput.json`` and ``.md`` beside itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lstmkit.machine import cpu_info
from lstmkit.train.config import from_mapping
from lstmkit.train.loop import keep_freed_memory, learning_rate
from lstmkit.train.tasks import CharLM, CharLMConfig


def step_seconds(task: CharLM, model: nn.Module, optimizer, inputs, targets) -> float:
    started = time.perf_counter()
    loss = task.loss(model, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), task.config.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(task.config, 0.0)
    optimizer.step()
    return time.perf_counter() - started


def measure(batch_size: int, steps: int, warmup: int) -> dict:
    config = from_mapping(CharLMConfig, {"batch_size": batch_size})
    task = CharLM(config)
    task.prepare()
    models, optimizers = {}, {}
    for backend in ("auto", "nn"):
        config.backend = backend
        torch.manual_seed(config.seed)
        models[backend] = task.build_model()
        optimizers[backend] = torch.optim.Adam(models[backend].parameters(), lr=config.lr)
    data = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"auto": [], "nn": []}
    for i in range(warmup + steps):
        inputs, targets = task.batch(data, slice(None))
        order = ("auto", "nn") if i % 2 == 0 else ("nn", "auto")
        for backend in order:
            seconds = step_seconds(task, models[backend], optimizers[backend], inputs, targets)
            if i >= warmup:
                times[backend].append(seconds)
    tokens = batch_size * config.seq_len
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch_size": batch_size,
        "seq_len": config.seq_len,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "lstmkit_tok_per_s": tokens / medians["auto"],
        "nn_tok_per_s": tokens / medians["nn"],
        "time_ratio": medians["auto"] / medians["nn"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave malloc's defaults alone (lstmkit train calls keep_freed_memory)",
    )
    args = parser.parse_args()
    if not args.glibc_defaults:
        keep_freed_memory()
    rows = [measure(b, args.steps, args.warmup) for b in args.batch_size]
    machine = {
        **cpu_info(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "malloc": "glibc defaults" if args.glibc_defaults else "keep_freed_memory()",
    }
    here = Path(__file__).parent
    (here / "throughput.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [
        "# charlm training throughput, lstmkit vs torch.nn.LSTM",
        "",
        f"2 layers, H=256, T=128, Adam + clipping; median of {args.steps} interleaved steps "
        f"each; torch {torch.__version__}, {torch.get_num_threads()} threads; malloc: "
        f"{machine['malloc']}; CPU {machine['cpu']} (family {machine.get('cpu_family')}, "
        f"model {machine.get('cpu_model')}; {machine.get('cpu_vector_flags')}); lstmkit's "
        "backend: auto.",
        "",
        "| batch | lstmkit tok/s | nn.LSTM tok/s | time ratio lstmkit / nn |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['lstmkit_tok_per_s']:,.0f} | {r['nn_tok_per_s']:,.0f} "
            f"| {r['time_ratio']:.2f} |"
        )
    (here / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
