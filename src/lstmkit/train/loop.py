"""The training loop. It knows tasks only through :class:`lstmkit.train.tasks.Task` and
nothing about LSTMs: batches, a loss, Adam, evaluation, metrics, checkpoints.

One process, or several under ``torchrun`` (DistributedDataParallel: gloo on the CPU, NCCL on
CUDA). Every process draws the same global batch from a generator they hold in the same
state and trains on its own rows of it, so N processes take the same steps as one process
with the same ``batch_size``. Only rank 0 evaluates, logs and writes.

A run ends after ``steps`` steps or, with a ``time_budget``, once that many seconds went into
it (steps, evaluations and checkpoints, summed over the parts of a resumed run), whichever
comes first. The learning rate follows the run's progress: ``step / steps``, or with a time
budget the larger of that and ``elapsed / time_budget``.

A steps-based run is resumable bit for bit: a checkpoint holds the weights, Adam's state, the
step and every generator's state (the data order's, and each process's own for dropout). A
time-budget run resumes with the budget it had left (the checkpoint holds the seconds spent);
its learning rates depend on the machine's speed, so it is not repeatable bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstmkit.train import checkpoint, metrics, plot, rundir
from lstmkit.train.config import ConfigError, TrainConfig, TrainError, require
from lstmkit.train.tasks import Task

BYTES_TO_TRAIN = 16  # per float32 parameter: the weight, its gradient, Adam's two moments
TOOLS = ("tqdm", "safetensors.torch", "matplotlib")  # the train extra's: the bar, saves, plots


@dataclass
class Outcome:
    step: int  # the step training stopped at
    finished: bool  # every step taken, or the time budget spent
    signal: int  # the signal that stopped it early (SIGINT, SIGTERM or SIGHUP), or 0
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


@dataclass
class Clock:
    """How far a run has come; saved in its checkpoints."""

    step: int = 0
    units: int = 0  # what throughput counts (task.unit), trained on in all processes
    train_seconds: float = 0.0  # spent in training steps: the throughput's time
    elapsed: float = 0.0  # spent in the loop, evaluations and checkpoints too: the budget's


@dataclass
class Run:
    """What a run trains, and what its checkpoints hold besides the configuration."""

    task: Task
    processes: Processes
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: torch.Generator  # the data order, in the same state in every process
    clock: Clock = dataclasses.field(default_factory=Clock)


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


def progress(config: TrainConfig, clock: Clock) -> float:
    """The fraction of the run done, in [0, 1]: ``step / steps``, or with a time budget the
    larger of that and ``elapsed / time_budget``, so that it reaches 1 where the run ends."""
    done = clock.step / config.steps
    if config.time_budget:
        done = max(done, clock.elapsed / config.time_budget)
    return min(done, 1.0)


def finished(config: TrainConfig, clock: Clock) -> bool:
    """Every step taken, or the time budget spent."""
    spent = bool(config.time_budget) and clock.elapsed >= config.time_budget
    return clock.step >= config.steps or spent


def budget_tick(config: TrainConfig, elapsed: float) -> int:
    """How many times ``1 / eval_times`` of the time budget ``elapsed`` seconds hold (0
    without a budget or ``eval_times``): an evaluation is due whenever it grows."""
    if not (config.time_budget and config.eval_times):
        return 0
    return int(elapsed * config.eval_times / config.time_budget)


def learning_rate(config: TrainConfig, done: float) -> float:
    """Cosine decay from ``lr`` at progress 0 to ``final_lr * lr`` at progress 1: a function
    of the progress alone, so a resumed run needs no scheduler state."""
    return config.lr * (
        config.final_lr + (1 - config.final_lr) * (1 + math.cos(math.pi * done)) / 2
    )


def _seeds(seed: int, rank: int) -> tuple[int, int]:
    """(data order, dropout) seeds: the first shared by every process, the second its own;
    both distinct from ``seed`` itself, which draws the initial weights. Taken modulo 2**64,
    the range of ``torch.Generator.manual_seed``, so that every seed up to 2**63 - 1 works."""
    return (seed * 65536 + 65535) % 2**64, (seed * 65536 + 1 + rank) % 2**64


class _Signals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP (what job schedulers, ``timeout`` and a closed
    terminal send): the first asks to stop after the current step and save a checkpoint; a
    second one, of any of them, ends the process at once."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received = 0

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for caught in self.CAUGHT:
            default = signal.default_int_handler if caught == signal.SIGINT else signal.SIG_DFL
            signal.signal(caught, default)
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
            "(a second signal aborts at once)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self):
        previous = {caught: signal.signal(caught, self._handle) for caught in self.CAUGHT}
        try:
            yield self
        finally:
            for caught, handler in previous.items():
                signal.signal(caught, handler)

    def agreed(self, processes: Processes, elapsed: float) -> tuple[int, float]:
        """The signal any process received (0 for none), and the longest ``elapsed`` any
        process measured: every process must take the same steps at the same rates."""
        if processes.world == 1:
            return self.received, elapsed
        both = torch.tensor([self.received, elapsed], dtype=torch.float64, device=processes.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return int(both[0].item()), both[1].item()


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


# ------------------------------------------------------------------ setup


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_model(task: Task, device: torch.device) -> nn.Module:
    """``task``'s model on ``device``. The model checks its own options (sizes, cell,
    backend); its errors become :class:`ConfigError`. It is first built on the ``meta``
    device, which allocates nothing, to refuse a model too large to train on ``device``.

    Raises:
        ConfigError: an option the model refuses, or a model larger than ``device``'s memory.
    """

    def construct() -> nn.Module:
        try:
            return task.build_model()
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None

    with torch.device("meta"):
        count = sum(p.numel() for p in construct().parameters())
    needed, memory = count * BYTES_TO_TRAIN, _memory(device)
    if needed > memory:
        raise ConfigError(
            f"the model has {count:,} parameters, which need {needed / 2**30:,.1f} GiB to "
            f"train (weights, gradients, Adam's moments), more than the {memory / 2**30:.1f} "
            f"GiB of {device.type} memory here"
        )
    return construct().to(device)


def _autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(device.type, torch.bfloat16, enabled=config.precision == "bf16")


def _shard(config: TrainConfig, processes: Processes) -> slice:
    """This process's rows of every global batch."""
    rows = config.batch_size // processes.world
    return slice(processes.rank * rows, (processes.rank + 1) * rows)


