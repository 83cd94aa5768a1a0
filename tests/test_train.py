"""The training application: tasks learn, runs resume bit for bit, checkpoints survive crashes,
bad input gets a clear message and exit status 2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lstmkit.__main__ import main
from lstmkit.train import checkpoint, loop
from lstmkit.train.config import ConfigError, field_comments, field_types, from_mapping
from lstmkit.train.tasks import (
    TASKS,
    AddingConfig,
    CharLMConfig,
    CharModel,
    DigitsConfig,
    adding_problem,
)

TINY = {
    "charlm": [
        "--steps", "20", "--batch-size", "8", "--seq-len", "16", "--hidden-size", "32",
        "--num-layers", "2", "--embedding-size", "16", "--eval-every", "10", "--log-every", "5",
        "--lr", "0.01", "--final-lr", "1",
    ],
    "adding": [
        "--steps", "20", "--batch-size", "32", "--seq-len", "12", "--hidden-size", "16",
        "--test-size", "64", "--eval-every", "10", "--log-every", "5", "--lr", "0.01",
    ],
    "digits": [
        "--steps", "60", "--batch-size", "32", "--hidden-size", "32", "--eval-every", "20",
        "--log-every", "5", "--lr", "0.01",
    ],
}  # fmt: skip


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small UTF-8 text (a few KB of Python's documentation)."""
    from lstmkit.train.tasks import builtin_corpus

    path = tmp_path / "corpus.txt"
    path.write_text(builtin_corpus()[:20000], encoding="utf-8")
    return path


def cli(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def train(task: str, run_dir: Path, *extra: str | Path) -> int:
    return cli("train", "--task", task, "--run-dir", run_dir, "--quiet", *TINY[task], *extra)


def records(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in loop.read_metrics(run_dir) if key in r]


# ------------------------------------------------------------------ every task learns


@pytest.mark.parametrize("task", ["charlm", "adding", "digits"])
def test_each_task_learns(task, tmp_path, corpus, capsys):
    extra = ["--data", corpus] if task == "charlm" else []
    assert train(task, tmp_path / "run", *extra) == 0
    losses = records(tmp_path / "run", "train_loss")
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "done: step" in capsys.readouterr().out


def test_charlm_builtin_corpus_reports_bits_per_character(tmp_path, capsys):
    assert train("charlm", tmp_path / "run", "--steps", "10") == 0
    (last,) = [
        r for r in loop.read_metrics(tmp_path / "run") if r["step"] == 10 and "eval_bpc" in r
    ]
    assert last["eval_bpc"] == pytest.approx(last["eval_loss"] / math.log(2), rel=1e-12)
    # a model that learned nothing predicts ~uniformly over ~100 characters: ~6.7 bits
    assert 2.0 < last["eval_bpc"] < 7.0
    out = capsys.readouterr().out
    assert "sample (temperature 0.8):" in out


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


@pytest.mark.parametrize("task", ["charlm", "adding"])
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
    straight[1].pop("train_seconds"), split[1].pop("train_seconds")
    _assert_bit_equal(straight[1], split[1])
    assert records(tmp_path / "straight", "eval_loss") == records(tmp_path / "split", "eval_loss")


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert train("adding", run, "--steps", "10", "--eval-every", "10") == 0
    with open(run / "metrics.jsonl", "a") as f:  # a crashed run's records past step 10
        f.write(json.dumps({"step": 15, "train_loss": 9.0}) + "\n")
        f.write('{"step": 16, "train_lo')  # and a line cut short
    assert [r["step"] for r in loop.read_metrics(run)][-1] == 15
    assert cli("train", "--resume", run, "--steps", "20", "--quiet") == 0
    steps = [r["step"] for r in loop.read_metrics(run)]
    assert steps == sorted(steps) and 9.0 not in records(run, "train_loss")


def test_resume_of_a_finished_run_trains_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run) == 0
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


