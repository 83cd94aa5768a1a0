"""Checkpoints that survive a crash at any instant.

A checkpoint is the directory ``RUN_DIR/checkpoint/`` holding

- ``model.safetensors``: the model's ``state_dict`` (``torch.nn.LSTM``'s parameter names);
- ``config.json``: the run's configuration, with its ``task``;
- ``state.pt``: step, optimizer and random-number-generator states, plain tensors and
  containers that ``torch.load(..., weights_only=True)`` reads.

Saving writes a complete new directory ``checkpoint.new`` (every file and the directory
fsynced), then renames the current one to ``checkpoint.old`` and the new one into place, then
deletes the old. A crash before the first rename leaves ``checkpoint`` untouched; between the
two renames, ``checkpoint.old`` is the previous checkpoint, whole, and loading falls back to
it. Single files (the plot, a rewritten metrics log) go through :func:`atomic_write`. A save
that fails (a full disk) removes its ``checkpoint.new`` and leaves ``checkpoint`` as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lstmkit.train.config import RunFailed, TrainError, require

CURRENT, NEW, OLD = "checkpoint", "checkpoint.new", "checkpoint.old"
MODEL, CONFIG, STATE = "model.safetensors", "config.json", "state.pt"


class CheckpointError(TrainError):
    """A checkpoint that is missing, truncated or corrupted."""


@dataclass
class Checkpoint:
    config: dict  # the run's configuration, as saved
    model: dict[str, Tensor]  # the model's state_dict
    state: dict  # step, optimizer and generator states (see lstmkit.train.loop)
    where: Path  # the directory it was read from (checkpoint/, or checkpoint.old/)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a reader sees the old file or the new, whole;
    where that fails (``OSError``), ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def writing(what: Path):
    """Turn an ``OSError`` while writing ``what`` during a run (a full disk, an I/O error)
    into :class:`RunFailed`: one line, exit status 1."""
    try:
        yield
    except OSError as error:
        raise RunFailed(
            f"cannot write {what}: {error.strerror or error}; the last checkpoint is intact"
        ) from None


def _recover(run_dir: Path) -> None:
    """Undo a crash between the two renames of :func:`save`: the old checkpoint is the
    current one again."""
    if not (run_dir / CURRENT).exists() and (run_dir / OLD).exists():
        os.replace(run_dir / OLD, run_dir / CURRENT)
        _fsync_dir(run_dir)


def save(run_dir: Path, config: dict, model: dict[str, Tensor], state: dict) -> None:
    """Write a checkpoint of ``model`` (a state_dict), ``config`` and ``state`` into
    ``run_dir``, replacing the previous one only once the new one is complete on disk.

    Raises:
        RunFailed: writing failed (a full disk); the previous checkpoint is untouched.
    """
    _recover(run_dir)
    new = run_dir / NEW
    shutil.rmtree(new, ignore_errors=True)  # a save that crashed half-way
    try:
        _write_new(new, config, model, state)
    except OSError as error:
        shutil.rmtree(new, ignore_errors=True)
        raise RunFailed(
            f"cannot save a checkpoint in {run_dir}: {error.strerror or error}; the previous "
            "one is intact"
        ) from None
    shutil.rmtree(run_dir / OLD, ignore_errors=True)
    if (run_dir / CURRENT).exists():
        os.replace(run_dir / CURRENT, run_dir / OLD)
    os.replace(new, run_dir / CURRENT)
    _fsync_dir(run_dir)
    shutil.rmtree(run_dir / OLD, ignore_errors=True)


def _write_new(new: Path, config: dict, model: dict[str, Tensor], state: dict) -> None:
    safetensors = require("safetensors.torch")
    new.mkdir(parents=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.items()}
    metadata = {"step": str(state["step"])}
    _write_synced(new / MODEL, safetensors.save(tensors, metadata=metadata))
    _write_synced(new / CONFIG, json.dumps(config, indent=2).encode())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_synced(new / STATE, buffer.getvalue())
    _fsync_dir(new)


def location(run_dir: Path) -> Path | None:
    """The directory holding ``run_dir``'s latest complete checkpoint, if it has one."""
    for name in (CURRENT, OLD):
        if (run_dir / name / CONFIG).exists():
            return run_dir / name
    return None


def read_config(run_dir: Path) -> dict | None:
    """The configuration saved in ``run_dir``'s checkpoint, or ``None`` without one."""
    where = location(run_dir)
    if where is None:
        return None
    try:
        config = json.loads((where / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"cannot read {where / CONFIG}: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise CheckpointError(f"{where / CONFIG} holds no configuration with a 'task' key")
    return config


def load(run_dir: Path) -> Checkpoint:
    """Read ``run_dir``'s latest checkpoint onto the CPU.

    Raises:
        CheckpointError: there is none, or a file of it is missing, truncated or corrupted,
            or its files are from different steps.
    """
    config = read_config(run_dir)
    if config is None:
        raise CheckpointError(f"{run_dir} holds no checkpoint (no {run_dir / CURRENT / CONFIG})")
    where = location(run_dir)
    safetensors = require("safetensors")
    try:
        with safetensors.safe_open(where / MODEL, framework="pt") as f:
            names = f.keys()
            model = {name: f.get_tensor(name) for name in names}
            step = (f.metadata() or {}).get("step")
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"cannot read {where / MODEL}: {error}") from None
    try:
        state = torch.load(where / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"cannot read {where / STATE}: {error}") from None
    if not isinstance(state, dict) or str(state.get("step")) != step:
        raise CheckpointError(
            f"{where / STATE} (step {state.get('step') if isinstance(state, dict) else '?'}) "
            f"does not belong with {where / MODEL} (step {step})"
        )
    return Checkpoint(config, model, state, where)


def load_into(model: nn.Module, saved: Checkpoint) -> None:
    """Load ``saved``'s weights into ``model``, first checking that they fit it.

    Raises:
        CheckpointError: names missing or unexpected, or shapes that differ (a
            ``model.safetensors`` or ``config.json`` edited or swapped), in one line.
    """
    weights, expected = saved.model, model.state_dict()
    problems = [f"missing {name}" for name in expected if name not in weights]
    problems += [f"unexpected {name}" for name in weights if name not in expected]
    problems += [
        f"{name} is {tuple(weights[name].shape)}, the model's {tuple(t.shape)}"
        for name, t in expected.items()
        if name in weights and weights[name].shape != t.shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + ("; ..." if len(problems) > 4 else "")
        raise CheckpointError(
            f"the weights in {saved.where / MODEL} do not fit the model of its {CONFIG}: {shown}"
        )
    model.load_state_dict(weights)
