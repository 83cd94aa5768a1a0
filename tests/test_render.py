"""The documentation's benchmark tables are rendered from committed results
(lstmkit.bench.render): every rendered region of the README and docs/ is what the results say
now, a result that does not name its CPU is refused, and the ratios are the results' own."""

from __future__ import annotations

import copy
import json
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


def test_runs_of_different_configurations_are_refused(tmp_path):
    _suite(tmp_path)
    path = tmp_path / "run" / "threads-1" / "bench.json"
    result = json.loads(path.read_text())
    result["configs"][0]["name"] = "M"
    path.write_text(json.dumps(result))
    with pytest.raises(render.RenderError, match="time different configurations"):
        render.render_region("suite", "run", tmp_path)