def test_sample_continues_the_prime(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert train("charlm", run, "--data", corpus) == 0
    capsys.readouterr()
    assert cli("sample", run, "--prime", "def ", "--length", "40", "--seed", "3") == 0
    first = capsys.readouterr().out
    vocab = checkpoint.load(run).config["vocab"]
    assert first.startswith("def ") and first.endswith("\n") and len(first) == 4 + 40 + 1
    assert set(first[:-1]) <= set(vocab)
    assert cli("sample", run, "--prime", "def ", "--length", "40", "--seed", "3") == 0
    assert capsys.readouterr().out == first  # seeded
    assert "outside the vocabulary" in _error(capsys, "sample", run, "--prime", "snow \u2603")
    assert "--temperature must be > 0" in _error(capsys, "sample", run, "--temperature", "0")


def test_plot_overlays_runs(tmp_path):
    for name in ("a", "b"):
        assert train("adding", tmp_path / name, "--seed", str(len(name))) == 0
    out = tmp_path / "both.png"
    assert cli("plot", tmp_path / "a", tmp_path / "b", "--out", out) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ bad input


def _error(capsys, *argv) -> str:
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_empty_and_short_data(tmp_path, capsys):
    run = ["train", "--run-dir", tmp_path / "run", "--quiet", "--seq-len", "64"]
    err = _error(capsys, *run, "--data", tmp_path / "nope.txt")
    assert "nope.txt" in err and "does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _error(capsys, *run, "--data", tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("hello world " * 20)
    err = _error(capsys, *run, "--data", tmp_path / "short.txt")
    assert "240 characters" in err and "seq_len=64" in err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    assert "not UTF-8" in _error(capsys, *run, "--data", tmp_path / "latin1.txt")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_run_dir_of_another_task(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run) == 0
    capsys.readouterr()
    err = _error(capsys, "train", "--task", "digits", "--run-dir", run)
    assert "checkpoint of task 'adding'" in err and "--resume" in err
    err = _error(capsys, "train", "--task", "digits", "--resume", run)
    assert "task 'adding', not 'digits'" in err
    err = _error(capsys, "sample", run)
    assert "'adding' run" in err


def test_resume_refuses_other_settings_and_missing_runs(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run) == 0
    capsys.readouterr()
    assert "only --steps" in _error(capsys, "train", "--resume", run, "--lr", "0.1")
    assert "no checkpoint" in _error(capsys, "train", "--resume", tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate model", "model.safetensors"),
        ("truncate state", "state.pt"),
        ("garble config", "config.json"),
        ("garble model", "model.safetensors"),
        ("remove state", "state.pt"),
        ("swap state", "does not belong"),
    ],
)
def test_damaged_checkpoints_are_reported(damage, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("adding", run) == 0
    capsys.readouterr()
    where = run / "checkpoint"
    action, name = damage.split()
    path = (
        where / {"model": "model.safetensors", "state": "state.pt", "config": "config.json"}[name]
    )
    data = path.read_bytes()
    if action == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif action == "garble":
        path.write_bytes(bytes(b ^ 0x5A for b in data[:64]) + data[64:])
    elif action == "remove":
        path.unlink()
    else:  # a state.pt from another step beside this model
        state = torch.load(path, weights_only=True)
        state["step"] = 3
        torch.save(state, path)
    err = _error(capsys, "train", "--resume", run, "--quiet")
    assert message in err
    if name != "config":
        assert message in _error(capsys, "train", "--resume", run, "--steps", "30")


def test_config_file_and_flags_are_checked(tmp_path, capsys):
    run = ["train", "--run-dir", tmp_path / "run", "--quiet"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"task": "digits", "hiden_size": 32}))
    err = _error(capsys, *run, "--config", config)
    assert "'hiden_size'" in err and "hidden_size" in err
    config.write_text(json.dumps({"task": "digits", "hidden_size": "32"}))
    err = _error(capsys, *run, "--config", config)
    assert "'hidden_size' must be int, got '32' (str)" in err
    config.write_text(json.dumps({"task": "digits", "steps": True}))
    assert "'steps' must be int, got True (bool)" in _error(capsys, *run, "--config", config)
    config.write_text(json.dumps({"task": ["digits"]}))
    assert "task must be one of" in _error(capsys, *run, "--config", config)
    config.write_text(json.dumps({"task": "adding"}))
    assert "disagree" in _error(capsys, *run, "--config", config, "--task", "digits")
    config.write_text("[1, 2]")
    assert "must hold a JSON object" in _error(capsys, *run, "--config", config)
    config.write_text("{not json")
    assert "cannot read --config" in _error(capsys, *run, "--config", config)
    assert "no setting(s) --seq-len" in _error(capsys, *run, "--task", "digits", "--seq-len", "3")
    assert "steps must be a positive int, got 0" in _error(capsys, *run, "--steps", "0")
    err = _error(capsys, *run, "--backend", "nn", "--cell", "layernorm")
    assert "backend 'nn'" in err and "layernorm" in err
    assert "device must be one of" in _error(capsys, *run, "--device", "tpu")
    if not torch.cuda.is_available():
        assert "sees no CUDA device" in _error(capsys, *run, "--device", "cuda")
    assert "--stop-at must be a positive step" in _error(capsys, *run, "--stop-at", "0")
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown flag, wrong type
        cli(*run, "--steps", "many")
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_every_setting_is_documented_and_shown_by_help(capsys):
    for task in TASKS.values():
        comments = field_comments(task.Config)
        assert set(comments) == set(field_types(task.Config)), task.name
    with pytest.raises(SystemExit):
        cli("train", "--help")
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "LSTM units per layer (charlm 256, adding 128, digits 128)" in shown