def _try_a_step(task: Task, model: nn.Module, processes: Processes) -> None:
    """A forward and backward pass like the first step's, on a batch of its own, discarded:
    an option that the backend or cell cannot run on this device (the Triton backend without
    CUDA, the fused backend with a cell it has no kernel for) fails here, with the library's
    message, before the run starts."""
    batch = task.batch(torch.Generator().manual_seed(0), _shard(task.config, processes))
    inputs, targets = (t.to(processes.device) for t in batch)
    try:
        with _autocast(task.config, processes.device):
            loss = task.loss(model, inputs, targets)
        loss.backward()
    except (ValueError, TypeError, torch.cuda.OutOfMemoryError) as error:
        raise ConfigError(f"these settings cannot train on {processes.device}: {error}") from None
    finally:
        model.zero_grad(set_to_none=True)


def setup(task: Task, processes: Processes) -> Run:
    """A run at step 0: the task's data, its model (checked by :func:`build_model` and a
    trial step), Adam, and the generators seeded from ``seed``; the tools a run uses on its
    way are imported first, so that a missing one stops it before it trains."""
    for tool in TOOLS:
        require(tool)
    config, device = task.config, processes.device
    if config.batch_size % processes.world:
        raise TrainError(
            f"batch_size={config.batch_size} must be divisible by the number of processes "
            f"({processes.world})"
        )
    task.prepare()
    torch.manual_seed(config.seed)  # the same initial weights in every process and backend
    model = build_model(task, device)
    model.train()
    _try_a_step(task, model, processes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    data_seed, dropout_seed = _seeds(config.seed, processes.rank)
    torch.manual_seed(dropout_seed)
    return Run(task, processes, model, optimizer, torch.Generator().manual_seed(data_seed))


# ------------------------------------------------------------------ resume

STATE_TYPES = {
    "step": int,
    "units": int,
    "train_seconds": float,
    "elapsed": float,
    "optimizer": dict,
    "rng": dict,
}


def _check_moments(optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments must be shaped like their parameters (a swapped ``state.pt``)."""
    for param, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(
                    f"Adam's {name} is {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                )


def restore(run: Run, saved: checkpoint.Checkpoint) -> None:
    """Continue ``run`` from ``saved``: weights, Adam's state, clock and generators.

    Raises:
        CheckpointError: ``saved`` does not fit this run (weights of another model, a
            ``state.pt`` that lacks a key or holds something else).
    """
    checkpoint.load_into(run.model, saved)
    state, path = saved.state, saved.where / checkpoint.STATE
    for key, kind in STATE_TYPES.items():
        if not isinstance(state.get(key), kind):
            raise checkpoint.CheckpointError(f"{path} holds no {key!r} of type {kind.__name__}")
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        _check_moments(run.optimizer)
        _restore_rng(state["rng"], run.data, run.processes)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise checkpoint.CheckpointError(f"{path} does not fit this run: {error}") from None
    run.clock = Clock(**{f.name: state[f.name] for f in dataclasses.fields(Clock)})


# ------------------------------------------------------------------ steps, logs, evaluations


def _step(run: Run, trained: nn.Module, shard: slice) -> tuple[float, int, float]:
    """One optimizer step; its loss, the units it trained on (all processes) and seconds."""
    task, config, optimizer = run.task, run.task.config, run.optimizer
    started = time.perf_counter()
    inputs, targets = (t.to(run.processes.device) for t in task.batch(run.data, shard))
    with _autocast(config, run.processes.device):
        loss = task.loss(trained, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, progress(config, run.clock))
    if config.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    optimizer.step()
    value = loss.item()
    return value, task.units(inputs) * run.processes.world, time.perf_counter() - started


@dataclass
class _Window:
    """The training loss and throughput since the last record."""

    loss: float = 0.0
    steps: int = 0
    units: int = 0
    seconds: float = 0.0

    def add(self, loss: float, units: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.units, self.seconds = self.units + units, self.seconds + seconds

    def rate(self) -> float:
        return self.units / self.seconds

    def record(self, run: Run) -> dict:
        """The record of this window: its mean loss over every process, the learning rate of
        its last step, its throughput."""
        processes = run.processes
        mean = torch.tensor([self.loss / self.steps], device=processes.device)
        if processes.world > 1:
            dist.all_reduce(mean)
            mean /= processes.world
        record = {
            "step": run.clock.step,
            "train_loss": mean.item(),
            "lr": run.optimizer.param_groups[0]["lr"],
            f"{run.task.unit}_per_s": self.rate(),
        }
        return record


class _Progress:
    """A tqdm bar on rank 0, over the steps or the time budget; with ``quiet`` one log line
    per evaluation instead."""

    def __init__(self, run: Run, quiet: bool) -> None:
        tqdm = require("tqdm").tqdm
        config, clock = run.task.config, run.clock
        self.quiet, self.enabled, self.unit = quiet, run.processes.main, run.task.unit
        self.budget, self.steps = config.time_budget, config.steps
        total = self.budget or self.steps
        self.bar = tqdm(
            total=total,
            initial=min(clock.elapsed, total) if self.budget else clock.step,
            unit="s" if self.budget else "step",
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            if self.budget
            else None,
            dynamic_ncols=True,
            disable=quiet or not self.enabled,
        )

    def step(self, clock: Clock, loss: float, rate: float) -> None:
        shown = f"loss {loss:.4f}, {rate:,.0f} {self.unit}/s"
        if self.budget:
            self.bar.set_postfix_str(f"step {clock.step}, {shown}", refresh=False)
            self.bar.update(min(clock.elapsed, self.budget) - self.bar.n)
        else:
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update()

    def log(self, clock: Clock, result: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        spent = f"{clock.elapsed:.0f}" + (f"/{self.budget:.0f}" if self.budget else "")
        (print if self.quiet else self.bar.write)(
            f"step {clock.step}/{self.steps}: {shown} ({spent} s)"
        )

    def close(self) -> None:
        self.bar.close()


def _evaluate(run: Run) -> dict[str, float]:
    """The task's metrics on its held-out data, in evaluation mode (rank 0 only)."""
    run.model.eval()
    with _autocast(run.task.config, run.processes.device):
        result = run.task.evaluate(run.model, run.processes.device)
    run.model.train()
    return result


def _save(run: Run, run_dir: Path) -> None:
    """A checkpoint of ``run`` (a collective: every process's generator states)."""
    state = {
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_state(run.data, run.processes),
        **asdict(run.clock),
    }
    if run.processes.main:
        checkpoint.save(run_dir, asdict(run.task.config), run.model.state_dict(), state)


# ------------------------------------------------------------------ the loop


def _loop(
    run: Run, run_dir: Path, log: metrics.Log, quiet: bool, stop_at: int, resumed: bool
) -> Outcome:
    """Train until the run is finished, ``stop_at`` or a signal; evaluate and save on the
    way (every ``eval_every`` steps, and each time another ``1 / eval_times`` of the time
    budget is spent), and at the end."""
    config, clock, processes = run.task.config, run.clock, run.processes
    trained = nn.parallel.DistributedDataParallel(run.model) if processes.world > 1 else run.model
    shard = _shard(config, processes)
    bar, window, signals = _Progress(run, quiet), _Window(), _Signals()
    evaluated_at = clock.step if resumed else -1
    # the budget's share at the last evaluation (agreed between processes: a checkpoint follows)
    evaluated_tick = budget_tick(config, clock.elapsed)
    # the step of the last checkpoint, and whether it counts as finished when loaded: a run
    # that its time budget ends right after a checkpoint saves again, with the seconds spent
    saved = (clock.step, finished(config, clock)) if resumed else None
    last: dict[str, float] = {}

    def save() -> None:
        nonlocal saved
        _save(run, run_dir)
        saved = (clock.step, finished(config, clock))

    def evaluate_and_log() -> None:
        nonlocal last, evaluated_at, evaluated_tick
        if processes.main:
            last = _evaluate(run)
            log.append({"step": clock.step, **{f"eval_{k}": v for k, v in last.items()}})
            bar.log(clock, last)
        evaluated_at, evaluated_tick = clock.step, budget_tick(config, clock.elapsed)

    with signals.installed():
        begun, before = time.perf_counter(), clock.elapsed
        while True:
            received, clock.elapsed = signals.agreed(
                processes, before + time.perf_counter() - begun
            )
            if received or finished(config, clock) or clock.step >= stop_at:
                break
            loss, units, seconds = _step(run, trained, shard)
            clock.step, clock.units = clock.step + 1, clock.units + units
            clock.train_seconds += seconds
            window.add(loss, units, seconds)
            bar.step(clock, loss, window.rate())
            if clock.step % config.log_every == 0:
                log.append(window.record(run))
                window = _Window()
            due = budget_tick(config, clock.elapsed) > evaluated_tick
            if clock.step % config.eval_every == 0 or due:
                evaluate_and_log()
                save()
        bar.close()
        done = finished(config, clock)
        if done and evaluated_at != clock.step:
            evaluate_and_log()
        if saved != (clock.step, done):
            save()
    if done and not last and processes.main:
        last = _evaluate(run)  # resumed a finished run: nothing trained, report anyway
    if processes.main and metrics.read(run_dir):  # none yet after an early signal
        curves = run_dir / "curves.png"
        with checkpoint.writing(curves):
            plot.draw([run_dir], curves)
    rate = clock.units / clock.train_seconds if clock.train_seconds else 0.0
    return Outcome(clock.step, done, received, last, rate, run.model)


def train(
    task: Task,
    run_dir: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
    tensorboard: bool = False,
) -> Outcome:
    """Train ``task``'s model, writing into ``run_dir``, until its
    ``steps`` are taken or its ``time_budget`` is spent; with ``tensorboard``, the records of
    ``metrics.jsonl`` also as TensorBoard scalars in ``run_dir/tensorboard`` (a resumed run's
    events after its checkpoint, a crashed run's, purged first).

    With ``resume``, continue from ``run_dir``'s checkpoint exactly as if never stopped.
    Returns when done, at step ``stop_at`` (to be resumed later, e.g. under a job time
    limit), or after a SIGINT, SIGTERM or SIGHUP; in the last two cases once a checkpoint is
    saved. Every check of the input (configuration, data, model, run directory, checkpoint)
    comes before anything is written.

    Raises:
        TrainError: bad input, one line; :class:`~lstmkit.train.config.RunFailed` when
            writing fails during the run (a full disk), the last checkpoint intact.
    """
    writer = metrics.summary_writer() if tensorboard else None
    processes = start_processes(task.config.device)
    try:
        run = setup(task, processes)
        with rundir.claimed(run_dir, resume=resume, main=processes.main):
            if resume:
                restore(run, checkpoint.load(run_dir))
            board = None
            if writer is not None and processes.main:
                events = run_dir / metrics.TENSORBOARD
                board = writer(str(events), purge_step=run.clock.step + 1 if resume else None)
                print(f"TensorBoard: tensorboard --logdir {events}")
            log = metrics.Log(run_dir, processes.main, board)
            if resume:
                log.truncate(run.clock.step)
            if processes.main:
                metrics.record_machine(run_dir, run.clock.step, resumed=resume)
            try:
                return _loop(run, run_dir, log, quiet, stop_at or task.config.steps, resume)
            finally:
                log.close()
    finally:
        if processes.world > 1:
            dist.destroy_process_group()
