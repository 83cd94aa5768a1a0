"""The training application: tasks learn, runs resume bit for bit, checkpoints survive crashes
and signals, a run directory has one trainer at a time, a time budget ends the run on time, and
bad input gets one line on stderr and exit status 2 with the last checkpoint untouched."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lstmkit import machine
from lstmkit.__main__ import main
from lstmkit.train import checkpoint, loop, metrics
from lstmkit.train.config import ConfigError, field_types, from_mapping, help_texts
from lstmkit.train.tasks import (
    TASKS,
    AddingConfig,
    CharLMConfig,
    CharModel,
    DigitsConfig,
    adding_problem,
    sample_chars,
    text_shares,
)

TINY = {
    "charlm": [
        "--steps", "20", "--time-budget", "0", "--batch-size", "8", "--seq-len", "16",
        "--hidden-size", "32", "--num-layers", "2", "--embedding-size", "16", "--eval-every", "10",
        "--log-every", "5", "--lr", "0.01", "--final-lr", "1",
    ],
    "adding": [
        "--steps", "20", "--batch-size", "32", "--seq-len", "12", "--hidden-size", "16",
        "--test-size", "64", "--eval-every", "10", "--log-every", "5", "--lr", "0.01",
    ],
    "digits": [
        "--steps", "60", "--batch-size", "32", "--hidden-size", "32", "--eval-every", "20",
        "--log-every", "5", "--lr", "0.01",
    ],
    "forecast": [
        "--steps", "20", "--time-budget", "0", "--batch-size", "16", "--window", "24",
        "--horizon", "6", "--season", "52", "--hidden-size", "16", "--eval-every", "10",
        "--log-every", "5", "--lr", "0.01",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small UTF-8 text (a few KB of Python's documentation)."""
    from lstmkit.train.tasks import builtin_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(builtin_corpus()[:20000], encoding="utf-8")
    return path


