"""Render the documentation's benchmark tables from the committed results, never by hand.

A Markdown file holds each rendered region between two markers::

    <!-- render KIND PATH -->
    ...what render_region(KIND, PATH) writes...
    <!-- /render -->

PATH is relative to the repository root. ``python -m lstmkit.bench.render`` rewrites every
region of the README and ``docs/*.md``; with ``--check`` it changes nothing and exits 1 naming
each file whose regions differ from what it would write (the test suite runs that check). Each
rendered table names the CPU, torch version, repeats and date of its result file, and a result
file that does not name its CPU (model name, family, model number, vector flags) is refused.

Kinds:

- ``suite DIR``: ``lstmkit bench`` run at 2 and 1 threads (``DIR/threads-2/bench.json`` and
  ``DIR/threads-1/bench.json``): each configuration's inference and training time ÷
  nn.LSTM's, inference ÷ the faster of nn.LSTM and ONNX Runtime where ONNX Runtime ran, and
  the bytes saved for backward ÷ nn.LSTM's.
- ``variant DIR``: the same for a variant cell (``--cell``) against the plain nn.LSTM, with its
  TorchScript peer where the run had one.
- ``stream FILE``: ``lstmkit bench --stream``: each hidden size's time per ``step()`` against
  nn.LSTM's one-step sequences and ONNX Runtime's one-step runs.
- ``train FILE``: ``benchmarks/train/throughput.py``: the charlm model's training step, tokens
  a second with lstmkit and with nn.LSTM, and the time ratio.
- ``run DIR``: a training run directory (``lstmkit train --run-dir DIR``): one sentence with its
  last evaluation, its size and the machine(s) it ran on (``machine.jsonl``).
- ``runs DIR,DIR,...``: training runs, one row each: seed, batch, learning rate, budget, the
  steps taken and the last validation bits per character (else loss).
- ``samples FILE``: ``benchmarks/train/samples.py``'s result: per charlm run its seed, steps,
  evaluations and bits per character, and its printed sample's share of ordinary characters
  and count of lines mostly table characters.
- ``triton FILE``: ``python -m lstmkit.backends.triton_check``: per GPU target, cell and dtype,
  at each hidden size, the modes the triton backend's rule chose and whether their kernels
  compile without spills in a time loop, within shared memory and, for the barrier mode, with
  every program resident.
- ``curves DIR,DIR,...``: those runs' validation bits per character (else loss) at every
  evaluation step they share, one row a run.
- ``compile FILE``: ``benchmarks/compile/compile_vs_eager.py``: compiled ÷ eager per cell,
  configuration and mode.
- ``forecast DIR,DIR,...``: forecasting runs (``lstmkit train --task forecast``) of one series
  and split, seeds say: the test part's MAE and RMSE (``DIR/forecast.json``) of each run's
  LSTM and of the two baselines, each MAE ÷ the seasonal naive forecast's, with the series,
  the runs' size and their machine(s).
- ``serve FILE``: ``lstmkit bench --serve``: per model and client count, lstmkit's and
  nn.LSTM's throughput and p99 latency, their ratios, each one's first request against the same
  request warm, and lstmkit's largest difference from its serial outputs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lstmkit.bench.ort import NAME as ORT
from lstmkit.bench.report import markdown_table
from lstmkit.bench.serve import LSTMKIT as SERVED
from lstmkit.bench.suite import BASELINE
from lstmkit.bench.suite import PEER as SCRIPTED
from lstmkit.train import checkpoint, metrics
from lstmkit.train.tasks import FORECAST

BEGIN = re.compile(r"<!-- render (\w+) (\S+) -->\n")
END = "<!-- /render -->"
CPU_FIELDS = ("cpu", "cpu_family", "cpu_model", "cpu_vector_flags")
DOCS = ("README.md", "docs/*.md")


class RenderError(ValueError):
    """A region that cannot be rendered: unknown kind, missing or CPU-less result, no end."""


def load_result(path: Path) -> dict:
    """A result file's JSON, refused unless its ``machine`` names the CPU."""
    if not path.is_file():
        raise RenderError(f"result file {path} does not exist")
    result = _json(path.read_text(), path)
    _check_cpu(result.get("machine", {}), path)
    return result


