"""``lstmkit train``, ``lstmkit sample`` and ``lstmkit plot``.

Exit status: 0 done (or stopped at ``--stop-at``); 2 a mistake in the input (configuration,
data, run directory, checkpoint), one line ``lstmkit <command>: error: ...`` on stderr, no
traceback, nothing written; 1 the machine failed a run that had started (a full disk; the
last checkpoint intact) or a package of the ``train`` extra is missing; 128 + the signal
number when SIGINT (130), SIGTERM (143) or SIGHUP (129) stopped training, after a checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from lstmkit.train import checkpoint, loop, plot
from lstmkit.train.config import (
    ConfigError,
    TrainError,
    check_seed,
    field_types,
    from_mapping,
    help_texts,
)
from lstmkit.train.tasks import TASKS, Task

# every task's settings, each a --flag; the chosen task rejects the ones it does not have
_FIELDS = {
    name: kind
    for task in TASKS.values()
    for name, kind in field_types(task.Config).items()
    if name != "task"
}
RESUMABLE = {"steps", "time_budget"}  # the settings a resumed run may change


def _flags(names) -> str:
    return ", ".join(f"--{name.replace('_', '-')}" for name in names)


def add_arguments(commands) -> None:
    """Add the three commands to ``lstmkit``'s subcommand parsers."""
    train = commands.add_parser("train", help="train a task's model, with checkpoints")
    train.add_argument("--task", choices=sorted(TASKS), help="what to learn (default charlm)")
    train.add_argument("--run-dir", help="where to write (default runs/TASK-DATE-TIME)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run")
    train.add_argument("--config", type=Path, help="JSON file of settings (flags override it)")
    train.add_argument("--quiet", action="store_true", help="log lines instead of a bar")
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write metrics.jsonl's scalars for TensorBoard into RUN_DIR/tensorboard "
        "(needs the tensorboard extra: pip install 'lstmkit[tensorboard]')",
    )
    train.add_argument(
        "--stop-at", type=int, metavar="STEP", help="checkpoint and stop at STEP, to --resume later"
    )
    settings = train.add_argument_group("settings (see lstmkit.train.tasks for each task's)")
    # each setting's help texts (tasks may mean different things by one name), each with the
    # defaults of the tasks that mean it
    texts: dict[str, dict[str, list[str]]] = {}
    for task in TASKS.values():
        own = help_texts(task.Config)
        for name in field_types(task.Config):
            default = f"{task.name} {getattr(task.Config, name)!r}"
            texts.setdefault(name, {}).setdefault(own[name], []).append(default)
    for name, kind in _FIELDS.items():
        shown = "; ".join(f"{text} ({', '.join(d)})" for text, d in texts[name].items())
        settings.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=shown)

    sample = commands.add_parser("sample", help="generate text from a charlm run")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--prime", default="", help="text to start from (default a newline)")
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--length", type=int, default=500, help="characters to generate")
    sample.add_argument("--seed", type=int, default=0)

    draw = commands.add_parser("plot", help="draw runs' loss and metric curves to a PNG")
    draw.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    draw.add_argument("--out", help="the PNG (default RUN_DIR/curves.png)")


def _path(text: str, what: str) -> Path:
    """``text`` as a path; an empty one is refused (``Path("")`` would be ``.``)."""
    if not text:
        raise ConfigError(f"{what} is an empty path")
    return Path(text)


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read --config {str(path)!r}: {error}") from None
    except RecursionError:
        raise ConfigError(f"--config {str(path)!r} is nested too deeply") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"--config {str(path)!r} must hold a JSON object, got {type(values).__name__}"
        )
    return values


def saved_task(run_dir: Path, saved: dict, given: dict) -> Task:
    """The task of ``run_dir``'s checkpoint, configured as ``saved`` there, then ``given``.

    Raises:
        CheckpointError: the saved configuration is not a valid one (an edited config.json).
        ConfigError: ``given`` is not valid.
    """
    name = saved["task"]
    if name not in TASKS:
        raise checkpoint.CheckpointError(f"{run_dir}'s checkpoint names unknown task {name!r}")
    try:
        from_mapping(TASKS[name].Config, saved)
    except ConfigError as error:
        raise checkpoint.CheckpointError(
            f"{run_dir}'s checkpoint has a bad {checkpoint.CONFIG}: {error}"
        ) from None
    return TASKS[name](from_mapping(TASKS[name].Config, {**saved, **given}))