def cli(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def train(task: str, run_dir: Path, *extra: str | Path) -> int:
    return cli("train", "--task", task, "--run-dir", run_dir, "--quiet", *TINY[task], *extra)


def records(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in metrics.read(run_dir) if key in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny adding run (checkpoint at step 20), to copy, never to change."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train("adding", run) == 0
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the finished adding run, this test's own."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def charlm_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("charlm") / "run"
    assert train("charlm", run, "--data", corpus) == 0
    return run


def _hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the checkpoint, and of metrics.jsonl."""
    files = [*(run_dir / "checkpoint").iterdir(), run_dir / "metrics.jsonl"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _refused(capsys, *argv, status: int = 2) -> str:
    """The one line a refused command prints on stderr (asserting there is only one, and no
    traceback), after checking its exit status."""
    assert cli(*argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------ every task learns


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_learns(task, tmp_path, corpus, capsys):
    extra = ["--data", corpus] if task == "charlm" else []
    assert train(task, tmp_path / "run", *extra) == 0
    losses = records(tmp_path / "run", "train_loss")
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "done: step" in capsys.readouterr().out


def test_charlm_builtin_corpus_reports_bits_per_character(tmp_path, capsys):
    assert train("charlm", tmp_path / "run", "--steps", "10") == 0
    (last,) = [r for r in metrics.read(tmp_path / "run") if r["step"] == 10 and "eval_bpc" in r]
    assert last["eval_bpc"] == pytest.approx(last["eval_loss"] / math.log(2), rel=1e-12)
    # a model that learned nothing predicts ~uniformly over ~100 characters: ~6.7 bits
    assert 2.0 < last["eval_bpc"] < 7.0
    out = capsys.readouterr().out
    assert "sample (temperature 0.8):" in out


PAGE = """The "x" statement
*****************

Some prose.

   +-------+---------------------+
   | Type  | Meaning             |
   |=======|=====================|
   | "'b'" | Binary format, base |
   |       | 2.                  |
   +-------+---------------------+
   |       |                     |
   +-------+---------------------+

   target ::= identifier
              | "(" target ")"
   -------------------------------
End."""


def test_as_text_drops_layout_lines_and_keeps_each_table_cells_text():
    from lstmkit.train.tasks import as_text

    assert as_text(PAGE).split("\n") == [
        'The "x" statement',
        "",
        "Some prose.",
        "",
        "   Type  Meaning",
        "   \"'b'\"  Binary format, base",
        "   2.",
        "",
        "   target ::= identifier",
        '              | "(" target ")"',
        "End.",
    ]


def test_text_shares_counts_ordinary_characters_and_table_lines():
    assert text_shares("ab, c!\n+---+---+\n| x | y |\n") == (21 / 27, 2)
    assert text_shares("- a list item\n") == (1.0, 0)


def test_the_builtin_corpus_holds_no_table_border_or_underline():
    from lstmkit.train.tasks import builtin_corpus

    text = builtin_corpus()
    borders = [line for line in text.split("\n") if line.strip() and set(line) <= set("|+-=*~^ ")]
    assert borders == []
    assert text_shares(text)[1] <= 3  # lines mostly | + - =: a traceback's two, an == chain
    assert 400_000 < len(text) < 465_000  # the prose and code are there


@pytest.mark.parametrize("seed", range(5))
def test_a_short_charlm_runs_sample_reads_as_text(seed, tmp_path, capsys):
    """The sample a (short) default-corpus run prints: at least 95% ordinary characters, no
    line mostly table characters."""
    run = tmp_path / "run"
    assert train("charlm", run, "--steps", "30", "--seed", str(seed)) == 0
    capsys.readouterr()
    assert cli("sample", run, "--length", "400", "--seed", str(seed)) == 0
    sample = capsys.readouterr().out
    assert text_shares(sample)[0] >= 0.95, sample
    assert text_shares(sample)[1] == 0, sample


def test_digits_reaches_its_target_quickly(tmp_path, capsys):
    """The default digits run (the issue asks for >= 95% test accuracy)."""
    assert cli("train", "--task", "digits", "--run-dir", tmp_path / "run", "--quiet") == 0
    assert records(tmp_path / "run", "eval_accuracy")[-1] >= 0.95


def test_bf16_autocast_run_learns(tmp_path):
    assert train("digits", tmp_path / "run", "--precision", "bf16") == 0
    losses = records(tmp_path / "run", "train_loss")
    assert losses[-1] < 0.8 * losses[0], losses


def test_adding_problem_data():
    inputs, targets = adding_problem(500, 10, torch.Generator().manual_seed(0))
    markers = inputs[..., 1]
    assert torch.equal(markers.sum(1), torch.full((500,), 2.0))
    assert torch.equal(markers[:, :5].sum(1), torch.ones(500))  # one marker in each half
    expected = (inputs[..., 0] * markers).sum(1)
    assert torch.allclose(targets, expected, rtol=0, atol=0)
    # predicting the mean, 1, gives the variance of a sum of two U(0, 1): 1/6
    big = adding_problem(100_000, 10, torch.Generator().manual_seed(1))[1]
    assert (big - 1).square().mean().item() == pytest.approx(1 / 6, rel=0.02)


# ------------------------------------------------------------------ resume, bit for bit


def _final_state(run_dir: Path) -> tuple[dict, dict]:
    saved = checkpoint.load(run_dir)
    return saved.model, saved.state


def _assert_bit_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_bit_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bit_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("task", ["charlm", "adding", "forecast"])
def test_resume_is_bit_exact(task, tmp_path, corpus):
    """N steps straight == N/2 steps, resume, N/2 steps: weights, Adam and generators."""
    extra = ["--data", corpus] if task == "charlm" else []
    extra += ["--num-layers", "2", "--dropout", "0.3", "--eval-every", "5", "--final-lr", "0.1"]
    assert train(task, tmp_path / "straight", *extra) == 0
    assert train(task, tmp_path / "split", *extra, "--stop-at", "10") == 0
    assert checkpoint.load(tmp_path / "split").state["step"] == 10
    assert cli("train", "--resume", tmp_path / "split", "--quiet") == 0
    straight, split = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert split[1]["step"] == 20
    _assert_bit_equal(straight[0], split[0], "model")
    for state in (straight[1], split[1]):
        state.pop("train_seconds"), state.pop("elapsed")
    _assert_bit_equal(straight[1], split[1])
    assert records(tmp_path / "straight", "eval_loss") == records(tmp_path / "split", "eval_loss")


def test_each_start_records_its_machine(tmp_path):
    """machine.jsonl: one line per start (fresh, then each resume) with the step it started
    from and the CPU /proc/cpuinfo names; a fresh run starts the file anew."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "machine.jsonl").write_text('{"step": 99, "cpu": "an older run"}\n')
    assert train("adding", run, "--steps", "20", "--stop-at", "10", "--eval-every", "5") == 0
    assert cli("train", "--resume", run, "--quiet") == 0
    starts = [json.loads(line) for line in (run / "machine.jsonl").read_text().splitlines()]
    assert [start["step"] for start in starts] == [0, 10]
    for start in starts:
        assert {k: start[k] for k in machine.cpu_info()} == machine.cpu_info()
        assert start["threads"] == torch.get_num_threads() and start["torch"] == torch.__version__


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run, "--steps", "10", "--eval-every", "10") == 0
    with open(run / "metrics.jsonl", "a") as f:  # a crashed run's records past step 10
        f.write(json.dumps({"step": 15, "train_loss": 9.0}) + "\n")
        f.write('{"step": 16, "train_lo')  # and a line cut short
    capsys.readouterr()
    assert [r["step"] for r in metrics.read(run)][-1] == 15
    assert "skipped 1 damaged line(s)" in capsys.readouterr().err
    assert cli("train", "--resume", run, "--steps", "20", "--quiet") == 0
    steps = [r["step"] for r in metrics.read(run)]
    assert steps == sorted(steps) and 9.0 not in records(run, "train_loss")


def test_a_damaged_metrics_line_is_skipped_with_a_warning_by_resume_and_plot(run, capsys):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines.insert(2, b'{"step": 7, "train_loss": "caf\xe9"}\n')  # not UTF-8
    lines.insert(4, b'{"step": 8, "train_loss": "1.5"}\n')  # a value that is no number
    (run / "metrics.jsonl").write_bytes(b"".join(lines))
    warning = _refused(capsys, "plot", run, status=0)
    assert "warning: skipped 2 damaged line(s)" in warning and "(line 3, 5)" in warning
    warning = _refused(capsys, "train", "--resume", run, "--steps", "30", "--quiet", status=0)
    assert "warning: skipped 2 damaged line(s)" in warning
    assert checkpoint.load(run).state["step"] == 30
    assert cli("plot", run) == 0
    assert capsys.readouterr().err == ""  # the resumed run's log holds only good lines


def test_resume_of_a_finished_run_trains_nothing(run, capsys):
    before = _final_state(run)
    assert cli("train", "--resume", run, "--quiet") == 0
    _assert_bit_equal(before[0], _final_state(run)[0])


# ------------------------------------------------------------------ backend nn


def test_backend_nn_starts_from_the_same_weights_and_follows_the_same_curve(tmp_path, corpus):
    config = from_mapping(CharLMConfig, {"data": str(corpus), "hidden_size": 32, "vocab": "ab"})
    models = {}
    for backend in ("auto", "nn"):
        config.backend = backend
        torch.manual_seed(0)
        models[backend] = CharModel(config)
    assert isinstance(models["nn"].lstm, torch.nn.LSTM)
    _assert_bit_equal(models["auto"].state_dict(), models["nn"].state_dict())
    for backend in ("auto", "nn"):
        assert train("charlm", tmp_path / backend, "--data", corpus, "--backend", backend) == 0
    ours, theirs = records(tmp_path / "auto", "train_loss"), records(tmp_path / "nn", "train_loss")
    assert ours == pytest.approx(theirs, rel=1e-4)


# ------------------------------------------------------------------ sample and plot


def test_sample_continues_the_prime(charlm_run, capsys):
    run = charlm_run
    capsys.readouterr()
    assert cli("sample", run, "--prime", "def ", "--length", "40", "--seed", "3") == 0
    first = capsys.readouterr().out
    vocab = checkpoint.load(run).config["vocab"]
    assert first.startswith("def ") and first.endswith("\n") and len(first) == 4 + 40 + 1
    assert set(first[:-1]) <= set(vocab)
    assert cli("sample", run, "--prime", "def ", "--length", "40", "--seed", "3") == 0
    assert capsys.readouterr().out == first  # seeded
    assert cli("sample", run, "--length", "5", "--temperature", "1e-45") == 0  # the likeliest
    assert "outside the vocabulary" in _refused(capsys, "sample", run, "--prime", "snow \u2603")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
        (["--temperature", "1e-320"], "temperature 1e-320 is too small"),
        (["--seed", str(2**70)], f"--seed must be in [0, 2**63 - 1], got {2**70}"),
        (["--length", "-1"], "--length must be >= 0"),
    ],
)
def test_sample_refuses_unusable_options(option, message, charlm_run, capsys):
    before = _hashes(charlm_run)
    assert message in _refused(capsys, "sample", charlm_run, *option)
    assert _hashes(charlm_run) == before


