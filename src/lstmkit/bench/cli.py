"""The ``lstmkit bench`` subcommand: its arguments and what it runs."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lstmkit.bench import ort, serve, stream
from lstmkit.bench.report import write_reports
from lstmkit.bench.stream import run_stream, write_stream_reports
from lstmkit.bench.suite import GRID, Config, run_suite
from lstmkit.cells import CELLS
from lstmkit.machine import machine_info
from lstmkit.runner import BACKEND_NAMES

DEFAULT_RUNS = {"repeats": 7, "warmup": 2}
QUICK_RUNS = {"repeats": 3, "warmup": 1}


def _configs(text: str) -> list[Config]:
    """An argparse ``type``: comma-separated names from :data:`GRID`, in the given order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GRID]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(GRID)}, got {text!r}"
        )
    return [GRID[name] for name in dict.fromkeys(names)]


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        type=_configs,
        default=list(GRID.values()),
        help=f"comma-separated configurations to run (default: all of {','.join(GRID)})",
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKEND_NAMES,
        help="an lstmkit backend to time; repeat for several (default: auto)",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=["ort"],
        default=[],
        help="peers timed for inference (and, with --stream, one-step runs) besides nn.LSTM: "
        "ort = ONNX Runtime's LSTM operator on the model lstmkit.export.to_onnx writes (needs "
        f"the bench extra: {ort.INSTALL})",
    )
    parser.add_argument(
        "--cell",
        choices=list(CELLS),
        default="lstm",
        help="the lstmkit cell to time; the baselines stay the plain LSTM (default: lstm)",
    )
    parser.add_argument(
        "--repeats",
        type=_count(1),
        help=f"timed runs per implementation (default {DEFAULT_RUNS['repeats']})",
    )
    parser.add_argument(
        "--warmup",
        type=_count(0),
        help=f"untimed rounds first (default {DEFAULT_RUNS['warmup']})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: {repeats} repeats and {warmup} warm-up unless given".format(**QUICK_RUNS),
    )
    parser.add_argument(
        "--threads",
        type=_count(1),
        nargs="+",
        default=[2],
        help="torch intra-op thread counts, each a separate run (default 2); with several, "
        "each run writes into OUT/threads-N",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for bench.json, bench.md, bench.png (default benchmarks/cpu; with "
        "--stream: stream.json, stream.md in benchmarks/cpu-stream)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="time per-step latency of LSTM.step() against nn.LSTM with one-step sequences "
        "and carried hx (B=1, H in {128, 512}, 2 layers) instead of the suite",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve one model (the suite's M and T1 sizes) from 1, 2 and 4 client threads, "
        "lstmkit and nn.LSTM each in a fresh process: throughput, p50 / p99 / max latency, "
        "the first request's latency, outputs against a serial run (serve.json, serve.md in "
        "benchmarks/serve)",
    )
    parser.add_argument(
        "--requests",
        type=_count(1),
        default=200,
        help="with --serve: requests per run, B 1-64 and T 10-200 drawn with a fixed seed "
        "(default 200)",
    )
    parser.add_argument(
        "--steps",
        type=_count(1),
        default=200,
        help="with --stream: steps per timed run (default 200)",
    )


class UnwritableOut(Exception):
    """An ``--out`` directory that cannot be made or written to."""


def main(args: argparse.Namespace) -> int:
    """Run what the parsed ``args`` describe, print the tables and write the reports. An
    ``--out`` that cannot be written, found before any timing, or a failed write of the reports
    (a full disk) is one line on stderr and exit status 1."""
    try:
        return _run(args)
    except (UnwritableOut, OSError) as error:
        print(f"lstmkit bench: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    repeats = runs["repeats"] if args.repeats is None else args.repeats
    warmup = runs["warmup"] if args.warmup is None else args.warmup
    if args.stream:
        return stream_main(args, repeats, warmup)
    if args.serve:
        return serve_main(args)
    backends = list(dict.fromkeys(args.backend or ["auto"]))
    peers = _peers(args.peers, args.cell)
    for threads, out in _runs(args, Path("benchmarks/cpu")):
        machine = machine_info(threads)
        results = run_suite(args.configs, backends, repeats, warmup, threads, args.cell, peers)
        settings = {
            "repeats": repeats,
            "warmup": warmup,
            "backends": backends,
            "cell": args.cell,
            "peers": peers,
            "implementations": list(results[0].saved),
            "dtype": "float32",
            "batch_first": True,
        }
        tables = write_reports(out, results, machine, settings)
        print(f"\n{threads} thread(s):\n{tables}")
        print(f"wrote {out / 'bench.json'}, bench.md, bench.png")
    return 0


def _peers(names: list[str], cell: str) -> list[str]:
    """The requested peers that can run here; one line for each that cannot."""
    peers = list(dict.fromkeys(names))
    if "ort" in peers:
        why = ort.missing() or (
            None if cell == "lstm" else f"it runs the plain cell only, got --cell {cell}"
        )
        if why is not None:
            print(f"ONNX Runtime peer skipped: {why}")
            peers.remove("ort")
    return peers


def _runs(args: argparse.Namespace, default_out: Path) -> list[tuple[int, Path]]:
    """``(threads, directory)`` of each run: ``--out`` itself for one thread count, a
    ``threads-N`` directory inside it for each of several. Each directory is made here, and a
    file created and removed in it, so that one that cannot be written fails
    (:class:`UnwritableOut`) before the runs rather than after them."""
    out = args.out or default_out
    counts = list(dict.fromkeys(args.threads))
    runs = [(counts[0], out)] if len(counts) == 1 else [(n, out / f"threads-{n}") for n in counts]
    for _, directory in runs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as error:
            raise UnwritableOut(
                f"--out must be a directory it can write to, got {out} ({directory}: "
                f"{error.strerror or error})"
            ) from error
    return runs


def stream_main(args: argparse.Namespace, repeats: int, warmup: int) -> int:
    """``--stream``: time per-step latency and write ``stream.json`` / ``stream.md``."""
    for threads, out in _runs(args, Path("benchmarks/cpu-stream")):
        machine = machine_info(threads)
        peers = _peers(args.peers, "lstm")
        rows = run_stream(stream.HIDDEN_SIZES, args.steps, repeats, warmup, threads, peers)
        settings = {
            "repeats": repeats,
            "warmup": warmup,
            "steps": args.steps,
            "batch": 1,
            "num_layers": stream.NUM_LAYERS,
            "dtype": "float32",
            "mode": "eval, torch.no_grad()",
            "peers": peers,
        }
        table = write_stream_reports(out, rows, machine, settings)
        print(f"\n{threads} thread(s):\n{table}")
        print(f"wrote {out / 'stream.json'}, stream.md")
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """``--serve``: one model behind client threads; write ``serve.json`` / ``serve.md``."""
    for threads, out in _runs(args, Path("benchmarks/serve")):
        machine = machine_info(threads)
        try:
            rows = serve.run_serve(list(serve.MODELS), serve.CLIENTS, args.requests, threads)
        except serve.ServeError as error:
            print(f"lstmkit bench --serve: {error}", file=sys.stderr)
            return 1
        settings = {
            "requests": args.requests,
            "batch_sizes": serve.BATCHES,
            "lengths": serve.LENGTHS,
            "seed": serve.SEED,
            "dtype": "float32",
            "mode": "eval, torch.no_grad()",
        }
        table = serve.write_serve_reports(out, rows, machine, settings)
        print(f"\n{threads} thread(s):\n{table}")
        print(f"wrote {out / 'serve.json'}, serve.md")
    return 0
