"""The application's configuration: dataclasses with a comment per field, read strictly.

:class:`TrainConfig` holds what the training loop needs and nothing about models; each task
extends it with its data and model fields (:mod:`lstmkit.train.tasks`). A configuration comes
from the defaults, then a JSON file (``--config``), then command-line flags (``--batch-size``
for ``batch_size``), each overriding the one before. Unknown keys, wrong types and values
out of range are :class:`ConfigError` with the key, what was expected and what was received.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass


class TrainError(Exception):
    """A mistake in the user's input to the application (configuration, data, run directory,
    checkpoint): the command line prints the message and exits with status 2, no traceback."""


class ConfigError(TrainError):
    """A configuration key that is unknown, of the wrong type or out of range."""


@dataclass
class TrainConfig:
    """What the training loop itself reads."""

    task: str = ""  # the task's name; set by each task's config class
    steps: int = 1000  # optimizer steps in all; a resumed run continues up to this count
    batch_size: int = 32  # sequences per step over all processes (split evenly among them)
    lr: float = 2e-3  # Adam's learning rate at the first step
    final_lr: float = 0.1  # the learning rate at the last step, as a fraction of lr (cosine)
    grad_clip: float = 1.0  # largest global gradient norm; 0 turns clipping off
    eval_every: int = 100  # steps between evaluations, each followed by a checkpoint
    log_every: int = 10  # steps between training-loss records in metrics.jsonl
    seed: int = 0  # seeds the initial weights, the data order and dropout
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    precision: str = "fp32"  # "fp32", or "bf16" for autocast (weights and Adam stay fp32)

    def validate(self) -> None:
        """Check values beyond their types; tasks extend it with their own fields."""
        check_positive(self, "steps", "batch_size", "eval_every", "log_every")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@functools.cache
def _source_lines(klass: type) -> list[str]:
    return inspect.getsource(klass).splitlines()


def field_comments(cls: type[TrainConfig]) -> dict[str, str]:
    """Each field's comment in the source of ``cls`` and its bases (``name: type = value  #
    comment``): the documentation of the settings, shown by ``lstmkit train --help``."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for line in _source_lines(klass):
            match = re.match(r"\s+(\w+): \w+ = .*?  # (.*)$", line)
            if match:
                comments[match[1]] = match[2]
    return comments


def field_types(cls: type[TrainConfig]) -> dict[str, type]:
    """Each field's type (``int``, ``float`` or ``str``), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: object, kind: type) -> object:
    """``value`` as ``kind``; an int is a valid float, a bool is never a number."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"config key {key!r} must be {kind.__name__}, got {value!r} ({type(value).__name__})"
    )


def from_mapping(cls: type[TrainConfig], values: Mapping[str, object]) -> TrainConfig:
    """A validated ``cls`` from its defaults updated by ``values``.

    Raises:
        ConfigError: a key ``cls`` does not have, a value of the wrong type, a value out of
            range, or a ``task`` that is not ``cls``'s.
    """
    types = field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} for task "
            f"{cls.task!r}; known keys: {', '.join(sorted(types))}"
        )
    if values.get("task", cls.task) != cls.task:
        raise ConfigError(f"config key 'task' must be {cls.task!r}, got {values['task']!r}")
    config = cls(**{key: _coerce(key, value, types[key]) for key, value in values.items()})
    config.validate()
    return config
