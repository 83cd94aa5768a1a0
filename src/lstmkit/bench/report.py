"""Turning :class:`~lstmkit.bench.suite.ConfigResult`\\ s into a table, JSON, Markdown and a
chart. Every ratio is an implementation's figure divided by ``nn.LSTM``'s (lower is better)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lstmkit.bench.ort import NAME as ORT
from lstmkit.bench.suite import AGREEMENT_TOLERANCE, BASELINE, ConfigResult

MIB = 2**20

NOTES = f"""\
Times are medians of the timed runs; each repetition runs every implementation once, in an
order shuffled per repetition (fixed seed), after untimed warm-up rounds. Training is
forward plus backward of `output.sum()` with an input that requires grad; gradients are set
to `None` before each run.
Saved bytes are what autograd keeps for backward after one training forward, counted with
`torch.autograd.graph.saved_tensors_hooks`, each storage once at its full size. The ratio
uses the figure *excluding parameters*, which stay resident either way; the total is in
parentheses. On CPU in float32, {BASELINE} runs through oneDNN, whose backward keeps one
large uint8 workspace per layer and direction; it is counted like any other saved tensor.
"""


def time_ratios(result: ConfigResult, mode: str) -> dict[str, float]:
    """Median time of every implementation but ``nn.LSTM``, divided by ``nn.LSTM``'s."""
    timings = result.timings[mode]
    baseline = timings[BASELINE].median_s
    return {name: t.median_s / baseline for name, t in timings.items() if name != BASELINE}


def saved_ratios(result: ConfigResult) -> dict[str, float]:
    """Saved bytes excluding parameters of every implementation but ``nn.LSTM``, divided by
    ``nn.LSTM``'s."""
    baseline = result.saved[BASELINE].excluding_parameters
    return {
        name: saved.excluding_parameters / baseline
        for name, saved in result.saved.items()
        if name != BASELINE
    }


