"""The tasks: each brings its data, its model and its metrics to the training loop.

A task is a :class:`Task` subclass with a configuration dataclass (:class:`LSTMConfig` and
its own fields), listed in :data:`TASKS`. The loop only calls :meth:`Task.prepare`,
:meth:`Task.build_model`, :meth:`Task.batch`, :meth:`Task.loss`, :meth:`Task.evaluate` and
:meth:`Task.units`; the command line calls :meth:`Task.describe`, :meth:`Task.summary` and,
for ``lstmkit sample``, :meth:`Task.generate`. A new task needs no edit anywhere else.

Data encodings:

- ``charlm``: the text's characters, sorted, are the vocabulary (``config.vocab``, saved with
  the run); a character's id is its position. The last ``val_fraction`` of the text is the
  validation split. A training example is a window of ``seq_len + 1`` characters at a random
  offset: ids ``[0, seq_len)`` in, ids ``[1, seq_len]`` as targets.
- ``adding``: ``(seq_len, 2)`` per sequence: column 0 holds values drawn from U(0, 1), column
  1 marks two of them with 1 (one in each half of the sequence); the target is the sum of the
  two marked values.
- ``digits``: scikit-learn's 8x8 digit images, pixels scaled to [0, 1], read top to bottom
  as 8 steps of 8 pixels; the target is the digit, 0-9.
- ``forecast``: a series (:mod:`lstmkit.train.series`) split in time into training,
  validation and test parts; an example is ``(window, 1)`` past values in, the next
  ``horizon`` values as targets, both minus the last past value and divided by the training
  part's standard deviation.
"""

from __future__ import annotations

import itertools
import json
import math
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstmkit.interop import to_torch
from lstmkit.modules import LSTM
from lstmkit.runner import BACKEND_NAMES
from lstmkit.train import checkpoint, plot, series
from lstmkit.train.config import (
    ConfigError,
    TrainConfig,
    TrainError,
    check_choice,
    check_positive,
    require,
    setting,
)

BACKENDS = (*BACKEND_NAMES, "nn")


@dataclass
class LSTMConfig(TrainConfig):
    """The model fields every task shares: an LSTM between an input layer and a head. The LSTM
    checks its own options when the loop builds it; only ``backend`` has a value of the
    application's own, ``nn``."""

    hidden_size: int = setting(128, "LSTM units per layer")
    num_layers: int = setting(1, "stacked LSTM layers")
    dropout: float = setting(0.0, "dropout between stacked layers, in training")
    cell: str = setting("lstm", "lstmkit cell: lstm, layernorm, peephole or cifg")
    backend: str = setting("auto", "an lstmkit backend (auto, fused, ...), or nn: torch.nn.LSTM")

    def validate(self) -> None:
        super().validate()
        check_choice("backend", self.backend, BACKENDS)


def recurrent(config: LSTMConfig, input_size: int) -> nn.Module:
    """The task's batch-first LSTM; with ``backend="nn"`` a ``torch.nn.LSTM`` holding the very
    weights lstmkit would start from, so that the two runs can be compared step for step."""
    backend = "auto" if config.backend == "nn" else config.backend
    lstm = LSTM(
        input_size,
        config.hidden_size,
        config.num_layers,
        batch_first=True,
        dropout=config.dropout,
        cell=config.cell,
        backend=backend,
    )
    return to_torch(lstm) if config.backend == "nn" else lstm