def configure(args) -> tuple[Task, Path, bool]:
    """The task, run directory and whether to resume, from the command line."""
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.stop_at is not None and args.stop_at <= 0:
        raise ConfigError(f"--stop-at must be a positive step, got {args.stop_at}")
    if args.resume is not None:
        if args.run_dir is not None or args.config is not None:
            raise ConfigError(
                "--resume RUN_DIR takes the run's own settings: drop --run-dir/--config"
            )
        run_dir = _path(args.resume, "--resume")
        saved = checkpoint.read_config(run_dir)
        if saved is None:
            raise TrainError(f"--resume {str(run_dir)!r}: no checkpoint there to resume")
        if args.task is not None and args.task != saved["task"]:
            raise TrainError(
                f"{run_dir} holds a checkpoint of task {saved['task']!r}, not {args.task!r}"
            )
        changed = sorted(set(given) - RESUMABLE)
        if changed:
            raise ConfigError(
                f"a resumed run keeps its settings; only {_flags(sorted(RESUMABLE))} may "
                f"change, got {_flags(changed)}"
            )
        return saved_task(run_dir, saved, given), run_dir, True
    values = _read_json(args.config) if args.config is not None else {}
    name = values.get("task", args.task or "charlm")
    if args.task is not None and name != args.task:
        raise ConfigError(f"--task {args.task} and --config's task {name!r} disagree")
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
    foreign = sorted(set(given) - set(field_types(TASKS[name].Config)))
    if foreign:
        raise ConfigError(f"task {name!r} has no setting(s) {_flags(foreign)}")
    if args.run_dir is None:
        run_dir = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        run_dir = _path(args.run_dir, "--run-dir")
    config = from_mapping(TASKS[name].Config, {**values, **given, "task": name})
    return TASKS[name](config), run_dir, False


def _train(args) -> int:
    task, run_dir, resume = configure(args)
    main_process = loop.is_main_process()
    if main_process:
        print(f"{'resuming' if resume else 'training'} in {run_dir}: {task.describe()}")
    loop.keep_freed_memory()
    outcome = loop.train(
        task,
        run_dir,
        resume=resume,
        quiet=args.quiet,
        stop_at=args.stop_at,
        tensorboard=args.tensorboard,
    )
    if not main_process:
        return 0
    if outcome.signal:
        print(
            f"interrupted by {signal.Signals(outcome.signal).name} at step {outcome.step}; "
            f"checkpoint saved; continue with lstmkit train --resume {run_dir}"
        )
        return 128 + outcome.signal
    if not outcome.finished:
        print(
            f"stopped at step {outcome.step} (--stop-at); checkpoint saved; continue with "
            f"lstmkit train --resume {run_dir}"
        )
        return 0
    shown = ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items())
    print(
        f"done: step {outcome.step}, {shown}, {outcome.units_per_second:,.0f} {task.unit}/s; "
        f"curves in {run_dir / 'curves.png'}"
    )
    text = task.summary(outcome.model, run_dir)
    if text:
        print(text)
    return 0


def _sample(args) -> int:
    run_dir = _path(args.run_dir, "RUN_DIR")
    check_seed("--seed", args.seed)
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.length < 0:
        raise ConfigError(f"--length must be >= 0, got {args.length}")
    saved = checkpoint.load(run_dir)
    task = saved_task(run_dir, saved.config, {"backend": "auto"})
    model = loop.build_model(task, torch.device("cpu"))
    checkpoint.load_into(model, saved)
    generator = torch.Generator().manual_seed(args.seed)
    print(args.prime + task.generate(model, args.prime, args.length, args.temperature, generator))
    return 0


def _plot(args) -> int:
    run_dirs = [_path(text, "RUN_DIR") for text in args.run_dirs]
    if args.out is None and len(run_dirs) > 1:
        raise ConfigError("plotting several runs needs --out FILE.png")
    out = run_dirs[0] / "curves.png" if args.out is None else _path(args.out, "--out")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; name a PNG file")
    try:
        plot.draw(run_dirs, out)
    except OSError as error:
        raise TrainError(f"cannot write {out}: {error.strerror or error}") from None
    print(f"wrote {out}")
    return 0


COMMANDS = {"train": _train, "sample": _sample, "plot": _plot}


def main(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except TrainError as error:
        message = " ".join(str(error).split())  # one line, whatever a library's message holds
        print(f"lstmkit {args.command}: error: {message}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(f"lstmkit {args.command}: aborted", file=sys.stderr)
        return 130
