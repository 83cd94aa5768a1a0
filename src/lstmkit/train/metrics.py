"""``RUN_DIR/metrics.jsonl``: a run's records, one JSON object per line, each with its
``step`` (training loss, learning rate and throughput every ``log_every`` steps; each
evaluation's metrics, prefixed ``eval_``). Rank 0 appends them while training; ``--resume``
and ``lstmkit plot`` read them back.

A damaged line (cut short by a crash, not UTF-8, not a JSON object with an integer ``step``
and numbers for values) is skipped wherever the log is read, with one warning line on stderr.

``RUN_DIR/machine.jsonl``: the machine of each start of the run (a fresh one, then each
``--resume``), one JSON object per line with the ``step`` it started from and the CPU, torch
version, thread count and date (:func:`lstmkit.machine.machine_info`): a run's results name
the CPU they came from, and every one where a resumed run moved.

``RUN_DIR/tensorboard`` (``lstmkit train --tensorboard``): the records of ``metrics.jsonl``
again, as TensorBoard scalars under the same names, at the same steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lstmkit.machine import machine_info
from lstmkit.train.checkpoint import atomic_write, writing
from lstmkit.train.config import TrainError

METRICS = "metrics.jsonl"
MACHINES = "machine.jsonl"
TENSORBOARD = "tensorboard"  # RUN_DIR/tensorboard: the same records as TensorBoard events


def record_machine(run_dir: Path, step: int, *, resumed: bool) -> None:
    """Record the machine this run starts on at ``step``: a new ``machine.jsonl`` for a fresh
    run, one more line for a resumed one."""
    path = run_dir / MACHINES
    line = json.dumps({"step": step, **machine_info(torch.get_num_threads())}) + "\n"
    with writing(path), open(path, "a" if resumed else "w", encoding="utf-8") as f:
        f.write(line)


def _parse(line: bytes) -> dict | None:
    """The record on ``line``, or ``None`` where the line is damaged."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None
    numbers = all(type(v) in (int, float) for v in record.values())
    return record if numbers else None


def read(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (none where there is no such file); damaged
    lines are skipped with a warning.

    Raises:
        TrainError: the file exists but cannot be read (a directory, no permission).
    """
    path = run_dir / METRICS
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise TrainError(f"cannot read {path}: {error}") from None
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        record = _parse(line)
        if record is None:
            damaged.append(number)
        else:
            records.append(record)
    if damaged:
        where = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        print(
            f"lstmkit: warning: skipped {len(damaged)} damaged line(s) of {path} (line {where})",
            file=sys.stderr,
        )
    return records


def summary_writer() -> type:
    """torch's TensorBoard ``SummaryWriter`` class.

    Raises:
        TrainError: the tensorboard package is not installed (one line naming the extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError(
            "--tensorboard needs the tensorboard package: pip install 'lstmkit[tensorboard]'"
        ) from None
    return SummaryWriter


class Log:
    """Appends records to ``run_dir/metrics.jsonl``, and each value as a scalar to ``board``
    (a ``SummaryWriter``) where one is given; a no-op where not ``enabled`` (every process but
    rank 0)."""

    def __init__(self, run_dir: Path, enabled: bool, board=None) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.board = board if enabled else None

    def append(self, record: dict) -> None:
        if self.enabled:
            with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for name, value in record.items():
                if name != "step":
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()  # a crash loses no event that metrics.jsonl holds

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step``, the checkpoint a run resumes from: drop those a
        crashed run wrote after it, and damaged lines."""
        if self.enabled and self.path.exists():
            kept = [r for r in read(self.path.parent) if r["step"] <= step]
            with writing(self.path):
                atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