class Task:
    """What the loop and the command line need from a task. ``unit`` names what throughput
    counts. Constructing one is cheap; :meth:`prepare` reads the data."""

    name: ClassVar[str]
    Config: ClassVar[type[LSTMConfig]]
    unit: ClassVar[str] = "seq"

    def __init__(self, config: LSTMConfig) -> None:
        self.config = config

    def prepare(self) -> None:
        """Read or draw the data, before anything else of a run.

        Raises:
            TrainError: the data is missing or unusable with this configuration.
        """

    def build_model(self) -> nn.Module:
        """The model, from the configuration alone (``lstmkit sample`` builds it without
        :meth:`prepare`)."""
        raise NotImplementedError

    def batch(self, generator: torch.Generator, rows: slice) -> tuple[Tensor, Tensor]:
        """The next global batch of ``config.batch_size`` examples, drawn with ``generator``
        (which every process holds in the same state); returns its ``rows``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics on the held-out data, ``"loss"`` among them, in evaluation mode."""
        raise NotImplementedError

    def units(self, inputs: Tensor) -> int:
        return inputs.size(0)

    def describe(self) -> str:
        """The settings, one line, as ``lstmkit train`` prints them when it starts."""
        return _listed(asdict(self.config))

    def summary(self, model: nn.Module, run_dir: Path) -> str:
        """Text to print when training ends; files it writes go in ``run_dir``."""
        return ""

    def generate(
        self, model: nn.Module, prime: str, length: int, temperature: float, generator
    ) -> str:
        """``length`` items the trained ``model`` writes after ``prime``, for ``lstmkit
        sample``; ``generator`` draws them.

        Raises:
            TrainError: the task writes nothing (the default), or ``prime`` or
                ``temperature`` is unusable.
        """
        writers = [t.name for t in TASKS.values() if t.generate is not Task.generate]
        raise TrainError(
            f"task {self.name!r} writes no text; lstmkit sample needs a run of "
            f"{' or '.join(writers)}"
        )


def _listed(settings: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def _evaluate_batches(
    model: nn.Module, device: torch.device, inputs: Tensor, targets: Tensor, size: int = 256
):
    """``model``'s outputs on held-out ``inputs``, in batches of ``size``, with targets."""
    for start in range(0, inputs.size(0), size):
        x = inputs[start : start + size].to(device)
        yield model(x), targets[start : start + size].to(device)


class LastStep(nn.Module):
    """An LSTM whose last hidden state goes through a linear head: ``(N, L, I) -> (N, out)``."""

    def __init__(self, config: LSTMConfig, input_size: int, out: int) -> None:
        super().__init__()
        self.lstm = recurrent(config, input_size)
        self.head = nn.Linear(config.hidden_size, out)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.lstm(x)  # (N, L, H)
        return self.head(output[:, -1])


# ----------------------------------------------------------------------------- charlm


@dataclass
class CharLMConfig(LSTMConfig):
    task: str = "charlm"
    steps: int = 100_000  # a cap: the time budget ends the default run
    time_budget: float = 100.0  # with start-up, evaluations and the sample: ~2 minutes
    # small batches, many steps: a slow CPU takes a third or a sixth of a fast one's steps in
    # the budget. Intel Xeon, validation bpc (seed 0) at batch 32 / lr 6e-3 and batch 8 / lr
    # 8e-3: 100 s 1.83 / 1.83, 33 s 2.15 / 1.91, 17 s 2.69 / 2.05 (benchmarks/cpu-xeon/train/
    # budget). At batch 32, 100 s, seed 1: lr 3e-3 1.97, 5e-3 1.87, 8e-3 1.85, 1.2e-2 unstable
    batch_size: int = 8
    lr: float = 8e-3
    eval_every: int = 1000  # eval_times adds ten more, spread over the budget
    hidden_size: int = 256
    num_layers: int = 2
    data: str = setting("", "UTF-8 text file; empty = Python's documentation (pydoc_data)")
    seq_len: int = setting(128, "characters per training window (backpropagation through time)")
    embedding_size: int = setting(64, "width of each character's learned embedding")
    val_fraction: float = setting(0.05, "the text's last part, held out for validation")
    vocab: str = setting("", "the characters, sorted; empty = the text's (filled in at start)")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "seq_len", "embedding_size")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


# A line made of these (and spaces) only is layout: a table's border, a heading's underline, a
# rule. A grid table's border marks its columns with "+".
LAYOUT = frozenset("|+-=*~^ ")


def as_text(page: str) -> str:
    """``page`` (plain-text reStructuredText, as pydoc renders it) without its layout: lines of
    layout characters only are dropped, and each row of a grid table (``| cell | cell |``,
    between borders ``+----+----+``) becomes its cells' text, stripped and joined by two spaces
    (a row whose cells are all empty goes). Every other line is kept as it is: prose, code, and
    the grammar's ``| alternative`` lines."""
    out, columns = [], []
    for line in page.split("\n"):
        stripped = line.strip()
        if stripped and set(stripped) <= LAYOUT:
            if stripped.startswith("+"):  # a grid table's border: where its cells begin
                columns = [i for i, ch in enumerate(line) if ch == "+"]
            continue
        if columns and stripped.startswith("|") and line.find("|") == columns[0]:
            cells = [line[a + 1 : b].strip() for a, b in itertools.pairwise(columns)]
            if any(cells):
                out.append(line[: columns[0]] + "  ".join(cell for cell in cells if cell))
            continue
        columns = []
        out.append(line)
    return "\n".join(out)