def test_plot_overlays_runs(tmp_path):
    for name in ("a", "b"):
        assert train("adding", tmp_path / name, "--seed", str(len(name))) == 0
    out = tmp_path / "both.png"
    assert cli("plot", tmp_path / "a", tmp_path / "b", "--out", out) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_an_unwritable_out(run, tmp_path, capsys):
    line = _refused(capsys, "plot", run, "--out", tmp_path / "missing" / "curves.png")
    assert "cannot write" in line and "No such file or directory" in line
    assert "is a directory" in _refused(capsys, "plot", run, "--out", tmp_path)
    assert "holds no metrics" in _refused(capsys, "plot", tmp_path / "nothing")
    assert "RUN_DIR is an empty path" in _refused(capsys, "plot", "")
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary file left behind


# ------------------------------------------------------------------ bad input


def test_missing_empty_and_short_data(tmp_path, capsys):
    run = ["train", "--run-dir", tmp_path / "run", "--quiet", "--seq-len", "64"]
    line = _refused(capsys, *run, "--data", tmp_path / "nope.txt")
    assert "nope.txt" in line and "does not exist" in line
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _refused(capsys, *run, "--data", tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("hello world " * 20)
    line = _refused(capsys, *run, "--data", tmp_path / "short.txt")
    assert "240 characters" in line and "seq_len=64" in line
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    assert "not UTF-8" in _refused(capsys, *run, "--data", tmp_path / "latin1.txt")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_run_dir_of_another_task(run, capsys):
    line = _refused(capsys, "train", "--task", "digits", "--run-dir", run)
    assert "checkpoint of task 'adding'" in line and "--resume" in line
    line = _refused(capsys, "train", "--task", "digits", "--resume", run)
    assert "task 'adding', not 'digits'" in line
    assert "task 'adding' writes no text" in _refused(capsys, "sample", run)


def test_resume_refuses_other_settings_and_missing_runs(run, tmp_path, capsys):
    line = _refused(capsys, "train", "--resume", run, "--lr", "0.1")
    assert "only --steps, --time-budget may change, got --lr" in line
    assert "no checkpoint" in _refused(capsys, "train", "--resume", tmp_path / "elsewhere")


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


BAD_INPUT = {
    "lr inf": (["--lr", "inf"], "config key 'lr' must be a finite number, got inf"),
    "grad_clip nan": (["--grad-clip", "nan"], "'grad_clip' must be a finite number, got nan"),
    "lr 1e400 in --config": (
        ["--config", '{"task": "adding", "lr": 1e400}'],
        "config key 'lr' must be a finite number, got inf",
    ),
    "deeply nested --config": (
        ["--config", '{"lr": ' + "[" * 100_000 + "]" * 100_000 + "}"],
        "is nested too deeply",
    ),
    "a long value in --config": (
        ["--config", json.dumps({"task": "adding", "lr": list(range(10_000))})],
        "'lr' must be float, got [0, 1, 2, 3, 4, 5, ...] (list)",
    ),
    "seed 2**63": (["--seed", str(2**63)], f"seed must be in [0, 2**63 - 1], got {2**63}"),
    "hidden_size 1e7": (["--hidden-size", "10000000"], "parameters, which need"),
    "fused backend, cifg cell": (
        ["--backend", "fused", "--cell", "cifg"],
        "these settings cannot train on cpu: backend='fused' cannot run cell='cifg'",
    ),
    "nn backend, layernorm cell": (
        ["--backend", "nn", "--cell", "layernorm"],
        "torch.nn.LSTM has only the standard cell",
    ),
    "hidden_size 0": (["--hidden-size", "0"], "hidden_size must be a positive int, got 0"),
    "time_budget -1": (["--time-budget", "-1"], "time_budget must be >= 0"),
    "eval_times -1": (
        ["--eval-times", "-1"],
        "eval_times must be >= 0 (0 = by steps only), got -1",
    ),
    "a fresh run where a checkpoint is": ([], "already holds a checkpoint of task 'adding'"),
}
if not torch.cuda.is_available():
    BAD_INPUT["triton backend on a CPU"] = (
        ["--backend", "triton"],
        "backend='triton' cannot run this layer: its tensors are on 'cpu', not CUDA",
    )


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_the_checkpoint_intact(case, run, tmp_path, capsys):
    """Each aimed at a run directory with a checkpoint: refused, exit status 2, one line on
    stderr, every file of the checkpoint and metrics.jsonl as they were."""
    options, message = BAD_INPUT[case]
    if options[:1] == ["--config"]:
        options = ["--config", _config_file(tmp_path, options[1])]
    before = _hashes(run)
    assert message in _refused(capsys, "train", "--task", "adding", "--run-dir", run, *options)
    assert _hashes(run) == before


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--time-budget", "inf"], "'time_budget' must be a finite number, got inf"),
        (["--steps", "-3"], "steps must be a positive int, got -3"),
        (["--stop-at", "0"], "--stop-at must be a positive step"),
        (["--seed", "1"], "only --steps, --time-budget may change, got --seed"),
    ],
)
def test_bad_resume_options_leave_the_checkpoint_intact(option, message, run, capsys):
    before = _hashes(run)
    assert message in _refused(capsys, "train", "--resume", run, "--quiet", *option)
    assert _hashes(run) == before