def _json(text: str, path: Path, kind: type = dict):
    """One JSON object (or a ``kind``: ``list``) read from ``path``; anything else is a
    RenderError naming the file."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RenderError(f"{path} is not JSON: {error}") from error
    if not isinstance(value, kind):
        raise RenderError(
            f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def _check_cpu(machine: dict, path: Path) -> None:
    missing = [field for field in CPU_FIELDS if not machine.get(field)]
    if missing:
        raise RenderError(f"result file {path} does not name its CPU: no {', '.join(missing)}")


def describe(result: dict) -> str:
    """Where and how a result was measured: CPU, vector width, torch, repeats and date where
    the result records them."""
    machine, settings = result["machine"], result.get("settings", {})
    flags = machine["cpu_vector_flags"].split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    parts = [
        f"{machine['cpu']}, CPU family {machine['cpu_family']}, model {machine['cpu_model']} "
        f"({vector})",
        f"torch {machine['torch']}",
    ]
    if "repeats" in settings:
        parts.append(f"{settings['repeats']} repeats")
    if "requests" in settings:
        parts.append(f"{settings['requests']} requests")
    if "date" in machine:
        parts.append(machine["date"][:10])
    return "; ".join(parts)


def sources(runs: Sequence[tuple[str, dict]]) -> str:
    """The line under a table: each result file with where it was measured, said once where
    they all agree."""
    heads = [describe(result) for _, result in runs]
    if len(set(heads)) == 1:
        return f"{heads[0]}: " + ", ".join(f"`{path}`" for path, _ in runs) + "."
    pairs = zip(heads, runs, strict=True)
    return "; ".join(f"{head}: `{path}`" for head, (path, _) in pairs) + "."


def _shape(config: dict) -> str:
    shape = f"{config['batch']}, {config['seq_len']}, {config['hidden_size']}, "
    shape += str(config["num_layers"])
    return f"{config['name']} ({shape}{', bidirectional' if config['bidirectional'] else ''})"


def _median(config: dict, mode: str, name: str) -> float | None:
    timing = config["timings_ms"][mode].get(name)
    return None if timing is None else timing["median"]


def _ratio(value: float | None, by: float | None) -> str:
    return "—" if value is None or by is None else f"{value / by:.2f}"


def _ours(result: dict) -> str:
    return next(n for n in result["settings"]["implementations"] if n.startswith("lstmkit"))


def _two_runs(directory: str, root: Path) -> list[tuple[str, dict]]:
    """The 2-thread and the 1-thread run of ``directory``, which must time the same
    configurations in the same order."""
    runs = [
        (
            f"{directory}/threads-{n}/bench.json",
            load_result(root / directory / f"threads-{n}" / "bench.json"),
        )
        for n in (2, 1)
    ]
    names = [[config["name"] for config in result["configs"]] for _, result in runs]
    if names[0] != names[1]:
        raise RenderError(f"{directory}: the two runs time different configurations: {names}")
    return runs


def render_suite(directory: str, root: Path) -> str:
    runs = _two_runs(directory, root)
    header = ["config (B, T, I=H, layers)"]
    for threads in (2, 1):
        header += [f"{threads} thr: inference ÷ nn.LSTM", "÷ fastest peer", "training ÷ nn.LSTM"]
    header.append("saved for backward ÷ nn.LSTM")
    rows = []
    for index, config in enumerate(runs[0][1]["configs"]):
        row = [_shape(config)]
        for _, result in runs:
            ours, run = _ours(result), result["configs"][index]
            row.append(_ratio(_median(run, "inference", ours), _median(run, "inference", BASELINE)))
            peers = [_median(run, "inference", n) for n in (BASELINE, ORT)]
            fastest = min(p for p in peers if p is not None) if peers[1] is not None else None
            row.append(_ratio(_median(run, "inference", ours), fastest))
            row.append(_ratio(_median(run, "training", ours), _median(run, "training", BASELINE)))
        row.append(f"{config['saved_bytes_ratio_vs_baseline'][_ours(runs[0][1])]:.2f}")
        rows.append(row)
    return markdown_table(header, rows, 1) + "\n\n" + sources(runs)


def render_variant(directory: str, root: Path) -> str:
    runs = _two_runs(directory, root)
    cell = runs[0][1]["settings"]["cell"]
    scripted = all(SCRIPTED in result["settings"]["implementations"] for _, result in runs)
    peers = (BASELINE, SCRIPTED) if scripted else (BASELINE,)
    header = ["config (B, T, I=H, layers)"]
    for threads in (2, 1):
        header += [f"{threads} thr: {cell} inference ÷ nn.LSTM", "training ÷ nn.LSTM"]
        if scripted:
            header += ["inference ÷ TorchScript LN-LSTM", "training ÷ TorchScript LN-LSTM"]
    rows = []
    for index, config in enumerate(runs[0][1]["configs"]):
        row = [_shape(config)]
        for _, result in runs:
            ours, run = _ours(result), result["configs"][index]
            for peer in peers:
                for mode in ("inference", "training"):
                    row.append(_ratio(_median(run, mode, ours), _median(run, mode, peer)))
        rows.append(row)
    return markdown_table(header, rows, 1) + "\n\n" + sources(runs)


def render_stream(path: str, root: Path) -> str:
    result = load_result(root / path)
    header = ["H (B = 1, 2 layers)", "lstmkit step() µs", "nn.LSTM µs", "ONNX Runtime µs"]
    header += ["÷ nn.LSTM", "÷ ONNX Runtime"]
    rows = []
    for entry in result["results"]:
        times = entry["per_step_us"]
        ours = times["lstmkit.step"]
        rows.append(
            [
                str(entry["hidden_size"]),
                f"{ours:.0f}",
                f"{times[BASELINE]:.0f}",
                f"{times[ORT]:.0f}" if ORT in times else "—",
                _ratio(ours, times[BASELINE]),
                _ratio(ours, times.get(ORT)),
            ]
        )
    return markdown_table(header, rows, 1) + "\n\n" + sources([(path, result)])


def render_train(path: str, root: Path) -> str:
    result = load_result(root / path)
    header = ["batch (T, H, layers)", "lstmkit tokens/s", "nn.LSTM tokens/s", "step time ÷ nn.LSTM"]
    rows = [
        [
            f"{row['batch_size']} ({row['seq_len']}, {row['hidden_size']}, {row['num_layers']})",
            f"{row['lstmkit_tok_per_s']:.0f}",
            f"{row['nn_tok_per_s']:.0f}",
            f"{row['time_ratio']:.2f}",
        ]
        for row in result["rows"]
    ]
    return markdown_table(header, rows, 1) + "\n\n" + sources([(path, result)])


def _starts(run: Path) -> list[dict]:
    """The machines a training run started on (its ``machine.jsonl``), each naming its CPU."""
    path = run / metrics.MACHINES
    if not path.is_file():
        raise RenderError(f"run {run} records no machine ({metrics.MACHINES}): train it again")
    starts = [_json(line, path) for line in path.read_text().splitlines()]
    for start in starts:
        _check_cpu(start, path)
    return starts


def _run_config(run: Path) -> dict:
    """A training run's settings: a committed run keeps them beside its metrics, a live one in
    its checkpoint."""
    saved = run / "config.json"
    config = _json(saved.read_text(), saved) if saved.is_file() else checkpoint.read_config(run)
    if config is None:
        raise RenderError(f"run {run} has no config.json and no checkpoint")
    return config


def _last_evaluation(run: Path) -> dict:
    evaluations = [r for r in metrics.read(run) if any(k.startswith("eval_") for k in r)]
    if not evaluations:
        raise RenderError(f"run {run} has no evaluation in its metrics")
    return evaluations[-1]


def _layers(config: dict) -> str:
    layers = f"{config['num_layers']} layer" + ("s" if config["num_layers"] != 1 else "")
    return f"{layers} of {config['hidden_size']}"


def render_run(directory: str, root: Path) -> str:
    """One sentence: a training run's last evaluation, its size and where it ran."""
    run = root / directory
    starts = _starts(run)
    config = _run_config(run)
    last = _last_evaluation(run)
    if "eval_bpc" in last:
        result = f"Validation **{last['eval_bpc']:.2f} bits per character**"
    else:
        values = (f"{k[5:]} {v:.4g}" for k, v in last.items() if k.startswith("eval_"))
        result = "Validation " + ", ".join(values)
    budget = config["time_budget"]
    length = f"{budget:.0f} s of training" if budget else f"{config['steps']} steps"
    heads = dict.fromkeys(describe({"machine": start}) for start in starts)
    return (
        f"{result} after {last['step']} steps ({config['task']}, {_layers(config)}, batch "
        f"{config['batch_size']}, {length}); {'; '.join(heads)}: `{directory}/`."
    )