def test_from_mapping_accepts_ints_for_floats_and_rejects_other_tasks():
    assert from_mapping(DigitsConfig, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="'task' must be 'adding', got 'digits'"):
        from_mapping(AddingConfig, {"task": "digits"})


def test_batch_size_must_split_evenly_across_processes(tmp_path):
    task = TASKS["digits"](from_mapping(DigitsConfig, {"batch_size": 32}))
    three = loop.Processes(torch.device("cpu"), rank=0, world=3)
    with pytest.raises(loop.TrainError, match=r"batch_size=32 must be divisible .* \(3\)"):
        loop._train(task, tmp_path, three, False, True, 10)


# ------------------------------------------------------------------ crash safety

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "lstmkit", "train", "--task", "adding", "--run-dir", str(run_dir)]
    argv += [*TINY["adding"], "--quiet", "--steps", "100000", "--eval-every", "1", *extra]
    return subprocess.Popen(
        argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_a_step(process: subprocess.Popen) -> None:
    """Until the process (quiet, evaluating every step) reports a step it trained."""
    for line in process.stdout:
        if line.startswith(b"step "):
            return
    raise AssertionError(f"the process ended without training: {process.stderr.read().decode()}")


def _resume(run_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "lstmkit", "train", "--resume", str(run_dir), "--quiet"]
    return subprocess.Popen(
        argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    """A checkpoint every step; SIGKILL at random instants; each time the last checkpoint
    loads, and the resumed run trains on from it."""
    run = tmp_path / "run"
    generator = torch.Generator().manual_seed(0)
    process, step = _launch(run), 0
    for attempt in range(6):
        _wait_for_a_step(process)
        time.sleep(0.5 * torch.rand((), generator=generator).item())
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = checkpoint.load(run)  # raises on a damaged checkpoint
        assert saved.state["step"] >= step, attempt
        step = saved.state["step"]
        process = _resume(run)
    process.kill()
    process.wait()
    step = checkpoint.load(run).state["step"]
    assert cli("train", "--resume", run, "--steps", str(step + 2), "--quiet") == 0
    assert checkpoint.load(run).state["step"] == step + 2


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


def test_ctrl_c_before_anything_was_logged(tmp_path, monkeypatch, capsys):
    """An interrupt requested before the first step: a checkpoint at step 0, no plot, 130."""
    monkeypatch.setattr(loop._Interrupt, "agreed", lambda self, processes: True)
    assert train("adding", tmp_path / "run") == 130
    assert checkpoint.load(tmp_path / "run").state["step"] == 0
    assert "interrupted at step 0" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli("train", "--resume", tmp_path / "run", "--steps", "2", "--quiet") == 0


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    process = _launch(run, "--eval-every", "100000")  # no checkpoint until Ctrl-C
    while not loop.read_metrics(run):  # it trains
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err
    step = checkpoint.load(run).state["step"]
    assert f"interrupted at step {step}".encode() in out
    assert cli("train", "--resume", run, "--steps", str(step + 3), "--quiet") == 0


# ------------------------------------------------------------------ distributed


def _torchrun(*argv: str | Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, *map(str, argv)], env=SUBPROCESS_ENV, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    settings = [*TINY["adding"], "--steps", "12", "--batch-size", "16"]
    worker = Path(__file__).with_name("ddp_worker.py")
    _torchrun(worker, "--task", "adding", "--run-dir", tmp_path / "ddp", *settings)
    per_rank = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_bit_equal(per_rank[0], per_rank[1], "rank 1")
    _torchrun(
        "-m",
        "lstmkit",
        "train",
        "--task",
        "adding",
        "--run-dir",
        tmp_path / "cli",
        "--quiet",
        *settings,
    )
    assert train("adding", tmp_path / "one", "--steps", "12", "--batch-size", "16") == 0
    one = checkpoint.load(tmp_path / "one").model
    for weights in (per_rank[0], checkpoint.load(tmp_path / "cli").model):
        assert weights.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(weights[name], one[name], rtol=1e-5, atol=1e-6)