def test_empty_paths_are_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--run-dir is an empty path" in _refused(capsys, "train", "--run-dir", "")
    assert "--resume is an empty path" in _refused(capsys, "train", "--resume", "")
    assert "RUN_DIR is an empty path" in _refused(capsys, "sample", "")
    assert "--out is an empty path" in _refused(capsys, "plot", "x", "--out", "")
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


@pytest.mark.parametrize("where", ["a file", "under a file", "read only"])
def test_an_unusable_run_dir_is_one_line(where, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    run_dir, reason = {
        "a file": (tmp_path / "file", "it is a file"),
        "under a file": (tmp_path / "file" / "run", "Not a directory"),
        "read only": (Path("/sys"), "Permission denied"),  # not writable, even by root
    }[where]
    line = _refused(capsys, "train", "--task", "digits", "--run-dir", run_dir, "--quiet")
    assert f"cannot use run directory {run_dir}: {reason}" in line


def test_a_fresh_run_does_not_append_to_an_old_log(tmp_path, capsys):
    """A metrics.jsonl without a checkpoint (a run killed before its first checkpoint) is
    refused: a fresh run would mix two runs in one log and one plot."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"step": 5, "train_loss": 2.0}\n')
    line = _refused(capsys, "train", "--task", "digits", "--run-dir", old, "--quiet")
    assert "holds a metrics.jsonl but no checkpoint" in line
    assert (old / "metrics.jsonl").read_text() == '{"step": 5, "train_loss": 2.0}\n'
    assert sorted(p.name for p in old.iterdir()) == ["lock", "metrics.jsonl"]


def test_a_symlinked_checkpoint_is_refused(run, tmp_path, capsys):
    os.replace(run / "checkpoint", tmp_path / "elsewhere")
    (run / "checkpoint").symlink_to(tmp_path / "elsewhere")
    before = _hashes(run)
    line = _refused(capsys, "train", "--resume", run, "--steps", "30", "--quiet")
    assert f"{run / 'checkpoint'} is a symbolic link" in line
    assert _hashes(run) == before and (run / "checkpoint").is_symlink()


def _damage(run: Path, damage: str) -> None:
    action, name = damage.split()
    files = {"model": "model.safetensors", "state": "state.pt", "config": "config.json"}
    path = run / "checkpoint" / files[name]
    data = path.read_bytes()
    if action == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif action == "garble":
        path.write_bytes(bytes(b ^ 0x5A for b in data[:64]) + data[64:])
    elif action == "remove":
        path.unlink()
    elif action == "edit":  # another model size than the weights'
        path.write_text(json.dumps({**json.loads(data), "hidden_size": 8}))
    elif action == "invalidate":  # a value no configuration has
        path.write_text(json.dumps({**json.loads(data), "lr": -1}))
    elif action == "swap":  # weights of another model, at the same step
        from safetensors.torch import load_file, save_file

        weights = load_file(path)
        weights["head.weight"] = torch.zeros(3, 3)
        weights["extra"] = weights.pop("head.bias")
        save_file(weights, path, metadata={"step": "20"})
    else:
        state = torch.load(path, weights_only=True)
        if action == "restep":  # a state.pt from another step beside this model
            state["step"] = 3
        elif action == "unkey":
            del state["rng"]
        else:  # a generator state that is no generator's
            state["rng"]["data"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(state, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate model", "model.safetensors"),
        ("truncate state", "state.pt"),
        ("garble config", "config.json"),
        ("garble model", "model.safetensors"),
        ("remove state", "state.pt"),
        ("restep state", "does not belong"),
        ("unkey state", "state.pt holds no 'rng' of type dict"),
        ("scramble state", "state.pt does not fit this run"),
        ("edit config", "do not fit the model of its config.json: lstm.weight_ih_l0 is (64, 2)"),
        ("invalidate config", "has a bad config.json: lr must be > 0, got -1"),
        ("swap model", "missing head.bias; unexpected extra; head.weight is (3, 3)"),
    ],
)
def test_damaged_checkpoints_are_one_line_and_left_as_they_are(damage, message, run, capsys):
    _damage(run, damage)
    before = _hashes(run)
    assert message in _refused(capsys, "train", "--resume", run, "--quiet")
    if not damage.endswith("config"):
        assert message in _refused(capsys, "train", "--resume", run, "--steps", "30")
    if damage.endswith("model") or damage.endswith("config"):
        assert message in _refused(capsys, "sample", run)
    assert _hashes(run) == before


def test_config_file_and_flags_are_checked(tmp_path, capsys):
    run = ["train", "--run-dir", tmp_path / "run", "--quiet"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "digits", "hiden_size": 32}))
    line = _refused(capsys, *run, "--config", config)
    assert "'hiden_size'" in line and "hidden_size" in line
    config.write_text(json.dumps({"task": "digits", "hidden_size": "32"}))
    line = _refused(capsys, *run, "--config", config)
    assert "'hidden_size' must be int, got '32' (str)" in line
    config.write_text(json.dumps({"task": "digits", "steps": True}))
    assert "'steps' must be int, got True (bool)" in _refused(capsys, *run, "--config", config)
    config.write_text(json.dumps({"task": ["digits"]}))
    assert "task must be one of" in _refused(capsys, *run, "--config", config)
    config.write_text(json.dumps({"task": "adding"}))
    assert "disagree" in _refused(capsys, *run, "--config", config, "--task", "digits")
    config.write_text("[1, 2]")
    assert "must hold a JSON object" in _refused(capsys, *run, "--config", config)
    config.write_text("{not json")
    assert "cannot read --config" in _refused(capsys, *run, "--config", config)
    line = _refused(capsys, *run, "--task", "digits", "--seq-len", "3")
    assert "no setting(s) --seq-len" in line
    assert "steps must be a positive int, got 0" in _refused(capsys, *run, "--steps", "0")
    assert "device must be one of" in _refused(capsys, *run, "--device", "tpu")
    if not torch.cuda.is_available():
        assert "sees no CUDA device" in _refused(capsys, *run, "--device", "cuda")
    assert "--stop-at must be a positive step" in _refused(capsys, *run, "--stop-at", "0")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown flag, wrong type
        cli(*run, "--steps", "many")
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_every_setting_is_documented_and_shown_by_help(capsys):
    for task in TASKS.values():
        assert set(help_texts(task.Config)) == set(field_types(task.Config)), task.name
    with pytest.raises(SystemExit):
        cli("train", "--help")
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "LSTM units per layer (charlm 256, adding 128, digits 128, forecast 64)" in shown
    # a name two tasks give different meanings shows both, each with its tasks' defaults
    assert (
        "--seq-len SEQ_LEN characters per training window (backpropagation through time) "
        "(charlm 128); steps per sequence, T (adding 100)"
    ) in shown


def test_from_mapping_accepts_ints_for_floats_and_rejects_other_tasks():
    assert from_mapping(DigitsConfig, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="'task' must be 'adding', got 'digits'"):
        from_mapping(AddingConfig, {"task": "digits"})


def test_batch_size_must_split_evenly_across_processes():
    task = TASKS["digits"](from_mapping(DigitsConfig, {"batch_size": 32}))
    three = loop.Processes(torch.device("cpu"), rank=0, world=3)
    with pytest.raises(loop.TrainError, match=r"batch_size=32 must be divisible .* \(3\)"):
        loop.setup(task, three)


def test_a_full_disk_fails_the_run_and_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    """No space left while saving at step 30: exit status 1, one line, the checkpoint of
    step 20 untouched and no checkpoint.new left; resuming later works."""
    saved, logged = _hashes(run), metrics.read(run)
    write = checkpoint._write_synced

    def full_disk(path: Path, data: bytes) -> None:
        if path.parent.name == "checkpoint.new":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", full_disk)
    line = _refused(capsys, "train", "--resume", run, "--steps", "30", "--quiet", status=1)
    assert f"cannot save a checkpoint in {run}: No space left on device" in line
    assert {k: v for k, v in _hashes(run).items() if k != "metrics.jsonl"} == {
        k: v for k, v in saved.items() if k != "metrics.jsonl"
    }
    assert [r for r in metrics.read(run) if r["step"] <= 20] == logged
    assert not (run / "checkpoint.new").exists()
    monkeypatch.undo()
    assert cli("train", "--resume", run, "--steps", "30", "--quiet") == 0
    assert checkpoint.load(run).state["step"] == 30


@pytest.mark.parametrize("tool", ["tqdm", "safetensors", "matplotlib"])
def test_a_missing_tool_of_the_train_extra_is_named_before_training(tool, tmp_path, capsys):
    with pytest.MonkeyPatch.context() as patch:
        # as if not installed; its submodules too (imported by earlier tests, they would be
        # found in sys.modules without their package)
        for name in {tool, *(m for m in sys.modules if m.startswith(f"{tool}."))}:
            patch.setitem(sys.modules, name, None)
        line = _refused(capsys, "train", "--task", "digits", "--run-dir", tmp_path, status=1)
    assert f"needs {tool}: pip install 'lstmkit[train]'" in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ time budget


@pytest.fixture
def fake_clock(monkeypatch):
    """``time.perf_counter`` advancing 1 ms at every call: a time budget is then spent in a
    number of steps the test can count on, however loaded the machine is."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) / 1000)


def test_a_time_budget_stops_on_time_and_its_lr_reaches_final_lr(tmp_path, fake_clock, capsys):
    run = tmp_path / "run"
    options = ["--steps", "1000000", "--time-budget", "0.5", "--log-every", "1"]
    assert train("adding", run, *options, "--eval-every", "40", "--final-lr", "0.1") == 0
    state = checkpoint.load(run).state
    assert 0.5 <= state["elapsed"] < 0.51  # stopped at the first step past the budget
    assert 50 < state["step"] < 500
    lrs = records(run, "lr")
    assert len(lrs) == state["step"] and lrs == sorted(lrs, reverse=True)
    assert lrs[0] == pytest.approx(0.01, rel=1e-4)
    assert lrs[-1] == pytest.approx(0.001, rel=1e-3)  # final_lr * lr
    assert f"done: step {state['step']}" in capsys.readouterr().out
    assert records(run, "eval_loss")  # the last step is evaluated, whatever its number


@pytest.mark.parametrize("times", [0, 1, 4, 10])
def test_a_time_budget_run_evaluates_at_each_share_of_it(tmp_path, fake_clock, times):
    """``eval_times`` evaluations over the budget, the last at its end, however many steps
    it holds (``eval_every`` past them all); 0: the last only."""
    run = tmp_path / "run"
    options = ["--steps", "1000000", "--time-budget", "0.5", "--eval-every", "1000000"]
    assert train("adding", run, *options, "--eval-times", str(times)) == 0
    steps = [r["step"] for r in metrics.read(run) if "eval_loss" in r]
    assert len(steps) == max(times, 1) and steps == sorted(set(steps))
    assert steps[-1] == checkpoint.load(run).state["step"]
    if times > 1:  # evenly: the gaps between evaluations within a few steps of each other
        gaps = [b - a for a, b in itertools.pairwise([0, *steps])]
        assert max(gaps) - min(gaps) <= 0.2 * max(gaps), steps


def test_a_time_budget_holds_on_the_wall_clock(tmp_path):
    run = tmp_path / "run"
    started = time.perf_counter()
    assert train("adding", run, "--steps", "1000000", "--time-budget", "2") == 0
    assert time.perf_counter() - started < 2 + 10  # start-up, the last evaluation, the plot
    assert 2 <= checkpoint.load(run).state["elapsed"] < 2 + 2  # a step, an evaluation


def test_a_resumed_time_budget_run_spends_what_was_left(tmp_path, fake_clock):
    run = tmp_path / "run"
    options = ["--steps", "1000000", "--time-budget", "0.5", "--eval-every", "40"]
    assert train("adding", run, *options, "--stop-at", "10") == 0
    first = checkpoint.load(run).state
    assert first["step"] == 10 and first["elapsed"] < 0.5
    assert cli("train", "--resume", run, "--quiet") == 0
    second = checkpoint.load(run).state
    assert 0.5 <= second["elapsed"] < 0.51 and second["step"] > 10
    assert cli("train", "--resume", run, "--quiet") == 0  # spent: nothing more
    assert checkpoint.load(run).state["step"] == second["step"]
    assert cli("train", "--resume", run, "--time-budget", "1", "--quiet") == 0  # a larger one
    third = checkpoint.load(run).state
    assert 1 <= third["elapsed"] < 1.01 and third["step"] > second["step"]


# ------------------------------------------------------------------ TensorBoard


def board_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``run``'s TensorBoard events, by tag: (step, value) in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {
        tag: sorted((e.step, e.value) for e in events.Scalars(tag))
        for tag in events.Tags()["scalars"]
    }