def text_shares(text: str) -> tuple[float, int]:
    """How much ``text`` (a sample) reads as text: the share of its characters that are
    letters, digits, whitespace or ordinary punctuation (ASCII punctuation but the table
    characters ``|``, ``+``, ``=``), and how many of its lines are mostly table characters
    (``|``, ``+``, ``-``, ``=`` over half of the line's visible characters)."""
    ordinary = set(string.ascii_letters + string.digits + string.whitespace)
    ordinary |= set(string.punctuation) - set("|+=")
    share = sum(ch in ordinary for ch in text) / max(len(text), 1)
    visible = [line.replace(" ", "") for line in text.split("\n")]
    layout = sum(bool(v) and 2 * sum(ch in "|+-=" for ch in v) > len(v) for v in visible)
    return share, layout


def builtin_corpus() -> str:
    """Python's documentation topics, shipped with every CPython, in a fixed order, each as
    text (:func:`as_text`: without table borders, underlines and rules)."""
    from pydoc_data.topics import topics

    return "\n\n".join(as_text(topics[key]) for key in sorted(topics))


def read_text(path: str) -> str:
    """The UTF-8 text of ``path``, or the built-in corpus for ``""``."""
    if not path:
        return builtin_corpus()
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"data file {path!r} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TrainError(f"data file {path!r} is not UTF-8 text: {error}") from None
    if not text:
        raise TrainError(f"data file {path!r} is empty")
    return text


class CharModel(nn.Module):
    """Embedding, LSTM, linear head: ids ``(N, L)`` -> next-character logits ``(N, L, V)``."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        vocab = len(config.vocab)
        self.embed = nn.Embedding(vocab, config.embedding_size)
        self.lstm = recurrent(config, config.embedding_size)
        self.head = nn.Linear(config.hidden_size, vocab)

    def forward(self, ids: Tensor, state=None):
        output, state = self.lstm(self.embed(ids), state)  # (N, L, H)
        return self.head(output), state


def encode(text: str, vocab: str, what: str) -> Tensor:
    """``text`` as int64 ids into ``vocab``; ``what`` names the text in the error."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - index.keys())
    if missing:
        raise TrainError(
            f"{what} holds {len(missing)} character(s) outside the vocabulary: "
            f"{''.join(missing)[:40]!r}"
        )
    return torch.tensor([index[ch] for ch in text], dtype=torch.int64)


