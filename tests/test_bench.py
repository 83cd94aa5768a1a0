"""The benchmark's own pieces: the naive baseline against torch.nn.LSTM, the two measurements
on hand-checkable inputs, and the CLI end to end."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from torch import nn

import lstmkit
from lstmkit import machine
from lstmkit.__main__ import main
from lstmkit.bench import cli, ort, report, serve, suite
from lstmkit.bench.measure import saved_bytes, time_interleaved
from lstmkit.bench.naive import NaiveLSTM
from lstmkit.bench.suite import (
    BASELINE,
    NAIVE,
    PEER,
    Config,
    implementation_name,
    run_config,
)
from lstmkit.bench.torchscript import ScriptedLayerNormLSTM


@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "batch_first"), [(1, False, True), (2, True, False)]
)
def test_naive_lstm_matches_nn_lstm(num_layers: int, bidirectional: bool, batch_first: bool):
    torch.manual_seed(0)
    sizes = {
        "input_size": 5,
        "hidden_size": 7,
        "num_layers": num_layers,
        "bidirectional": bidirectional,
        "batch_first": batch_first,
    }
    theirs = nn.LSTM(**sizes).double()
    ours = NaiveLSTM(**sizes).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        output, (h_n, c_n) = model(xi)
        weighting = torch.Generator().manual_seed(1)  # the same random loss for both models
        loss = sum(
            (torch.randn(v.shape, dtype=v.dtype, generator=weighting) * v).sum()
            for v in (output, h_n, c_n)
        )
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append(((output, h_n, c_n, xi.grad), grads))
    (values, grads), (expected_values, expected_grads) = results
    for value, expected in zip(values, expected_values, strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-10)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-10)


def test_saved_bytes_counts_each_saved_storage_once():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # 96 bytes
    b = torch.randn(3, 4, requires_grad=True)  # float32: 48 bytes
    w = torch.randn(4, requires_grad=True)  # 16 bytes, treated as a parameter

    def forward():
        # mul saves a and b; the second mul saves w and (a * b) (96 bytes); a * a saves a twice.
        return ((a * b) * w).sum() + (a * a).sum()

    counted = saved_bytes(forward, [w])
    assert counted.total == 96 + 48 + 16 + 96
    assert counted.excluding_parameters == 96 + 48 + 96


def _timed_calls(repeats: int):
    """time_interleaved on three callables with a fake clock: (the calls made, the timings)."""
    now = [0.0]
    calls = []
    durations = {
        "a": iter([9.0, 1.0, 5.0, 3.0, 2.0]),
        "b": iter([7.0, 2.0, 8.0, 4.0, 6.0]),
        "c": iter([1.0] * 5),
    }

    def make(name):
        def run():
            calls.append(name)
            now[0] += next(durations[name])

        return run

    runs = {name: make(name) for name in "abc"}
    return calls, time_interleaved(runs, repeats, 1, clock=lambda: now[0])


def test_time_interleaved_shuffles_each_round_and_takes_medians():
    calls, timings = _timed_calls(4)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, 15, 3)]
    assert rounds[0] == "abc"  # the warm-up, in order
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each once per round
    # no callable always follows the same one; the orders are the same in every run
    assert len({calls[i - 1] for i in range(3, 15) if calls[i] == "a"}) > 1
    assert _timed_calls(4)[0] == calls
    assert timings["a"].runs_s == (1.0, 5.0, 3.0, 2.0)  # the warm-up's 9.0 is not timed
    assert timings["b"].runs_s == (2.0, 8.0, 4.0, 6.0)
    assert timings["a"].median_s == statistics.median([1.0, 5.0, 3.0, 2.0])
    assert timings["b"].median_s == statistics.median([2.0, 8.0, 4.0, 6.0])


@pytest.mark.parametrize("mode", [[], ["--stream"], ["--serve"]], ids=["suite", "stream", "serve"])
def test_an_unwritable_out_is_one_line_before_any_run(tmp_path, monkeypatch, capsys, mode):
    """--out under a regular file: one line naming the path, exit status 1, and nothing timed
    (every mode's runner fails the test if called)."""
    (tmp_path / "file").write_text("")

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran before checking --out")

    for module, name in ((cli, "run_suite"), (cli, "run_stream"), (serve, "run_serve")):
        monkeypatch.setattr(module, name, must_not_run)
    out = tmp_path / "file" / "reports"
    assert main(["bench", *mode, "--quick", "--threads", "2", "1", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"lstmkit bench: --out must be a directory it can write to, got {out} "
        f"({out / 'threads-2'}: Not a directory)\n"
    )


def test_a_failed_report_write_is_one_line(tmp_path, monkeypatch, capsys):
    """A write that fails after the runs (a full disk): one line, exit status 1."""

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "bench.json"))

    monkeypatch.setattr(cli, "write_reports", full_disk)
    assert main(["bench", "--configs", "S", "--quick", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"lstmkit bench: [Errno 28] No space left on device: '{tmp_path / 'bench.json'}'\n"
    )


def test_bench_cli_writes_reports(tmp_path, capsys):
    assert main(["bench", "--configs", "S", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["settings"]["repeats"] == 3
    (config,) = data["configs"]
    assert config["name"] == "S"
    implementations = [implementation_name("auto"), BASELINE, NAIVE]
    for mode in ("inference", "training"):
        timings = config["timings_ms"][mode]
        assert list(timings) == implementations
        for timing in timings.values():
            assert len(timing["runs"]) == 3
            assert timing["median"] == statistics.median(timing["runs"]) > 0
        assert set(config["time_ratio_vs_baseline"][mode]) == {implementations[0], NAIVE}
    for name in implementations:
        saved = config["saved_bytes"][name]
        assert 0 < saved["excluding_parameters"] < saved["total"]
    assert "lstmkit[auto] ÷ nn.LSTM" in capsys.readouterr().out


def test_bench_times_onnxruntime_as_a_peer_for_inference(tmp_path, capsys):
    """``--peers ort``: ONNX Runtime is timed for inference after nn.LSTM, checked against
    float64 like the others, and every lstmkit implementation gets a ratio to the faster peer."""
    pytest.importorskip("onnxruntime")
    args = ["bench", "--configs", "S", "--quick", "--peers", "ort", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["settings"]["peers"] == ["ort"]
    (config,) = data["configs"]
    assert list(config["timings_ms"]["inference"]) == [
        implementation_name("auto"), BASELINE, ort.NAME, NAIVE,
    ]  # fmt: skip
    assert ort.NAME not in config["timings_ms"]["training"]
    assert config["float32_error_vs_float64"][ort.NAME] < 1e-5
    timings = config["timings_ms"]["inference"]
    fastest = min(timings[BASELINE]["median"], timings[ort.NAME]["median"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "| S | inference" in line)
    ratio = timings[implementation_name("auto")]["median"] / fastest
    assert row.split("|")[-2].strip() == f"{ratio:.2f}"
    assert "÷ fastest peer" in (tmp_path / "bench.md").read_text()


def test_bench_without_onnxruntime_says_so_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ort, "missing", lambda: f"onnxruntime is not installed ({ort.INSTALL})")
    args = ["bench", "--configs", "S", "--quick", "--peers", "ort", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime peer skipped: onnxruntime is not installed (pip install" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert ort.NAME not in data["configs"][0]["timings_ms"]["inference"]


@pytest.mark.parametrize("cell", ["layernorm", "peephole", "cifg"])
def test_run_config_times_a_variant_against_its_reference(cell):
    """``--cell``: every implementation's float32 error is measured against the same model in
    float64 (the variant on the reference backend, or nn.LSTM for the baselines); for the
    layernorm cell its TorchScript peer is timed beside them."""
    tiny = Config("tiny", batch=2, seq_len=3, input_size=4, hidden_size=5)
    result = run_config(tiny, ["auto", "reference"], repeats=1, warmup=0, cell=cell)
    names = [implementation_name(b, cell) for b in ("auto", "reference")]
    peer = [PEER] if cell == "layernorm" else []
    assert list(result.timings["training"]) == [*names, *peer, BASELINE, NAIVE]
    assert set(result.errors) == set(result.bounds) == set(result.timings["training"])
    for name, error in result.errors.items():
        assert error < 1e-5, name
    assert result.suspect() == {}


def test_torchscript_peer_computes_lstmkits_layernorm_cell():
    ours = lstmkit.LSTM(4, 5, cell="layernorm", batch_first=True, dtype=torch.float64)
    peer = ScriptedLayerNormLSTM(4, 5, batch_first=True).double()
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    (out, (h, c)), (want, (h_want, c_want)) = peer(x), ours(x)
    for got, expected in ((out, want), (h, h_want), (c, c_want)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_an_inaccurate_implementation_is_marked_not_fatal(monkeypatch, tmp_path):
    """An implementation far from float64 is timed and reported with a mark, not aborted."""
    build = suite.build_models

    def with_a_wrong_one(*args, **kwargs):
        models = build(*args, **kwargs)
        model = models[implementation_name("auto")]
        right = model.forward
        model.forward = lambda x: (right(x)[0] + 0.5, right(x)[1])  # a wrong computation
        return models

    monkeypatch.setattr(suite, "build_models", with_a_wrong_one)
    tiny = Config("tiny", batch=2, seq_len=3, input_size=4, hidden_size=5)
    result = run_config(tiny, ["auto"], repeats=1, warmup=0)
    assert list(result.suspect()) == [implementation_name("auto")]
    assert "✗" in report.markdown_tables([result])
    assert set(result.timings["inference"]) == {implementation_name("auto"), BASELINE, NAIVE}


def test_several_thread_counts_write_a_report_each(tmp_path):
    argv = ["bench", "--configs", "S", "--quick", "--repeats", "1", "--threads", "1", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    for threads in (1, 2):
        data = json.loads((tmp_path / f"threads-{threads}" / "bench.json").read_text())
        assert data["machine"]["threads"] == threads


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu")
def test_cpu_info_agrees_with_lscpu():
    """The bench records the CPU as lscpu names it: model name, family, model, flags."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    rows = (line.partition(":") for line in text.splitlines())
    lscpu = {key.strip(): value.strip() for key, _, value in rows}
    info = machine.cpu_info()
    assert info["cpu"] == lscpu["Model name"]
    assert info["cpu_family"] == lscpu["CPU family"]
    assert info["cpu_model"] == lscpu["Model"]
    assert set(info["cpu_flags_all"].split()) == set(lscpu["Flags"].split())
    assert set(info["cpu_vector_flags"].split()) <= set(lscpu["Flags"].split())


def test_reports_without_matplotlib_skip_only_the_chart(tmp_path, monkeypatch, capsys):
    """matplotlib is optional (the train extra): without it the JSON and Markdown are written
    and the chart is skipped with one line."""
    tiny = Config("tiny", batch=2, seq_len=3, input_size=4, hidden_size=5)
    result = run_config(tiny, ["auto"], repeats=1, warmup=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report.write_reports(tmp_path, [result], machine.machine_info(1), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]
    assert "bench.png not drawn: matplotlib is not installed" in capsys.readouterr().out


def test_reports_of_configs_with_different_implementations(tmp_path):
    """A peer timed in some configurations only (the TorchScript layer-norm LSTM exists for
    one layer and direction) gets a dash elsewhere in every table and the plot, instead of
    failing the report after the whole suite ran."""
    one = Config("one", batch=2, seq_len=3, input_size=4, hidden_size=5)
    two = Config("two", batch=2, seq_len=3, input_size=4, hidden_size=5, num_layers=2)
    results = [run_config(config, ["auto"], 1, 0, cell="layernorm") for config in (one, two)]
    assert PEER in results[0].saved and PEER not in results[1].saved
    for ordered in (results, results[::-1]):
        tables = report.write_reports(tmp_path, ordered, {}, {})
        row = next(line for line in tables.splitlines() if line.startswith("| two | B=2"))
        assert "—" in row
        assert (tmp_path / "bench.md").read_text(encoding="utf-8").count(PEER) >= 3


def test_bench_serve_measures_each_client_count_in_fresh_processes(tmp_path, monkeypatch):
    """--serve: for each client count, lstmkit and nn.LSTM each serve the same drawn requests
    in a fresh process; every concurrent output equals the same request run serially after,
    nothing is printed to standard error, and the ratios are those of the rows."""
    monkeypatch.setattr(serve, "MODELS", {"tiny": 12})
    monkeypatch.setattr(serve, "CLIENTS", (1, 3))
    args = ["bench", "--serve", "--requests", "7", "--threads", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "serve.json").read_text())["results"]
    assert [(r["clients"], r["implementation"]) for r in rows] == [
        (1, serve.LSTMKIT), (1, suite.BASELINE), (3, serve.LSTMKIT), (3, suite.BASELINE),
    ]  # fmt: skip
    for row in rows:
        assert row["max_abs_diff_vs_serial"] <= 1e-6
        assert row["stderr"] == ""
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    ours, theirs = rows[2], rows[3]
    text = (tmp_path / "serve.md").read_text()
    assert f"| tiny | 3 | {ours['p99_ms'] / theirs['p99_ms']:.2f} |" in text


def test_requests_are_drawn_within_their_ranges_and_repeat_with_the_seed():
    shapes = serve.draw_requests(5000, 3)
    assert shapes == serve.draw_requests(5000, 3)
    lengths, batches = zip(*shapes, strict=True)
    assert (min(lengths), max(lengths)) == serve.LENGTHS
    assert (min(batches), max(batches)) == serve.BATCHES
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0
    assert serve.percentile(list(range(1, 101)), 0.99) == 99


def test_bench_serve_reports_a_failed_process_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "MODELS", {"broken": 0})  # an LSTM of hidden size 0 is refused
    monkeypatch.setattr(serve, "CLIENTS", (1,))
    args = ["bench", "--serve", "--requests", "2", "--out", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("lstmkit bench --serve: the lstmkit process serving broken to 1")
    assert "ValueError: input_size must be greater than zero" in err[0]
