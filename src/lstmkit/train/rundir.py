"""A run directory, claimed by one trainer at a time.

While ``lstmkit train`` uses a run directory it holds an exclusive lock on ``RUN_DIR/lock``
(``fcntl.flock``), with its pid, host and start time written inside. The operating system
releases the lock when the process ends, however it ends (a ``kill -9`` included), so a lock
is never stale; the file itself stays and means nothing unlocked. A second trainer on the
same directory stops with a line naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from lstmkit.train import checkpoint
from lstmkit.train.config import TrainError
from lstmkit.train.metrics import METRICS

LOCK = "lock"


def _unusable(run_dir: Path, error: OSError) -> TrainError:
    reason = "it is a file" if isinstance(error, FileExistsError) else error.strerror
    return TrainError(f"cannot use run directory {run_dir}: {reason}")


def _lock(run_dir: Path) -> int:
    """An open descriptor of ``run_dir/lock``, locked, with this process's description."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _unusable(run_dir, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
    except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "starting up"
        os.close(fd)
        raise TrainError(
            f"{run_dir} is in use by another trainer ({holder}); wait for it to end or stop it"
        ) from None
    except OSError as error:
        os.close(fd)
        raise _unusable(run_dir, error) from None
    return fd


def _check(run_dir: Path, resume: bool) -> None:
    """What a fresh run or a resumed one needs to find in ``run_dir``."""
    for name in (checkpoint.CURRENT, checkpoint.NEW, checkpoint.OLD):
        if (run_dir / name).is_symlink():
            raise TrainError(
                f"{run_dir / name} is a symbolic link; every save replaces that directory by "
                "renaming, so it must be a real one (or absent)"
            )
    if resume:
        return
    existing = checkpoint.read_config(run_dir)
    if existing is not None:
        raise TrainError(
            f"{run_dir} already holds a checkpoint of task {existing['task']!r}; continue it "
            f"with --resume {run_dir}, or choose another --run-dir"
        )
    if (run_dir / METRICS).exists():
        raise TrainError(
            f"{run_dir} holds a {METRICS} but no checkpoint (a run that ended before its first "
            "checkpoint?); remove it or choose another --run-dir"
        )


@contextlib.contextmanager
def claimed(run_dir: Path, *, resume: bool, main: bool):
    """Hold ``run_dir`` for this trainer: create it for a fresh run, lock it, and check that
    it holds a checkpoint to resume, or for a fresh run neither a checkpoint nor metrics.
    Only the main process (rank 0, which writes) takes the lock and checks.

    Raises:
        TrainError: ``run_dir`` cannot be created or written (a file, under a file, read
            only), another trainer holds it, or it holds what a fresh run must not find.
    """
    if not main:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unusable(run_dir, error) from None
    fd = _lock(run_dir)
    try:
        _check(run_dir, resume)
        yield
    finally:
        os.close(fd)
