"""The documentation's benchmark tables are rendered from committed results
(lstmkit.bench.render): every rendered region of the README and docs/ is what the results say
now, a result that does not name its CPU is refused, and the ratios are the results' own."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from lstmkit.bench import render

ROOT = Path(__file__).resolve().parents[1]


def test_every_rendered_region_of_the_docs_is_current():
    documents = render.documents(ROOT)
    assert ROOT / "README.md" in documents
    regions = 0
    for path in documents:
        text = path.read_text()
        regions += len(render.BEGIN.findall(text))
        assert render.render_text(text, ROOT, str(path)) == text, (
            f"{path.relative_to(ROOT)} is stale: run python -m lstmkit.bench.render"
        )
    assert regions >= 3


MACHINE = {
    "cpu": "Test CPU",
    "cpu_family": "25",
    "cpu_model": "17",
    "cpu_vector_flags": "avx2 avx512f",
    "torch": "2.13.0+cpu",
    "date": "2026-12-03T00:00:00+00:00",
}


def _config(name, timings, saved):
    return {
        "name": name, "batch": 8, "seq_len": 50, "input_size": 64, "hidden_size": 64,
        "num_layers": 1, "bidirectional": False,
        "timings_ms": {
            mode: {impl: {"median": t} for impl, t in by_impl.items()}
            for mode, by_impl in timings.items()
        },
        "saved_bytes_ratio_vs_baseline": {"lstmkit[auto]": saved},
    }  # fmt: skip


def _suite(tmp_path, machine=MACHINE, ort=True):
    """Two runs with medians whose ratios are known: at 2 threads lstmkit 3 ms, nn.LSTM 4,
    ONNX Runtime 2 (inference); training 5 against 4; at 1 thread 6, 8, 12; 9 against 12."""
    medians = {2: (3.0, 4.0, 2.0, 5.0, 4.0), 1: (6.0, 8.0, 12.0, 9.0, 12.0)}
    for threads, (ours, nn, peer, ours_t, nn_t) in medians.items():
        inference = {"lstmkit[auto]": ours, "nn.LSTM": nn}
        if ort:
            inference["onnxruntime"] = peer
        training = {"lstmkit[auto]": ours_t, "nn.LSTM": nn_t}
        result = {
            "machine": machine,
            "settings": {"repeats": 5, "implementations": ["lstmkit[auto]", "nn.LSTM"]},
            "configs": [_config("S", {"inference": inference, "training": training}, 0.4)],
        }
        out = tmp_path / "run" / f"threads-{threads}"
        out.mkdir(parents=True)
        (out / "bench.json").write_text(json.dumps(result))


def test_suite_table_holds_the_results_ratios(tmp_path):
    _suite(tmp_path)
    table = render.render_region("suite", "run", tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| S "))
    # inference ÷ nn.LSTM, ÷ the faster peer, training ÷ nn.LSTM; then 1 thread; then saved
    assert row == "| S (8, 50, 64, 1) | 0.75 | 1.50 | 1.25 | 0.75 | 0.75 | 0.75 | 0.40 |"
    assert "Test CPU, CPU family 25, model 17 (AVX-512); torch 2.13.0+cpu; 5 repeats" in table
    assert "`run/threads-2/bench.json`, `run/threads-1/bench.json`" in table


def test_suite_without_onnx_runtime_has_no_peer_ratio(tmp_path):
    _suite(tmp_path, ort=False)
    row = render.render_region("suite", "run", tmp_path).splitlines()[2]
    assert row == "| S (8, 50, 64, 1) | 0.75 | — | 1.25 | 0.75 | — | 0.75 | 0.40 |"


@pytest.mark.parametrize("field", render.CPU_FIELDS)
def test_a_result_that_does_not_name_its_cpu_is_refused(tmp_path, field):
    machine = copy.deepcopy(MACHINE)
    del machine[field]
    _suite(tmp_path, machine)
    with pytest.raises(render.RenderError, match=f"does not name its CPU: no {field}"):
        render.render_region("suite", "run", tmp_path)


def test_check_finds_a_stale_region_and_rendering_rewrites_it(tmp_path, capsys):
    _suite(tmp_path)
    doc = tmp_path / "README.md"
    doc.write_text(
        "Intro.\n\n<!-- render suite run -->\n| typed by hand |\n<!-- /render -->\nEnd.\n"
    )
    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "README.md" in error
    assert "typed by hand" in doc.read_text()
    assert render.main(["--root", str(tmp_path)]) == 0
    text = doc.read_text()
    assert text.startswith("Intro.\n\n<!-- render suite run -->\n| config")
    assert text.endswith("`run/threads-1/bench.json`.\n<!-- /render -->\nEnd.\n")
    assert "typed by hand" not in text
    assert render.main(["--check", "--root", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- render suite run -->\nno end\n", "has no <!-- /render -->"),
        ("<!-- render nonsense run -->\n<!-- /render -->\n", "unknown render kind 'nonsense'"),
        ("<!-- render suite missing -->\n<!-- /render -->\n", "does not exist"),
    ],
)
def test_a_broken_region_is_one_line_and_changes_nothing(tmp_path, capsys, text, message):
    _suite(tmp_path)
    doc = tmp_path / "README.md"
    doc.write_text(text)
    assert render.main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert doc.read_text() == text


@pytest.mark.parametrize(
    ("content", "message"),
    [("{cut short", "is not JSON: "), ("[1, 2]", "must hold a JSON object, got list")],
)
def test_a_damaged_result_file_is_one_line_and_changes_nothing(tmp_path, capsys, content, message):
    _suite(tmp_path)
    path = tmp_path / "run" / "threads-1" / "bench.json"
    path.write_text(content)
    doc = tmp_path / "README.md"
    doc.write_text("<!-- render suite run -->\n| typed |\n<!-- /render -->\n")
    assert render.main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"render: {path} {message}") and error.count("\n") == 1, error
    assert doc.read_text() == "<!-- render suite run -->\n| typed |\n<!-- /render -->\n"


def test_runs_of_different_configurations_are_refused(tmp_path):
    _suite(tmp_path)
    path = tmp_path / "run" / "threads-1" / "bench.json"
    result = json.loads(path.read_text())
    result["configs"][0]["name"] = "M"
    path.write_text(json.dumps(result))
    with pytest.raises(render.RenderError, match="time different configurations"):
        render.render_region("suite", "run", tmp_path)


def _run_dir(tmp_path, starts):
    run = tmp_path / "runs" / "charlm"
    run.mkdir(parents=True)
    config = {"task": "charlm", "num_layers": 2, "hidden_size": 256, "batch_size": 32}
    run.joinpath("config.json").write_text(json.dumps({**config, "time_budget": 100.0}))
    records = [{"step": 10, "train_loss": 2.0}, {"step": 200, "eval_loss": 1.5, "eval_bpc": 2.1}]
    records += [{"step": 467, "eval_loss": 1.2, "eval_bpc": 1.7845}]
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if starts is not None:
        lines = [json.dumps({"step": step, **machine}) for step, machine in starts]
        run.joinpath("machine.jsonl").write_text("\n".join(lines) + "\n")
    return "runs/charlm"


def test_a_run_is_its_last_evaluation_and_every_machine_it_ran_on(tmp_path):
    other = {**MACHINE, "cpu": "Other CPU", "cpu_model": "1", "cpu_vector_flags": "avx2"}
    path = _run_dir(tmp_path, [(0, MACHINE), (200, other)])
    assert render.render_region("run", path, tmp_path) == (
        "Validation **1.78 bits per character** after 467 steps (charlm, 2 layers of 256, "
        "batch 32, 100 s of training); Test CPU, CPU family 25, model 17 (AVX-512); torch "
        "2.13.0+cpu; 2026-12-03; Other CPU, CPU family 25, model 1 (AVX2); torch 2.13.0+cpu; "
        "2026-12-03: `runs/charlm/`."
    )


def test_a_run_without_its_machine_is_refused(tmp_path):
    with pytest.raises(render.RenderError, match="records no machine"):
        render.render_region("run", _run_dir(tmp_path, None), tmp_path)
    cpuless = {k: v for k, v in MACHINE.items() if k != "cpu_model"}
    path = _run_dir(tmp_path / "again", [(0, cpuless)])
    with pytest.raises(render.RenderError, match="does not name its CPU: no cpu_model"):
        render.render_region("run", path, tmp_path / "again")


def test_curves_are_each_runs_evaluations_at_the_steps_they_share(tmp_path):
    first = _run_dir(tmp_path / "a", [(0, MACHINE)])
    second = _run_dir(tmp_path / "b", [(0, MACHINE)])
    (tmp_path / "b" / second / "metrics.jsonl").write_text(
        json.dumps({"step": 200, "eval_loss": 1.4, "eval_bpc": 2.0}) + "\n"
    )
    (tmp_path / "a" / "b").symlink_to(tmp_path / "b" / "runs")
    table = render.render_region("curves", f"{first},b/charlm", tmp_path / "a")
    assert table.splitlines()[:4] == [
        "| step | 200 |",
        "|---|--:|",
        "| `runs/charlm` bpc | 2.1000 |",
        "| `b/charlm` bpc | 2.0000 |",
    ]
    assert table.endswith(
        "Test CPU, CPU family 25, model 17 (AVX-512); torch 2.13.0+cpu; 2026-12-03."
    )


def test_compile_table_holds_each_rows_ratio(tmp_path):
    rows = [{"cell": "lstm", "config": "S", "mode": "inference", "eager_ms": 2.0}]
    rows[0] |= {"compiled_ms": 1.5, "ratio": 0.75}
    settings = {"repeats": 15, "configs": {"S": [8, 50, 64]}}
    (tmp_path / "compile.json").write_text(
        json.dumps({"machine": MACHINE, "settings": settings, "rows": rows})
    )
    table = render.render_region("compile", "compile.json", tmp_path).splitlines()
    assert table[2] == "| lstm | S (8, 50, 64) | inference | 2.00 | 1.50 | 0.75 |"
    assert table[-1].endswith("15 repeats; 2026-12-03: `compile.json`.")


def test_serve_table_pairs_lstmkit_with_nn_lstm_per_model_and_clients(tmp_path):
    def row(implementation, per_s, p99, first):
        return {
            "model": "M", "hidden_size": 256, "clients": 2, "implementation": implementation,
            "requests_per_s": per_s, "p99_ms": p99, "first_ms": first, "steady_ms": 10.0,
            "max_abs_diff_vs_serial": 0.0,
        }  # fmt: skip

    results = [row("nn.LSTM", 40.0, 50.0, 30.0), row("lstmkit", 50.0, 45.0, 12.0)]
    settings = {"requests": 1000}
    (tmp_path / "serve.json").write_text(
        json.dumps({"machine": MACHINE, "settings": settings, "results": results})
    )
    table = render.render_region("serve", "serve.json", tmp_path).splitlines()
    assert table[2] == (
        "| M (H = 256) | 2 | 50.0 (40.0) | 45.0 (50.0) | 0.90 | 1.25 | 1.2 (3.0) | 0.0e+00 |"
    )
    assert len(table) == 5
    assert table[-1].endswith("1000 requests; 2026-12-03: `serve.json`.")


def test_a_run_without_bits_per_character_lists_its_evaluation(tmp_path):
    path = _run_dir(tmp_path, [(0, MACHINE)])
    run = tmp_path / path
    config = {"task": "adding", "num_layers": 1, "hidden_size": 128, "batch_size": 50}
    run.joinpath("config.json").write_text(json.dumps({**config, "time_budget": 0, "steps": 6000}))
    record = {"step": 6000, "eval_loss": 0.000119, "eval_solved": 0.996}
    run.joinpath("metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert render.render_region("run", path, tmp_path).startswith(
        "Validation loss 0.000119, solved 0.996 after 6000 steps (adding, 1 layer of 128, "
        "batch 50, 6000 steps); Test CPU"
    )


def test_a_forecast_run_is_its_test_table(tmp_path):
    path = _run_dir(tmp_path, [(0, MACHINE)])
    run = tmp_path / path
    config = {"task": "forecast", "num_layers": 1, "hidden_size": 64, "batch_size": 64}
    config |= {"window": 104, "horizon": 52}
    run.joinpath("config.json").write_text(json.dumps(config))
    test = {
        "LSTM": {"mae": 0.5, "rmse": 0.7},
        "seasonal naive": {"mae": 2.0, "rmse": 2.5},
        "Holt-Winters": {"mae": 1.5, "rmse": 1.75},
    }
    result = {"series": "S", "values": 900, "test_start": 800, "origins": 49, "test": test}
    with pytest.raises(render.RenderError, match=r"has no forecast\.json: it did not finish"):
        render.render_region("forecast", path, tmp_path)
    run.joinpath("forecast.json").write_text(json.dumps(result))
    assert render.render_region("forecast", path, tmp_path).splitlines() == [
        "| forecast | test MAE | test RMSE | MAE ÷ seasonal naive's |",
        "|---|--:|--:|--:|",
        "| LSTM | 0.500 | 0.700 | 0.25 |",
        "| seasonal naive | 2.000 | 2.500 | 1.00 |",
        "| Holt-Winters | 1.500 | 1.750 | 0.75 |",
        "",
        "Series: S (900 values); test part from index 800: 49 origins, each forecast 52 steps "
        "ahead from the 104 before it; the LSTM 1 layer of 64, 467 steps of batch 64; Test CPU, "
        "CPU family 25, model 17 (AVX-512); torch 2.13.0+cpu; 2026-12-03: `runs/charlm/`.",
    ]
    # a second seed: its LSTM row after the first; a run of another test part is refused
    shutil.copytree(run, tmp_path / "runs" / "seed1")
    other = tmp_path / "runs" / "seed1"
    other.joinpath("config.json").write_text(json.dumps({**config, "seed": 1}))
    result["test"]["LSTM"] = {"mae": 0.6, "rmse": 0.8}
    other.joinpath("forecast.json").write_text(json.dumps(result))
    run.joinpath("config.json").write_text(json.dumps({**config, "seed": 0}))
    table = render.render_region("forecast", f"{path},runs/seed1", tmp_path).splitlines()
    assert table[2:4] == [
        "| LSTM, seed 0 | 0.500 | 0.700 | 0.25 |",
        "| LSTM, seed 1 | 0.600 | 0.800 | 0.30 |",
    ]
    assert table[-1].endswith("2026-12-03: `runs/charlm/`, `runs/seed1/`.")
    other.joinpath("forecast.json").write_text(json.dumps({**result, "test_start": 801}))
    with pytest.raises(render.RenderError, match="forecast different series or test parts"):
        render.render_region("forecast", f"{path},runs/seed1", tmp_path)


def test_runs_are_one_row_each_with_their_settings_and_last_evaluation(tmp_path):
    path = _run_dir(tmp_path, [(0, MACHINE)])
    config = {"task": "charlm", "seed": 3, "batch_size": 8, "lr": 0.008, "time_budget": 33.0}
    (tmp_path / path / "config.json").write_text(json.dumps(config))
    table = render.render_region("runs", path, tmp_path).splitlines()
    assert table[2] == "| `runs/charlm` | 3 | 8 | 0.008 | 33 s | 467 | 1.784 bpc |"
    assert table[-1] == "Test CPU, CPU family 25, model 17 (AVX-512); torch 2.13.0+cpu; 2026-12-03."


def test_samples_table_holds_each_runs_reading(tmp_path):
    run = {"run": "seed0", "seed": 0, "steps": 3694, "evaluations": 13, "bpc": 1.8304}
    run |= {"ordinary_share": 0.9968, "layout_lines": 1, "machine": MACHINE}
    (tmp_path / "samples.json").write_text(json.dumps([run]))
    table = render.render_region("samples", "samples.json", tmp_path).splitlines()
    assert table[2] == "| 0 | 3694 | 13 | 1.830 | 0.997 | 1 |"
    (tmp_path / "samples.json").write_text(json.dumps([{**run, "machine": {"cpu": "x"}}]))
    with pytest.raises(render.RenderError, match="does not name its CPU"):
        render.render_region("samples", "samples.json", tmp_path)


def test_triton_compile_table_says_each_hidden_sizes_modes_and_problems(tmp_path):
    def row(kernel, mode, sizes, **result):
        kept = {"compiled": True, "spill_stores": 0, "shared_fits": True, "programs_per_sm": 1}
        kept["co_resident"] = True
        return {"target": "sm_90", "kernel": kernel, "cell": "lstm", "dtype": "fp32"} | {
            "mode": mode,
            "sizes": sizes,
            **kept,
            **result,
        }

    rows = [
        row("forward", "registers", [[32, 8, 1]], spill_stores=64),
        row("backward", "registers", [[32, 8, 1]], compiled=False),
        row("forward", "barrier", [[128, 8, 8]], co_resident=False),
        row("forward", "host", [[1024, 8, 16]], spill_stores=40),  # no time loop
    ]
    result = {"machine": MACHINE, "settings": {"triton": "3.9.0"}, "rows": rows}
    (tmp_path / "compile.json").write_text(json.dumps(result))
    table = render.render_region("triton", "compile.json", tmp_path).splitlines()
    assert table[0] == "| target | cell | dtype | H 32 | H 128 | H 1024 |"
    assert table[2] == "| sm_90 | lstm | fp32 | R fails, spills | B not resident | H ok |"
    assert table[-1].startswith("Triton 3.9.0; compiled on Test CPU")
