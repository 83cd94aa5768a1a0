"""The training loop. It knows tasks only through :class:`lstmkit.train.tasks.Task` and
nothing about LSTMs: batches, a loss, Adam, evaluation, metrics, checkpoints.

One process, or several under ``torchrun`` (DistributedDataParallel: gloo on the CPU, NCCL on
CUDA). Every process draws the same global batch from a generator they hold in the same
state and trains on its own rows of it, so N processes take the same steps as one process
with the same ``batch_size``. Only rank 0 evaluates, logs and writes.

A run is resumable bit for bit: a checkpoint holds the weights, Adam's state, the step and
every generator's state (the data order's, and each process's own for dropout).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lstmkit.train import checkpoint
from lstmkit.train.config import TrainError
from lstmkit.train.tasks import Task

METRICS = "metrics.jsonl"


@dataclass
class Outcome:
    step: int  # the step training stopped at
    interrupted: bool  # stopped by Ctrl-C
    metrics: dict[str, float]  # the last evaluation's
    units_per_second: float  # training throughput over the whole run (rank 0's clock)
    model: nn.Module  # the trained model (not the DistributedDataParallel wrapper)


@dataclass
class Processes:
    """This process's place among the training processes."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MB for reuse instead of handing them
    back to the kernel. A training step allocates and frees the same large buffers (gates,
    their gradients: 16 MB each for charlm's defaults) every step; with glibc's defaults each
    is a fresh mapping whose first touch page-faults. On this project's 2-core machine
    keeping them took lstmkit's charlm training from ~31k to ~38k tokens/s, torch.nn.LSTM's
    by 0-18% (noisy; ``benchmarks/train/throughput.py --glibc-defaults``). Process-wide, so
    only the ``lstmkit train`` command calls it; a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest glibc accepts
    libc.mallopt(m_trim_threshold, 1 << 30)


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process); readable before the group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("device 'cuda' was asked for, but this PyTorch sees no CUDA device")
    return torch.device(name)


def start_processes(device: str) -> Processes:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    where = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(where)
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return Processes(where, dist.get_rank(), dist.get_world_size())


def learning_rate(config, step: int) -> float:
    """Cosine decay from ``lr`` at step 0 to ``final_lr * lr`` at ``steps``: a function of the
    step alone, so a resumed run needs no scheduler state."""
    progress = step / config.steps
    return config.lr * (
        config.final_lr + (1 - config.final_lr) * (1 + math.cos(math.pi * progress)) / 2
    )


def _seeds(seed: int, rank: int) -> tuple[int, int]:
    """(data order, dropout) seeds: the first shared by every process, the second its own;
    both distinct from ``seed`` itself, which draws the initial weights."""
    return seed * 65536 + 65535, seed * 65536 + 1 + rank