def _forecast_run(run: Path) -> tuple[dict, dict, int]:
    """A forecasting run's settings, its ``forecast.json`` and its last step."""
    path = run / FORECAST
    if not path.is_file():
        raise RenderError(f"run {run} has no {FORECAST}: it did not finish")
    return _run_config(run), _json(path.read_text(), path), metrics.read(run)[-1]["step"]


def render_forecast(directories: str, root: Path) -> str:
    """Comma-separated forecasting runs of one series and split (seeds, say), from their
    ``forecast.json``: the test part's MAE and RMSE of each run's LSTM, then of the two
    baselines (the same in every run), each MAE ÷ the seasonal naive forecast's."""
    runs = directories.split(",")
    loaded = [_forecast_run(root / directory) for directory in runs]
    config, first, _ = loaded[0]

    def baselines(result: dict) -> dict:
        return {k: v for k, v in result["test"].items() if k != "LSTM"} | {
            k: result[k] for k in ("series", "values", "test_start", "origins")
        }

    if any(baselines(result) != baselines(first) for _, result, _ in loaded):
        raise RenderError(f"runs {directories} forecast different series or test parts")
    naive = first["test"]["seasonal naive"]["mae"]

    def row(name: str, scores: dict) -> list[str]:
        mae, rmse = scores["mae"], scores["rmse"]
        return [name, f"{mae:.3f}", f"{rmse:.3f}", f"{mae / naive:.2f}"]

    rows = [
        row(f"LSTM, seed {c['seed']}" if len(runs) > 1 else "LSTM", result["test"]["LSTM"])
        for c, result, _ in loaded
    ]
    rows += [row(name, s) for name, s in first["test"].items() if name != "LSTM"]
    header = ["forecast", "test MAE", "test RMSE", "MAE ÷ seasonal naive's"]
    heads = dict.fromkeys(describe({"machine": m}) for d in runs for m in _starts(root / d))
    steps = "/".join(dict.fromkeys(str(step) for _, _, step in loaded))
    places = ", ".join(f"`{directory}/`" for directory in runs)
    return (
        markdown_table(header, rows, 1)
        + f"\n\nSeries: {first['series']} ({first['values']} values); test part from index "
        f"{first['test_start']}: {first['origins']} origins, each forecast {config['horizon']} "
        f"steps ahead from the {config['window']} before it; the LSTM {_layers(config)}, "
        f"{steps} steps of batch {config['batch_size']}; {'; '.join(heads)}: {places}."
    )