def to_json(
    results: Sequence[ConfigResult], machine: dict[str, object], settings: dict[str, object]
) -> dict[str, object]:
    """Everything measured, raw runs included, as JSON-ready data (times in ms)."""
    configs = []
    for result in results:
        configs.append(
            {
                **asdict(result.config),
                "description": result.config.describe(),
                "float32_error_vs_float64": result.errors,
                "error_bound": result.bounds,
                "suspect": sorted(result.suspect()),
                "timings_ms": {
                    mode: {
                        name: {
                            "median": timing.median_s * 1e3,
                            "runs": [run * 1e3 for run in timing.runs_s],
                        }
                        for name, timing in timings.items()
                    }
                    for mode, timings in result.timings.items()
                },
                "time_ratio_vs_baseline": {
                    mode: time_ratios(result, mode) for mode in result.timings
                },
                "saved_bytes": {name: asdict(saved) for name, saved in result.saved.items()},
                "saved_bytes_ratio_vs_baseline": saved_ratios(result),
            }
        )
    return {"baseline": BASELINE, "machine": machine, "settings": settings, "configs": configs}


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2
) -> str:
    """A Markdown table, its first ``text_columns`` columns left-aligned, the numbers after
    them right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * text_columns + ["--:"] * (len(header) - text_columns)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def peer_ratios(result: ConfigResult, mode: str) -> dict[str, float]:
    """Median time of every lstmkit implementation divided by the faster peer's (nn.LSTM or,
    where it was timed, ONNX Runtime); empty where nn.LSTM is the only peer."""
    timings = result.timings[mode]
    peers = [name for name in (BASELINE, ORT) if name in timings]
    if len(peers) < 2:
        return {}
    fastest = min(timings[name].median_s for name in peers)
    return {name: t.median_s / fastest for name, t in timings.items() if name.startswith("lstmkit")}


def markdown_tables(results: Sequence[ConfigResult]) -> str:
    """The time table (median ms and ratios per configuration and mode; where ONNX Runtime
    was timed, also each lstmkit implementation's ratio to the faster peer), the saved-bytes
    table (MiB excluding parameters, total in parentheses, and ratios) and the accuracy table
    (each float32 output's largest error against float64, marked where above its bound), in
    Markdown."""
    names = list(dict.fromkeys(n for r in results for t in r.timings.values() for n in t))
    others = [name for name in names if name != BASELINE]
    ours = [name for name in names if name.startswith("lstmkit")]
    with_peer = any(peer_ratios(result, "inference") for result in results)
    ratio_header = [f"{name} ÷ {BASELINE}" for name in others]
    peer_header = [f"{name} ÷ fastest peer" for name in ours] if with_peer else []
    time_rows = []
    for result in results:
        for mode, timings in result.timings.items():
            ratios, best = time_ratios(result, mode), peer_ratios(result, mode)
            time_rows.append(
                [result.config.name, mode]
                + [
                    f"{timings[name].median_s * 1e3:.2f}" if name in timings else "—"
                    for name in names
                ]
                + [f"{ratios[name]:.2f}" if name in ratios else "—" for name in others]
                + (
                    [f"{best[name]:.2f}" if name in best else "—" for name in ours]
                    if with_peer
                    else []
                )
            )
    # what has a training run and saves for backward, in any configuration (a peer may run in
    # some only: the TorchScript layer-norm LSTM has one layer and direction)
    modules = list(dict.fromkeys(name for result in results for name in result.saved))
    saved_rows = []
    for result in results:
        ratios = saved_ratios(result)
        saved_rows.append(
            [result.config.name, result.config.describe()]
            + [
                f"{s.excluding_parameters / MIB:.2f} ({s.total / MIB:.2f})"
                if s is not None
                else "—"
                for s in (result.saved.get(name) for name in modules)
            ]
            + [
                f"{ratios[name]:.2f}" if name in ratios else "—"
                for name in modules
                if name != BASELINE
            ]
        )
    error_rows = [
        [result.config.name, result.config.describe()]
        + [
            f"{result.errors[name]:.1e}" + (" ✗" if name in result.suspect() else "")
            if name in result.errors
            else "—"
            for name in names
        ]
        for result in results
    ]
    times = markdown_table(
        ["config", "mode", *(f"{name} ms" for name in names), *ratio_header, *peer_header],
        time_rows,
    )
    saved = markdown_table(
        ["config", "shape", *(f"{name} MiB" for name in modules)]
        + [f"{name} ÷ {BASELINE}" for name in modules if name != BASELINE],
        saved_rows,
    )
    errors = markdown_table(["config", "shape", *names], error_rows)
    return (
        f"Median time (ms) and ratio to {BASELINE}:\n\n{times}\n\n"
        f"Saved for backward, MiB excluding parameters (total), and ratio of the former:\n\n"
        f"{saved}\n\n"
        f"Largest |float32 output - float64 output| of the same weights (✗: above its bound, "
        f"max({AGREEMENT_TOLERANCE:g}, 2 x the float32 reference backend's) for a variant cell, "
        f"{AGREEMENT_TOLERANCE:g} otherwise):\n\n{errors}\n"
    )


def plot_ratios(results: Sequence[ConfigResult], path: Path) -> None:
    """A bar chart per mode of every time ratio per configuration, with a line at 1.0; none,
    with one line saying so, where matplotlib (an optional dependency) is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"{path.name} not drawn: matplotlib is not installed (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results[0].timings)
    labels = [result.config.name for result in results]
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        ratios = [time_ratios(result, mode) for result in results]
        names = list(dict.fromkeys(name for r in ratios for name in r))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            offsets = [i + (k - (len(names) - 1) / 2) * width for i in range(len(labels))]
            heights = [r.get(name, float("nan")) for r in ratios]
            bars = axis.bar(offsets, heights, width, label=name)
            axis.bar_label(bars, fmt="%.2f", fontsize=8)
        axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label=BASELINE)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_title(mode)
        axis.set_ylabel(f"median time ÷ {BASELINE}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(
    out: Path,
    results: Sequence[ConfigResult],
    machine: dict[str, object],
    settings: dict[str, object],
) -> str:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out`` (created if missing)
    and return the Markdown tables, for printing."""
    out.mkdir(parents=True, exist_ok=True)
    data = to_json(results, machine, settings)
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tables = markdown_tables(results)
    header = "\n".join(
        f"- {key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in {**machine, **settings}.items()
    )
    markdown = f"# lstmkit benchmark\n\n{header}\n\n{tables}\n{NOTES}"
    (out / "bench.md").write_text(markdown, encoding="utf-8")
    plot_ratios(results, out / "bench.png")
    return tables