class _Interrupt:
    """Turns the first Ctrl-C into a request to stop after the current step; a second one
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            "\nstopping after this step to save a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self):
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def agreed(self, processes: Processes) -> bool:
        """Whether any process was asked to stop (every process must take the same steps)."""
        if processes.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=processes.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _rng_state(data: torch.Generator, processes: Processes) -> dict:
    """Generator states of every process, gathered on all of them (a collective)."""
    own = {"torch": torch.get_rng_state()}
    if processes.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(processes.device)
    states = [own]
    if processes.world > 1:
        states = [None] * processes.world
        dist.all_gather_object(states, own)
    return {"data": data.get_state(), "processes": states}


def _restore_rng(rng: dict, data: torch.Generator, processes: Processes) -> None:
    saved = rng["processes"]
    if len(saved) != processes.world:
        raise TrainError(
            f"the checkpoint was written by {len(saved)} process(es); resume it with the same "
            f"number, got {processes.world}"
        )
    data.set_state(rng["data"])
    torch.set_rng_state(saved[processes.rank]["torch"])
    if "cuda" in saved[processes.rank] and processes.device.type == "cuda":
        torch.cuda.set_rng_state(saved[processes.rank]["cuda"], processes.device)


class Metrics:
    """``RUN_DIR/metrics.jsonl``: one JSON object per line, appended by rank 0."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Drop the records a crashed run wrote after its last checkpoint, at ``step``."""
        if self.enabled and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r["step"] <= step]
            data = "".join(json.dumps(r) + "\n" for r in kept).encode()
            checkpoint.atomic_write(self.path, data)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a last line cut short by a crash is skipped."""
    records = []
    path = run_dir / METRICS
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


class _Progress:
    """A tqdm bar on rank 0, or with ``quiet`` one log line per evaluation."""

    def __init__(self, task: Task, step: int, quiet: bool, enabled: bool) -> None:
        from tqdm import tqdm

        self.quiet, self.enabled, self.unit = quiet, enabled, task.unit
        self.total = task.config.steps
        self.bar = tqdm(
            total=self.total,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            disable=quiet or not enabled,
        )

    def step(self, loss: float, rate: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} {self.unit}/s", refresh=False)
        self.bar.update()

    def log(self, text: str) -> None:
        if self.enabled:
            (print if self.quiet else self.bar.write)(text)

    def close(self) -> None:
        self.bar.close()


def train(
    task: Task,
    run_dir: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
) -> Outcome:
    """Train ``task``'s model for ``task.config.steps`` steps, writing into ``run_dir``.

    With ``resume``, continue from ``run_dir``'s checkpoint exactly as if never stopped.
    Returns when done, at step ``stop_at`` (to be resumed later, e.g. under a job time
    limit), or after a Ctrl-C; in the last two cases once a checkpoint is saved."""
    config = task.config
    processes = start_processes(config.device)
    try:
        return _train(task, run_dir, processes, resume, quiet, stop_at or task.config.steps)
    finally:
        if processes.world > 1:
            dist.destroy_process_group()


def _train(
    task: Task, run_dir: Path, processes: Processes, resume: bool, quiet: bool, stop_at: int
) -> Outcome:
    config, device = task.config, processes.device
    if config.batch_size % processes.world:
        raise TrainError(
            f"batch_size={config.batch_size} must be divisible by the number of processes "
            f"({processes.world})"
        )
    torch.manual_seed(config.seed)  # the same initial weights in every process and backend
    model = task.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    data_seed, dropout_seed = _seeds(config.seed, processes.rank)
    data = torch.Generator().manual_seed(data_seed)
    torch.manual_seed(dropout_seed)
    step, train_seconds, units_done = 0, 0.0, 0
    metrics = Metrics(run_dir, processes.main)
    if resume:
        saved = checkpoint.load(run_dir)
        try:
            model.load_state_dict(saved.model)
            optimizer.load_state_dict(saved.state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise checkpoint.CheckpointError(
                f"the checkpoint in {run_dir} does not fit this task's model: {error}"
            ) from None
        step = saved.state["step"]
        train_seconds, units_done = saved.state["train_seconds"], saved.state["units"]
        _restore_rng(saved.state["rng"], data, processes)
        metrics.truncate(step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    trained = nn.parallel.DistributedDataParallel(model) if processes.world > 1 else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=config.precision == "bf16")
    rows = config.batch_size // processes.world
    shard = slice(processes.rank * rows, (processes.rank + 1) * rows)

    def save() -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(data, processes),
            "train_seconds": train_seconds,
            "units": units_done,
        }
        if processes.main:
            checkpoint.save(run_dir, asdict(config), model.state_dict(), state)

    def evaluate() -> dict[str, float]:
        model.eval()
        with autocast:
            result = task.evaluate(model, device)
        model.train()
        return result

    progress = _Progress(task, step, quiet, processes.main)
    interrupt = _Interrupt()
    last: dict[str, float] = {}
    window_loss, window_steps, window_units, window_seconds = 0.0, 0, 0, 0.0
    model.train()
    with interrupt.installed():
        while step < min(stop_at, config.steps) and not interrupt.agreed(processes):
            started = time.perf_counter()
            inputs, targets = (t.to(device) for t in task.batch(data, shard))
            with autocast:
                loss = task.loss(trained, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = loss.item()
            seconds = time.perf_counter() - started
            step += 1
            units = task.units(inputs) * processes.world
            train_seconds, units_done = train_seconds + seconds, units_done + units
            window_loss, window_steps = window_loss + value, window_steps + 1
            window_units, window_seconds = window_units + units, window_seconds + seconds
            progress.step(value, window_units / window_seconds)
            if step % config.log_every == 0:
                mean = torch.tensor([window_loss / window_steps], device=device)
                if processes.world > 1:
                    dist.all_reduce(mean)
                    mean /= processes.world
                metrics.append(
                    {
                        "step": step,
                        "train_loss": mean.item(),
                        f"{task.unit}_per_s": window_units / window_seconds,
                    }
                )
                window_loss, window_steps, window_units, window_seconds = 0.0, 0, 0, 0.0
            if step % config.eval_every == 0 or step == config.steps:
                if processes.main:
                    last = evaluate()
                    metrics.append({"step": step, **{f"eval_{k}": v for k, v in last.items()}})
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
                    progress.log(f"step {step}/{config.steps}: {shown} ({train_seconds:.0f} s)")
                save()
    progress.close()
    interrupted = step < min(stop_at, config.steps)  # Ctrl-C, here or in another process
    if step < config.steps:
        save()
    elif not last and processes.main:
        last = evaluate()  # resumed at the last step: nothing trained, report anyway
    if processes.main and read_metrics(run_dir):  # none yet after an early Ctrl-C
        _draw_curves(run_dir)
    rate = units_done / train_seconds if train_seconds else 0.0
    return Outcome(step, interrupted, last, rate, model)


def _draw_curves(run_dir: Path) -> None:
    from lstmkit.train import plot

    plot.draw([run_dir], run_dir / "curves.png")