def test_tensorboard_holds_metrics_jsonl_and_a_resume_writes_no_step_twice(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run, "--tensorboard", "--stop-at", "10") == 0
    assert f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}" in capsys.readouterr().out
    # what a run killed after its checkpoint leaves: records of steps past it, in both logs
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run / "tensorboard")) as late:
        late.add_scalar("train_loss", 99.0, 15)
    (run / "metrics.jsonl").open("a").write('{"step": 15, "train_loss": 99.0}\n')
    assert cli("train", "--resume", run, "--quiet", "--tensorboard") == 0
    want: dict[str, list[tuple[int, float]]] = {}
    for record in metrics.read(run):
        for name, value in record.items():
            if name != "step":
                want.setdefault(name, []).append((record["step"], value))
    got = board_scalars(run)
    assert sorted(got) == sorted(want) and "eval_loss" in got and "lr" in got
    for name, points in want.items():
        assert [step for step, _ in got[name]] == [step for step, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert max(step for step, _ in got["train_loss"]) == 20  # the late step 15 purged


def test_tensorboard_without_its_package_is_one_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    line = _refused(capsys, "train", "--task", "adding", "--run-dir", tmp_path / "run",
                    "--tensorboard", *TINY["adding"])  # fmt: skip
    assert "pip install 'lstmkit[tensorboard]'" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ crash safety, signals, lock

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "lstmkit", "train", "--task", "adding", "--run-dir", str(run_dir)]
    argv += [*TINY["adding"], "--quiet", "--steps", "100000", "--eval-every", "1", *extra]
    return subprocess.Popen(
        argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_a_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    """Until the process (quiet, evaluating every step) reports a step it trained and its
    first checkpoint is on disk."""
    for line in process.stdout:
        if line.startswith(b"step "):
            while checkpoint.location(run_dir) is None:
                assert process.poll() is None, process.stderr.read().decode()
                time.sleep(0.01)
            return
    raise AssertionError(f"the process ended without training: {process.stderr.read().decode()}")


def _resume(run_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "lstmkit", "train", "--resume", str(run_dir), "--quiet"]
    return subprocess.Popen(
        argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    """A checkpoint every step; SIGKILL at random instants, six times; each time the last
    checkpoint loads, and the resumed run trains on from it. Two runs, three kills each, side
    by side (a process's start-up is most of the time)."""
    runs = [tmp_path / "a", tmp_path / "b"]
    generator = torch.Generator().manual_seed(0)
    processes, steps = [_launch(run) for run in runs], [0, 0]
    for attempt in range(3):
        for i, run in enumerate(runs):
            _wait_for_a_checkpoint(processes[i], run)
            time.sleep(0.5 * torch.rand((), generator=generator).item())
            processes[i].send_signal(signal.SIGKILL)
            processes[i].wait()
            saved = checkpoint.load(run)  # raises on a damaged checkpoint
            assert saved.state["step"] >= steps[i], (run.name, attempt)
            steps[i] = saved.state["step"]
            processes[i] = _resume(run)
    for process in processes:
        process.kill()
        process.wait()
    step = checkpoint.load(runs[0]).state["step"]
    assert cli("train", "--resume", runs[0], "--steps", str(step + 2), "--quiet") == 0
    assert checkpoint.load(runs[0]).state["step"] == step + 2


def test_a_crash_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert train("adding", run, "--steps", "10") == 0
    before = checkpoint.load(run)
    os.replace(run / "checkpoint", run / "checkpoint.old")  # the first rename happened,
    (run / "checkpoint.new").mkdir()  # the second did not
    _assert_bit_equal(checkpoint.load(run).model, before.model)
    assert cli("train", "--resume", run, "--steps", "12", "--quiet") == 0
    assert checkpoint.load(run).state["step"] == 12
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint"
    ]


def test_a_signal_before_anything_was_logged(tmp_path, monkeypatch, capsys):
    """A stop requested before the first step: a checkpoint at step 0, no plot, 130."""
    monkeypatch.setattr(
        loop._Signals, "agreed", lambda self, processes, elapsed: (signal.SIGINT, elapsed)
    )
    assert train("adding", tmp_path / "run") == 130
    assert checkpoint.load(tmp_path / "run").state["step"] == 0
    assert "interrupted by SIGINT at step 0" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli("train", "--resume", tmp_path / "run", "--steps", "2", "--quiet") == 0


def test_a_signal_saves_a_checkpoint_and_exits_with_128_plus_its_number(tmp_path):
    """Ctrl-C, and what job schedulers, timeout and a closed terminal send: the step is
    finished, a checkpoint saved at the step printed, exit status 130, 143 and 129. One
    process a signal, the three at once (their start-up is most of the time)."""
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    runs = {signum: tmp_path / signum.name for signum in signums}
    # no checkpoint until the signal
    processes = {signum: _launch(run, "--eval-every", "100000") for signum, run in runs.items()}
    for signum, process in processes.items():
        while not (runs[signum] / "metrics.jsonl").exists():  # it trains
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        process.send_signal(signum)
    for signum, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signum, (signum.name, err.decode())
        assert b"Traceback" not in err, signum.name
        step = checkpoint.load(runs[signum]).state["step"]
        assert f"interrupted by {signum.name} at step {step}; checkpoint saved".encode() in out
        assert cli("train", "--resume", runs[signum], "--steps", str(step + 3), "--quiet") == 0
        assert checkpoint.load(runs[signum]).state["step"] == step + 3


def test_one_trainer_at_a_time_and_no_stale_lock_after_kill_9(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _launch(run)
    _wait_for_a_checkpoint(holder, run)
    line = _refused(capsys, "train", "--resume", run, "--quiet")
    assert f"{run} is in use by another trainer (pid {holder.pid} on {socket.gethostname()}" in line
    line = _refused(capsys, "train", "--task", "adding", "--run-dir", run, "--quiet")
    assert "in use by another trainer" in line
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    step = checkpoint.load(run).state["step"]
    assert cli("train", "--resume", run, "--steps", str(step + 2), "--quiet") == 0
    assert checkpoint.load(run).state["step"] == step + 2


# ------------------------------------------------------------------ distributed


def _torchrun(*argv: str | Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, *map(str, argv)], env=SUBPROCESS_ENV, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """``lstmkit train`` under torchrun (one launch: tests/ddp_worker.py runs the command
    line's entry point in each process and saves that rank's weights): both ranks end with the
    same weights, rank 0's checkpoint holds them, and one process with the same global batch
    gets the same."""
    settings = [*TINY["adding"], "--steps", "12", "--batch-size", "16"]
    worker = Path(__file__).with_name("ddp_worker.py")
    _torchrun(worker, "--task", "adding", "--run-dir", tmp_path / "ddp", "--quiet", *settings)
    per_rank = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_bit_equal(per_rank[0], per_rank[1], "rank 1")
    _assert_bit_equal(checkpoint.load(tmp_path / "ddp").model, per_rank[0], "checkpoint")
    assert train("adding", tmp_path / "one", "--steps", "12", "--batch-size", "16") == 0
    one = checkpoint.load(tmp_path / "one").model
    assert per_rank[0].keys() == one.keys()
    for name in one:
        torch.testing.assert_close(per_rank[0][name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_a_step_clips_the_global_gradient_norm(clip):
    """The optimizer sees gradients whose global norm is at most grad_clip (0: untouched),
    against the norm of the same step's gradients computed here without the loop."""
    config = AddingConfig(steps=1, batch_size=8, seq_len=6, hidden_size=8, grad_clip=clip)
    task = TASKS["adding"](config)
    run = loop.setup(task, loop.start_processes("cpu"))
    inputs, targets = task.batch(torch.Generator().manual_seed(5), slice(0, 8))
    run.model.zero_grad()
    task.loss(run.model, inputs, targets).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters()]).item()
    seen = []
    step = run.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        seen.append(torch.nn.utils.get_total_norm(grads).item())
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    run.data = torch.Generator().manual_seed(5)  # the same batch as above
    loop._step(run, run.model, slice(0, 8))
    assert want > 1e-2  # so that the clipped case clips
    assert seen == [pytest.approx(min(want, clip) if clip else want, rel=1e-5)]


def test_sampling_carries_the_state_from_character_to_character():
    """Near temperature 0 the sampler picks the likeliest next character each time; the
    oracle runs the model on the whole text so far, from no state, for every character: the
    two agree only if the sampler carries its state across characters."""
    torch.manual_seed(0)
    config = CharLMConfig(vocab="\nabcdefgh", hidden_size=16, num_layers=2, embedding_size=8)
    model = CharModel(config).eval()
    with torch.no_grad():  # sharper logits than at initialisation: fewer near-ties
        for p in model.parameters():
            p.mul_(4)
    got = sample_chars(model, config.vocab, "abc", 30, 1e-3, torch.Generator().manual_seed(0))
    text = "abc"
    with torch.no_grad():
        for _ in range(30):
            ids = torch.tensor([[config.vocab.index(ch) for ch in text]])
            text += config.vocab[model(ids)[0][0, -1].argmax().item()]
    assert got == text[3:]
