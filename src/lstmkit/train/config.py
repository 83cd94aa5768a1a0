"""The application's configuration: dataclasses with a help text per field, read strictly.

:class:`TrainConfig` holds what the training loop needs and nothing about models; each task
extends it with its data and model fields (:mod:`lstmkit.train.tasks`). A field is declared
with :func:`setting`, whose help text ``lstmkit train --help`` shows; a task that only changes
a default writes ``steps: int = 600``, and the help comes from the base class. A
configuration comes from the defaults, then a JSON file (``--config``), then command-line
flags (``--batch-size`` for ``batch_size``), each overriding the one before. Unknown keys,
wrong types, non-finite floats and values out of range are :class:`ConfigError` with the key,
what was expected and what was received.

Options of the model itself (sizes, cell, backend, dropout) are checked by the model's own
constructor, once, when the training loop builds it (:func:`lstmkit.train.loop.build_model`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import reprlib
import typing
from collections.abc import Mapping
from dataclasses import dataclass

MAX_SEED = 2**63 - 1  # torch.manual_seed's largest signed value


class TrainError(Exception):
    """A mistake in the user's input to the application (configuration, data, run directory,
    checkpoint): the command line prints the message on one line and exits with ``status``,
    no traceback."""

    status = 2


class ConfigError(TrainError):
    """A configuration key that is unknown, of the wrong type or out of range."""


class RunFailed(TrainError):
    """The machine failed a run that was going well (disk full, an I/O error while saving):
    exit status 1, and the last checkpoint is left as it was."""

    status = 1


class MissingTool(TrainError):
    """A package the application needs (the ``train`` extra) is not installed."""

    status = 1


def require(module: str):
    """``module`` imported: the application's tools (tqdm, safetensors, matplotlib) are the
    ``train`` extra, imported where they are used, so that the library needs torch alone.

    Raises:
        MissingTool: ``module`` is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MissingTool(
            f"lstmkit's training application needs {package}: pip install 'lstmkit[train]'"
        ) from None


def setting(default: object, help: str) -> typing.Any:
    """A configuration field: its default and the help text ``--help`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """What the training loop itself reads."""

    task: str = setting("", "the task's name; set by each task's config class")
    steps: int = setting(1000, "optimizer steps in all; with --time-budget, the most to take")
    time_budget: float = setting(
        0.0,
        "seconds of training (steps, evaluations, checkpoints) before it stops; the learning "
        "rate decays over them instead of over the steps; 0 = train all the steps",
    )
    batch_size: int = setting(32, "sequences per step over all processes (split evenly)")
    lr: float = setting(2e-3, "Adam's learning rate at the first step")
    final_lr: float = setting(0.1, "the learning rate at the end, as a fraction of lr (cosine)")
    grad_clip: float = setting(1.0, "largest global gradient norm; 0 turns clipping off")
    eval_every: int = setting(100, "steps between evaluations, each followed by a checkpoint")
    eval_times: int = setting(
        10,
        "with --time-budget, also an evaluation (and checkpoint) each time another 1/N of the "
        "budget is spent, so that a run shows N points however fast the machine; 0 = none",
    )
    log_every: int = setting(10, "steps between training-loss records in metrics.jsonl")
    seed: int = setting(0, "seeds the initial weights, the data order and dropout")
    device: str = setting("auto", "auto (CUDA when available), cpu or cuda")
    precision: str = setting("fp32", "fp32, or bf16 for autocast (weights and Adam stay fp32)")

    def validate(self) -> None:
        """Check values beyond their types; tasks extend it with their own fields."""
        check_positive(self, "steps", "batch_size", "eval_every", "log_every")
        check_seed("seed", self.seed)
        if self.eval_times < 0:
            raise ConfigError(f"eval_times must be >= 0 (0 = by steps only), got {self.eval_times}")
        if self.time_budget < 0:
            raise ConfigError(f"time_budget must be >= 0 (0 = no budget), got {self.time_budget}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.final_lr <= 1.0:
            raise ConfigError(f"final_lr must be in [0, 1] (a fraction of lr), got {self.final_lr}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("precision", self.precision, ("fp32", "bf16"))


def check_positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be a positive int, got {getattr(config, name)}")


def check_seed(name: str, seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name} must be in [0, 2**63 - 1], got {seed}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def help_texts(cls: type[TrainConfig]) -> dict[str, str]:
    """Each field's help text: from its own :func:`setting`, or the nearest base class's
    where a subclass only changes the default."""
    texts: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for field in dataclasses.fields(klass):
            if "help" in field.metadata:
                texts[field.name] = field.metadata["help"]
    return texts


def field_types(cls: type[TrainConfig]) -> dict[str, type]:
    """Each field's type (``int``, ``float`` or ``str``), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: object, kind: type) -> object:
    """``value`` as ``kind``; an int is a valid float, a bool is never a number, and a float
    must be finite (JSON's ``1e400`` reads as infinity)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value}")
        return value
    raise ConfigError(
        f"config key {key!r} must be {kind.__name__}, got {reprlib.repr(value)} "
        f"({type(value).__name__})"
    )


def from_mapping(cls: type[TrainConfig], values: Mapping[str, object]) -> TrainConfig:
    """A validated ``cls`` from its defaults updated by ``values``.

    Raises:
        ConfigError: a key ``cls`` does not have, a value of the wrong type or not finite, a
            value out of range, or a ``task`` that is not ``cls``'s.
    """
    types = field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(reprlib.repr, unknown))} for task "
            f"{cls.task!r}; known keys: {', '.join(sorted(types))}"
        )
    if values.get("task", cls.task) != cls.task:
        raise ConfigError(
            f"config key 'task' must be {cls.task!r}, got {reprlib.repr(values['task'])}"
        )
    config = cls(**{key: _coerce(key, value, types[key]) for key, value in values.items()})
    config.validate()
    return config