def render_runs(directories: str, root: Path) -> str:
    """Comma-separated training runs, one row each: seed, batch, learning rate, time budget (or
    steps), the steps taken and the last validation bits per character (else loss)."""
    rows, heads = [], []
    for directory in directories.split(","):
        run = root / directory
        heads += [describe({"machine": start}) for start in _starts(run)]
        config, last = _run_config(run), _last_evaluation(run)
        budget = config["time_budget"]
        result = f"{last['eval_bpc']:.3f} bpc" if "eval_bpc" in last else f"{last['eval_loss']:.4g}"
        rows.append(
            [
                f"`{directory}`",
                str(config["seed"]),
                str(config["batch_size"]),
                f"{config['lr']:g}",
                f"{budget:.0f} s" if budget else f"{config['steps']} steps",
                str(last["step"]),
                result,
            ]
        )
    header = ["run", "seed", "batch", "lr", "budget", "steps taken", "validation"]
    return markdown_table(header, rows, 1) + "\n\n" + "; ".join(dict.fromkeys(heads)) + "."


def render_samples(path: str, root: Path) -> str:
    """``benchmarks/train/samples.py``'s ``samples.json``: each run's seed, steps, evaluations
    and validation bits per character, and how its printed sample reads."""
    file = root / path
    if not file.is_file():
        raise RenderError(f"result file {file} does not exist")
    runs = _json(file.read_text(), file, list)
    for run in runs:
        _check_cpu(run["machine"], file)
    rows = [
        [
            str(r["seed"]),
            str(r["steps"]),
            str(r["evaluations"]),
            f"{r['bpc']:.3f}",
            f"{r['ordinary_share']:.3f}",
            str(r["layout_lines"]),
        ]
        for r in runs
    ]
    header = ["seed", "steps", "evaluations", "validation bpc", "sample: ordinary characters"]
    header.append("sample lines mostly table characters")
    heads = dict.fromkeys(describe({"machine": r["machine"]}) for r in runs)
    return markdown_table(header, rows, 1) + f"\n\n{'; '.join(heads)}: `{path}`."


