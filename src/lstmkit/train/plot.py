"""Loss and metric curves from runs' ``metrics.jsonl``: one panel per quantity, one line per
run, so that two runs (lstmkit and ``--backend nn``, say) can be laid over each other."""

from __future__ import annotations

import io
from pathlib import Path

from torch import Tensor

from lstmkit.train import metrics
from lstmkit.train.checkpoint import atomic_write
from lstmkit.train.config import TrainError, require


def _pyplot():
    require("matplotlib").use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(plt, figure, out: Path) -> None:
    """``figure`` as the PNG ``out``, replaced whole or not at all."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write(out, buffer.getvalue())


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Each quantity's (steps, values); throughput is left out."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or key.endswith("_per_s"):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(value)
    return series


def draw(run_dirs: list[Path], out: Path) -> None:
    """Draw every run's curves into the PNG ``out``, which is replaced whole or not at all.

    Raises:
        TrainError: a run directory without metrics.
        OSError: ``out`` cannot be written.
    """
    runs = []
    for run_dir in run_dirs:
        records = metrics.read(run_dir)
        if not records:
            raise TrainError(f"{run_dir} holds no metrics ({run_dir / metrics.METRICS})")
        runs.append(_series(records))
    plt = _pyplot()
    # train and eval loss share the first panel; every other quantity has its own
    names = ["loss", *sorted({k for s in runs for k in s if not k.endswith("loss")})]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    labels = [str(d) for d in run_dirs]
    for series, label in zip(runs, labels, strict=True):
        for ax, name in zip(axes[0], names, strict=True):
            keys = ["train_loss", "eval_loss"] if name == "loss" else [name]
            for key in (k for k in keys if k in series):
                steps, values = series[key]
                suffix = f" {key.split('_')[0]}" if name == "loss" else ""
                ax.plot(
                    steps, values, label=f"{label}{suffix}", marker="." if len(steps) < 30 else None
                )
    for ax, name in zip(axes[0], names, strict=True):
        ax.set_xlabel("step")
        ax.set_title(name.removeprefix("eval_"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, figure, out)


def draw_forecast(
    out: Path, series: Tensor, origins: Tensor, forecasts: dict[str, Tensor], start: int
) -> None:
    """The PNG ``out``: ``series`` from index ``start`` (the history, then the truth), and
    each method's ``(len(origins), horizon)`` forecasts, one segment from each origin.

    Raises:
        OSError: ``out`` cannot be written.
    """
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(11, 4))
    steps = range(start, len(series))
    ax.plot(steps, series[start:].tolist(), color="black", linewidth=1, label="series")
    ax.axvline(int(origins[0]), color="grey", linestyle=":", label="test part begins")
    horizon = next(iter(forecasts.values())).size(1)
    for (name, forecast), color in zip(forecasts.items(), ("C3", "C0", "C2"), strict=False):
        for row, origin in enumerate(origins.tolist()):
            ax.plot(
                range(origin, origin + horizon),
                forecast[row].tolist(),
                color=color,
                linewidth=1.2,
                label=name if row == 0 else None,
            )
    ax.set_xlabel("time step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, figure, out)