@torch.no_grad()
def sample_chars(
    model: CharModel,
    vocab: str,
    prime: str,
    length: int,
    temperature: float,
    generator: torch.Generator,
) -> str:
    """``length`` characters sampled after ``prime``, each from the model's softmax at
    ``temperature``; ``prime`` defaults to a newline (or the first character) when empty.

    Raises:
        TrainError: ``prime`` holds a character outside ``vocab``, or ``temperature`` is so
            small that the logits divided by it overflow (float64).
    """
    model.eval()
    device = next(model.parameters()).device
    prime = prime or ("\n" if "\n" in vocab else vocab[0])
    ids = encode(prime, vocab, "--prime").unsqueeze(0).to(device)  # (1, P)
    logits, state = model(ids)
    chars = []
    for _ in range(length):
        scaled = logits[0, -1].double().cpu() / temperature  # (V,)
        if not torch.isfinite(scaled).all():
            raise TrainError(
                f"temperature {temperature} is too small: the logits divided by it overflow; "
                "use 1e-3 or more (near 0 picks the likeliest character)"
            )
        probs = torch.softmax(scaled, -1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (1,)
        chars.append(vocab[nxt.item()])
        logits, state = model(nxt.view(1, 1).to(device), state)
    return "".join(chars)


class CharLM(Task):
    """Character-level language model; validation in bits per character."""

    name = "charlm"
    Config = CharLMConfig
    unit = "tok"

    def prepare(self):
        config = self.config
        text = read_text(config.data)
        if not config.vocab:
            config.vocab = "".join(sorted(set(text)))
        ids = encode(text, config.vocab, f"data {config.data or 'pydoc_data.topics'!r}")
        n_val = int(len(ids) * config.val_fraction)
        if min(n_val, len(ids) - n_val) < config.seq_len + 1:
            raise TrainError(
                f"the text has {len(ids)} characters: too short for seq_len={config.seq_len} "
                f"with val_fraction={config.val_fraction}, which needs at least "
                f"{config.seq_len + 1} in each of the training and validation parts"
            )
        self.train_ids, self.val_ids = ids[:-n_val], ids[-n_val:]

    def build_model(self) -> nn.Module:
        return CharModel(self.config)

    def batch(self, generator, rows):
        size, steps = self.config.batch_size, self.config.seq_len
        starts = torch.randint(0, len(self.train_ids) - steps, (size,), generator=generator)
        window = self.train_ids[starts[rows, None] + torch.arange(steps + 1)]  # (N, L + 1)
        return window[:, :-1], window[:, 1:]

    def loss(self, model, inputs, targets):
        logits, _ = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def units(self, inputs):
        return inputs.numel()

    @torch.no_grad()
    def evaluate(self, model, device):
        steps = self.config.seq_len
        n = (len(self.val_ids) - 1) // steps  # whole windows, each from a zero state
        inputs = self.val_ids[: n * steps].view(n, steps)
        targets = self.val_ids[1 : n * steps + 1].view(n, steps)
        total = 0.0
        for (logits, _), y in _evaluate_batches(model, device, inputs, targets):
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
            ).item()
        loss = total / targets.numel()
        return {"loss": loss, "bpc": loss / math.log(2)}

    def describe(self):
        settings = asdict(self.config)
        del settings["vocab"]  # a hundred characters, saved in the run's config.json
        return _listed(settings)

    def summary(self, model, run_dir):
        generator = torch.Generator().manual_seed(self.config.seed)
        return f"sample (temperature 0.8):\n{self.generate(model, '', 300, 0.8, generator)}"

    def generate(self, model, prime, length, temperature, generator):
        return sample_chars(model, self.config.vocab, prime, length, temperature, generator)


# ----------------------------------------------------------------------------- adding


@dataclass
class AddingConfig(LSTMConfig):
    task: str = "adding"
    steps: int = 6000
    batch_size: int = 128
    lr: float = 3e-3
    final_lr: float = 0.02
    eval_every: int = 500
    seq_len: int = setting(100, "steps per sequence, T")
    test_size: int = setting(2000, "held-out sequences, drawn once from their own seed")

    def validate(self) -> None:
        super().validate()
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (one marker per half), got {self.seq_len}")
        check_positive(self, "test_size")