def render_curves(directories: str, root: Path) -> str:
    """Comma-separated run directories' validation bits per character (else loss) at each
    evaluation step, one row a run."""
    runs = directories.split(",")
    evaluations, heads = [], []
    for directory in runs:
        run = root / directory
        heads += [describe({"machine": start}) for start in _starts(run)]
        evaluations.append({r["step"]: r for r in metrics.read(run) if "eval_loss" in r})
    steps = sorted(set.intersection(*(set(e) for e in evaluations)))
    if not steps:
        raise RenderError(f"runs {directories} have no evaluation step in common")
    key = "eval_bpc" if all("eval_bpc" in e[steps[0]] for e in evaluations) else "eval_loss"
    rows = [
        [f"`{directory}` {key[5:]}", *(f"{e[step][key]:.4f}" for step in steps)]
        for directory, e in zip(runs, evaluations, strict=True)
    ]
    table = markdown_table(["step", *map(str, steps)], rows, 1)
    return table + "\n\n" + "; ".join(dict.fromkeys(heads)) + "."


def render_compile(path: str, root: Path) -> str:
    result = load_result(root / path)
    configs = result["settings"]["configs"]
    header = ["cell", "config (B, T, I=H)", "mode", "eager ms", "compiled ms", "compiled ÷ eager"]
    rows = [
        [
            row["cell"],
            f"{row['config']} ({', '.join(map(str, configs[row['config']]))})",
            row["mode"],
            f"{row['eager_ms']:.2f}",
            f"{row['compiled_ms']:.2f}",
            f"{row['ratio']:.2f}",
        ]
        for row in result["rows"]
    ]
    return markdown_table(header, rows, 3) + "\n\n" + sources([(path, result)])


def render_serve(path: str, root: Path) -> str:
    result = load_result(root / path)
    by = {(r["model"], r["clients"], r["implementation"]): r for r in result["results"]}
    header = ["model", "clients", "requests/s lstmkit (nn.LSTM)", "p99 ms lstmkit (nn.LSTM)"]
    header += ["p99 ÷ nn.LSTM", "requests/s ÷ nn.LSTM"]
    header += [
        "first request ÷ steady, lstmkit (nn.LSTM)",
        "lstmkit's largest difference from serial",
    ]
    rows = []
    for (model, clients, name), ours in by.items():
        if name != SERVED:
            continue
        base = by[(model, clients, BASELINE)]
        first = [f"{r['first_ms'] / r['steady_ms']:.1f}" for r in (ours, base)]
        rows.append(
            [
                f"{model} (H = {ours['hidden_size']})",
                str(clients),
                f"{ours['requests_per_s']:.1f} ({base['requests_per_s']:.1f})",
                f"{ours['p99_ms']:.1f} ({base['p99_ms']:.1f})",
                _ratio(ours["p99_ms"], base["p99_ms"]),
                _ratio(ours["requests_per_s"], base["requests_per_s"]),
                f"{first[0]} ({first[1]})",
                f"{ours['max_abs_diff_vs_serial']:.1e}",
            ]
        )
    return markdown_table(header, rows, 1) + "\n\n" + sources([(path, result)])


