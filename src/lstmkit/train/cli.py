"""``lstmkit train``, ``lstmkit sample`` and ``lstmkit plot``.

Mistakes in the input (configuration, data, run directory, checkpoint) print one line,
``lstmkit <command>: error: ...``, and exit with status 2; a Ctrl-C during training saves a
checkpoint and exits with status 130.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lstmkit.train import checkpoint, loop, plot
from lstmkit.train.config import (
    ConfigError,
    TrainError,
    field_comments,
    field_types,
    from_mapping,
)
from lstmkit.train.tasks import TASKS, CharModel, Task, generate

# every task's settings, each a --flag; the chosen task rejects the ones it does not have
_FIELDS = {
    name: kind
    for task in TASKS.values()
    for name, kind in field_types(task.Config).items()
    if name != "task"
}
RESUMABLE = {"steps"}  # the settings a resumed run may change


def add_arguments(commands) -> None:
    """Add the three commands to ``lstmkit``'s subcommand parsers."""
    train = commands.add_parser("train", help="train a task's model, with checkpoints")
    train.add_argument("--task", choices=sorted(TASKS), help="what to learn (default charlm)")
    train.add_argument("--run-dir", type=Path, help="where to write (default runs/TASK-TIME)")
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run")
    train.add_argument("--config", type=Path, help="JSON file of settings (flags override it)")
    train.add_argument("--quiet", action="store_true", help="log lines instead of a bar")
    train.add_argument(
        "--stop-at", type=int, metavar="STEP", help="checkpoint and stop at STEP, to --resume later"
    )
    settings = train.add_argument_group("settings (see lstmkit.train.tasks for each task's)")
    comments, defaults = {}, {}
    for task in TASKS.values():
        comments |= field_comments(task.Config)
        for name in field_types(task.Config):
            defaults.setdefault(name, []).append(f"{task.name} {getattr(task.Config, name)!r}")
    for name, kind in _FIELDS.items():
        shown = f"{comments[name]} ({', '.join(defaults[name])})"
        settings.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=shown)

    sample = commands.add_parser("sample", help="generate text from a charlm run")
    sample.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    sample.add_argument("--prime", default="", help="text to start from (default a newline)")
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--length", type=int, default=500, help="characters to generate")
    sample.add_argument("--seed", type=int, default=0)

    draw = commands.add_parser("plot", help="draw runs' loss and metric curves to a PNG")
    draw.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    draw.add_argument("--out", type=Path, help="the PNG (default RUN_DIR/curves.png)")


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read --config {str(path)!r}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"--config {str(path)!r} must hold a JSON object, got {type(values).__name__}"
        )
    return values


def configure(args) -> tuple[Task, Path, bool]:
    """The task, run directory and whether to resume, from the command line."""
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.resume is not None:
        if args.run_dir is not None or args.config is not None:
            raise ConfigError(
                "--resume RUN_DIR takes the run's own settings: drop --run-dir/--config"
            )
        run_dir = args.resume
        saved = checkpoint.read_config(run_dir)
        if saved is None:
            raise TrainError(f"--resume {str(run_dir)!r}: no checkpoint there to resume")
        if args.task is not None and args.task != saved["task"]:
            raise TrainError(
                f"{run_dir} holds a checkpoint of task {saved['task']!r}, not {args.task!r}"
            )
        changed = sorted(set(given) - RESUMABLE)
        if changed:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in changed)
            raise ConfigError(
                f"a resumed run keeps its settings; only --steps may change, got {flags}"
            )
        name, values = saved["task"], {**saved, **given}
        if name not in TASKS:
            raise checkpoint.CheckpointError(f"{run_dir}'s checkpoint names unknown task {name!r}")
    else:
        values = _read_json(args.config) if args.config is not None else {}
        name = values.get("task", args.task or "charlm")
        if args.task is not None and name != args.task:
            raise ConfigError(f"--task {args.task} and --config's task {name!r} disagree")
        if not isinstance(name, str) or name not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
        foreign = sorted(set(given) - set(field_types(TASKS[name].Config)))
        if foreign:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in foreign)
            raise ConfigError(f"task {name!r} has no setting(s) {flags}")
        values = {**values, **given, "task": name}
        run_dir = args.run_dir or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        existing = checkpoint.read_config(run_dir)
        if existing is not None:
            raise TrainError(
                f"{run_dir} already holds a checkpoint of task {existing['task']!r}; continue it "
                f"with --resume {run_dir}, or choose another --run-dir"
            )
    config = from_mapping(TASKS[name].Config, values)
    return TASKS[name](config), run_dir, args.resume is not None


def _train(args) -> int:
    task, run_dir, resume = configure(args)
    main_process = loop.is_main_process()
    if main_process:
        settings = ", ".join(f"{k}={v}" for k, v in vars(task.config).items() if k != "vocab")
        print(f"{'resuming' if resume else 'training'} in {run_dir}: {settings}")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ConfigError(f"--stop-at must be a positive step, got {args.stop_at}")
    loop.keep_freed_memory()
    outcome = loop.train(task, run_dir, resume=resume, quiet=args.quiet, stop_at=args.stop_at)
    if not main_process:
        return 0
    if outcome.interrupted:
        print(
            f"interrupted at step {outcome.step}; checkpoint saved; continue with "
            f"lstmkit train --resume {run_dir}"
        )
        return 130
    if outcome.step < task.config.steps:
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
    text = task.summary(outcome.model)
    if text:
        print(text)
    return 0


def _sample(args) -> int:
    saved = checkpoint.load(args.run_dir)
    if saved.config["task"] != "charlm":
        raise TrainError(
            f"{args.run_dir} holds a {saved.config['task']!r} run; sample needs a charlm run"
        )
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if args.length < 0:
        raise ConfigError(f"--length must be >= 0, got {args.length}")
    config = from_mapping(TASKS["charlm"].Config, {**saved.config, "backend": "auto"})
    model = CharModel(config)
    model.load_state_dict(saved.model)
    generator = torch.Generator().manual_seed(args.seed)
    text = generate(model, config.vocab, args.prime, args.length, args.temperature, generator)
    print(args.prime + text)
    return 0


def _plot(args) -> int:
    if args.out is None and len(args.run_dirs) > 1:
        raise ConfigError("plotting several runs needs --out FILE.png")
    out = args.out or args.run_dirs[0] / "curves.png"
    plot.draw(args.run_dirs, out)
    print(f"wrote {out}")
    return 0


COMMANDS = {"train": _train, "sample": _sample, "plot": _plot}


def main(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except TrainError as error:
        print(f"lstmkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lstmkit {args.command}: aborted", file=sys.stderr)
        return 130