def adding_problem(size: int, steps: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``size`` sequences of the adding problem: ``(size, steps, 2)`` inputs, ``(size,)`` sums."""
    values = torch.rand(size, steps, generator=generator)
    half = steps // 2
    first = torch.randint(0, half, (size,), generator=generator)
    second = torch.randint(half, steps, (size,), generator=generator)
    markers = torch.zeros(size, steps)
    rows = torch.arange(size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], -1), (values * markers).sum(1)


class Adding(Task):
    """The adding problem (Hochreiter & Schmidhuber 1997); "solved" is the fraction of test
    sequences predicted within 0.04. Predicting the mean, 1, gives an MSE of 1/6."""

    name = "adding"
    Config = AddingConfig

    def prepare(self):
        test_seed = torch.Generator().manual_seed(2**31 + self.config.seed)
        self.test = adding_problem(self.config.test_size, self.config.seq_len, test_seed)

    def build_model(self):
        return LastStep(self.config, 2, 1)

    def batch(self, generator, rows):
        inputs, targets = adding_problem(self.config.batch_size, self.config.seq_len, generator)
        return inputs[rows], targets[rows]

    def loss(self, model, inputs, targets):
        return F.mse_loss(model(inputs)[:, 0].float(), targets)

    @torch.no_grad()
    def evaluate(self, model, device):
        errors = torch.cat(
            [
                (out[:, 0].float() - y).cpu()
                for out, y in _evaluate_batches(model, device, *self.test)
            ]
        )
        return {
            "loss": errors.square().mean().item(),
            "solved": (errors.abs() < 0.04).float().mean().item(),
        }


# ----------------------------------------------------------------------------- digits


@dataclass
class DigitsConfig(LSTMConfig):
    task: str = "digits"
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 100
    test_fraction: float = setting(0.2, "images held out for the test, by a seeded shuffle")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``(1797, 8, 8)`` pixels in [0, 1] and labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise TrainError(
            "task 'digits' needs scikit-learn: pip install scikit-learn (or lstmkit[train])"
        ) from None
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


class Digits(Task):
    """Classify 8x8 digit images read row by row; reports test accuracy."""

    name = "digits"
    Config = DigitsConfig

    def prepare(self):
        images, labels = load_digits()
        seeded = torch.Generator().manual_seed(self.config.seed)
        order = torch.randperm(len(labels), generator=seeded)
        n_test = int(len(labels) * self.config.test_fraction)
        test, train = order[:n_test], order[n_test:]
        self.train_set = images[train], labels[train]
        self.test = images[test], labels[test]

    def build_model(self):
        return LastStep(self.config, 8, 10)

    def batch(self, generator, rows):
        images, labels = self.train_set
        pick = torch.randint(0, len(labels), (self.config.batch_size,), generator=generator)[rows]
        return images[pick], labels[pick]

    def loss(self, model, inputs, targets):
        return F.cross_entropy(model(inputs).float(), targets)

    @torch.no_grad()
    def evaluate(self, model, device):
        total = correct = 0.0
        for logits, y in _evaluate_batches(model, device, *self.test):
            total += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        n = len(self.test[1])
        return {"loss": total / n, "accuracy": correct / n}


# ----------------------------------------------------------------------------- forecast


@dataclass
class ForecastConfig(LSTMConfig):
    task: str = "forecast"
    steps: int = 3000
    time_budget: float = 60.0
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 250
    hidden_size: int = 64
    data: str = setting("", "CSV file, a header row first; empty = weekly Mauna Loa CO2")
    column: str = setting("", "the --data CSV's column to forecast")
    window: int = setting(104, "past values the model reads for each forecast")
    horizon: int = setting(52, "values forecast at once: 1 to horizon steps ahead")
    season: int = setting(52, "the series' seasonal period in steps, for the baselines; 1 = none")
    val_fraction: float = setting(0.15, "the part before the test part, held out for validation")
    test_fraction: float = setting(0.15, "the series' last part, held out for the test")

    def validate(self) -> None:
        super().validate()
        check_positive(self, "window", "horizon", "season")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ConfigError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if bool(self.data) != bool(self.column):
            raise ConfigError(
                "--data FILE.csv and --column NAME go together (the built-in series needs "
                f"neither); got data={self.data!r}, column={self.column!r}"
            )


FORECAST, PLOT = "forecast.json", "forecast.png"


class Forecast(Task):
    """Multi-step forecasting of a series, split in time: the first part trains, the next
    validates, the last (``test_fraction``) tests. An example is a window of ``window`` values
    before an origin and the ``horizon`` values from it. The model reads the window relative
    to its last value, divided by the training part's standard deviation (fitted there only),
    and forecasts the horizon on the same scale, so that a level the training part never
    reached (a trend) is no extrapolation. Losses are mean squared errors on that scale; MAE
    and RMSE are in the series' units."""

    name = "forecast"
    Config = ForecastConfig

    def prepare(self):
        config = self.config
        require("statsmodels.tsa.holtwinters")  # the baseline, needed at the end of the run
        if config.data:
            self.series = series.read_column(config.data, config.column)
            what = f"column {config.column!r} of {config.data!r}"
        else:
            self.series = series.co2_weekly()
            what = "the CO2 series"
        n = len(self.series)
        n_test, n_val = int(n * config.test_fraction), int(n * config.val_fraction)
        self.val_start, self.test_start = n - n_test - n_val, n - n_test
        # a training origin needs a window before it, all of it in the training part;
        # Holt-Winters fits two seasons at least
        least = max(config.window + config.horizon, 2 * config.season)
        if min(n_test, n_val) < config.horizon or self.val_start < least:
            raise TrainError(
                f"{what} has {n} values: too few for window={config.window}, "
                f"horizon={config.horizon} and season={config.season} with "
                f"val_fraction={config.val_fraction} and test_fraction="
                f"{config.test_fraction}, which need {least} in the training part and "
                f"{config.horizon} in each of the others"
            )
        self.scale = self.series[: self.val_start].std().item() or 1.0

    def origins(self, start: int, end: int) -> Tensor:
        """Every origin whose horizon lies in ``[start, end)``."""
        return torch.arange(max(start, self.config.window), end - self.config.horizon + 1)

    def ahead(self, origins: Tensor) -> Tensor:
        """The ``(N, horizon)`` values from each origin on, in the series' units."""
        return self.series[origins[:, None] + torch.arange(self.config.horizon)]

    def examples(self, origins: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs ``(N, window, 1)`` and targets ``(N, horizon)`` on the model's scale, and
        each origin's last known value ``(N, 1)`` that both are relative to."""
        past = self.series[origins[:, None] + torch.arange(-self.config.window, 0)]
        future = self.ahead(origins)
        last = past[:, -1:]
        inputs = ((past - last) / self.scale).float().unsqueeze(-1)
        return inputs, ((future - last) / self.scale).float(), last

    def build_model(self):
        return LastStep(self.config, 1, self.config.horizon)

    def batch(self, generator, rows):
        first, end = self.origins(0, self.val_start)[[0, -1]].tolist()
        picked = torch.randint(first, end + 1, (self.config.batch_size,), generator=generator)
        inputs, targets, _ = self.examples(picked[rows])
        return inputs, targets

    def loss(self, model, inputs, targets):
        return F.mse_loss(model(inputs).float(), targets)

    @torch.no_grad()
    def forecast(self, model: nn.Module, origins: Tensor) -> tuple[Tensor, Tensor]:
        """The model's forecasts at ``origins`` and the truth, both in the series' units."""
        inputs, targets, last = self.examples(origins)
        device = next(model.parameters()).device
        out = torch.cat(
            [y.float().cpu() for y, _ in _evaluate_batches(model, device, inputs, targets)]
        )
        return last + out.double() * self.scale, self.ahead(origins)

    def evaluate(self, model, device):
        predicted, truth = self.forecast(model, self.origins(self.val_start, self.test_start))
        loss = ((predicted - truth) / self.scale).square().mean().item()
        return {"loss": loss, **series.errors(predicted, truth)}

    def summary(self, model, run_dir):
        """The test part's MAE and RMSE of the LSTM and both baselines at every test origin,
        written to ``run_dir/forecast.json``, and ``forecast.png``: the history, the truth
        and each method's forecasts from the origins that cut the test part into horizons."""
        config = self.config
        origins = self.origins(self.test_start, len(self.series))
        predicted, truth = self.forecast(model, origins)
        forecasts = {
            "LSTM": predicted,
            "seasonal naive": series.seasonal_naive(
                self.series, origins, config.horizon, config.season
            ),
            "Holt-Winters": series.holt_winters(
                self.series, self.val_start, origins, config.horizon, config.season
            ),
        }
        scores = {name: series.errors(f, truth) for name, f in forecasts.items()}
        result = {
            "series": (
                f"column {config.column} of {config.data}"
                if config.data
                else "weekly Mauna Loa CO2, ppm (statsmodels' co2)"
            ),
            "values": len(self.series),
            "test_start": self.test_start,
            "origins": len(origins),
            "test": scores,
        }
        with checkpoint.writing(run_dir / FORECAST):
            text = json.dumps(result, indent=1) + "\n"
            checkpoint.atomic_write(run_dir / FORECAST, text.encode())
        shown = torch.arange(0, len(origins), config.horizon)
        with checkpoint.writing(run_dir / PLOT):
            plot.draw_forecast(
                run_dir / PLOT,
                self.series,
                origins[shown],
                {name: f[shown] for name, f in forecasts.items()},
                start=self.val_start,
            )
        lines = [f"test part, {len(origins)} origins x {config.horizon} steps ahead:"]
        lines += [
            f"  {name:<15} MAE {s['mae']:.4g}  RMSE {s['rmse']:.4g}" for name, s in scores.items()
        ]
        naive = scores["seasonal naive"]["mae"]
        if naive > 0:
            lines.append(f"LSTM's MAE / seasonal naive's: {scores['LSTM']['mae'] / naive:.3f}")
        lines.append(f"table in {run_dir / FORECAST}, plot in {run_dir / PLOT}")
        return "\n".join(lines)


TASKS: dict[str, type[Task]] = {task.name: task for task in (CharLM, Adding, Digits, Forecast)}