def _kernel_state(row: dict) -> str:
    """What stands between a compiled kernel and a clean launch: nothing (``ok``), or its
    failure, spills (in a kernel that loops over time), shared memory over a block's limit, or
    a barrier launch whose programs are not all resident."""
    if not row["compiled"]:
        return "fails"
    if row["programs_per_sm"] == 0 or not row["shared_fits"]:
        return "shared"
    if row["mode"] == "barrier" and not row["co_resident"]:
        return "not resident"
    if row["mode"] != "host" and row["spill_stores"]:
        return "spills"
    return "ok"


def render_triton(path: str, root: Path) -> str:
    """``python -m lstmkit.backends.triton_check``'s ``compile.json``: per target, cell and
    dtype, at each hidden size, the modes the rule chose (R registers, B barrier, H host, over
    the batch sizes) and what their kernels' compiled form says (``ok``, ``spills`` in a time
    loop, ``fails`` to compile, ``shared`` memory over the limit, barrier ``not resident``)."""
    result = load_result(root / path)
    rows = result["rows"]
    hidden = sorted({size[0] for r in rows for size in r["sizes"]})
    states: dict[tuple, dict[int, set]] = {}
    for r in rows:
        key = (r["target"], r["cell"], r["dtype"])
        for h in {size[0] for size in r["sizes"]}:
            cell = states.setdefault(key, {}).setdefault(h, set())
            cell.add((r["mode"][0].upper(), _kernel_state(r)))
    table = []
    for (target, cell, dtype), by_hidden in states.items():
        entries = []
        for h in hidden:
            found = by_hidden.get(h, set())
            modes = "".join(sorted({mode for mode, _ in found}))
            problems = sorted({state for _, state in found} - {"ok"})
            entries.append(f"{modes} {', '.join(problems) or 'ok'}" if found else "refused")
        table.append([target, cell, dtype, *entries])
    header = ["target", "cell", "dtype", *(f"H {h}" for h in hidden)]
    triton = result["settings"]["triton"]
    return (
        markdown_table(header, table, 3 + len(hidden))
        + f"\n\nTriton {triton}; compiled on {describe(result)}: `{path}`."
    )


RENDERERS: dict[str, Callable[[str, Path], str]] = {
    "suite": render_suite,
    "variant": render_variant,
    "stream": render_stream,
    "train": render_train,
    "run": render_run,
    "curves": render_curves,
    "compile": render_compile,
    "serve": render_serve,
    "forecast": render_forecast,
    "runs": render_runs,
    "samples": render_samples,
    "triton": render_triton,
}


def render_region(kind: str, path: str, root: Path) -> str:
    if kind not in RENDERERS:
        raise RenderError(f"unknown render kind {kind!r}; expected one of {sorted(RENDERERS)}")
    return RENDERERS[kind](path, root)


def render_text(text: str, root: Path, name: str = "<text>") -> str:
    """``text`` with every region between markers replaced by what its marker renders."""
    out, position = [], 0
    for match in BEGIN.finditer(text):
        end = text.find(END, match.end())
        if end < 0:
            raise RenderError(f"{name}: the region opened by {match.group(0).strip()} has no {END}")
        out += [text[position : match.end()], render_region(match[1], match[2], root), "\n"]
        position = end
    return "".join(out) + text[position:]


def documents(root: Path) -> list[Path]:
    """The README and every Markdown file under ``docs/``."""
    return sorted(path for pattern in DOCS for path in root.glob(pattern))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstmkit.bench.render", description=__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root")
    args = parser.parse_args(argv)
    try:  # every file rendered before any is written: a broken region changes nothing
        rendered = [(path, path.read_text()) for path in documents(args.root)]
        rendered = [
            (path, text, render_text(text, args.root, str(path))) for path, text in rendered
        ]
    except (RenderError, OSError) as error:
        print(f"render: {error}", file=sys.stderr)
        return 1
    stale = [(path, new) for path, text, new in rendered if new != text]
    if args.check and stale:
        names = ", ".join(str(path.relative_to(args.root)) for path, _ in stale)
        print(
            f"render: stale regions in {names}: run python -m lstmkit.bench.render", file=sys.stderr
        )
        return 1
    try:
        for path, new in stale:
            path.write_text(new)
    except OSError as error:
        print(f"render: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
