"""``python -m lstmkit.backends.triton_check``: the kernels the triton backend's rule chooses,
compiled for a GPU this machine does not have, and the occupancy arithmetic on the result."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from lstmkit.backends import triton as backend
from lstmkit.backends import triton_check as check

H200 = check.TARGETS["sm_90"]


def test_the_kernels_are_the_rules_choice():
    kernels, programs = check.kernels_for("lstm", "fp32", 8, 1024, H200.sms)
    plan = backend._plan(8, 1024, 1024, False, 4, H200.sms)
    assert [k.kernel for k in kernels] == ["forward", "forward+save", "backward"]
    assert {(k.mode, k.block_b, k.block_h, k.block_k) for k in kernels} == {
        (plan.mode, plan.block_b, plan.block_h, plan.block_k)
    }
    assert programs == plan.slices  # one block of the batch
    assert check.kernels_for("layernorm", "fp32", 8, 512, H200.sms) == ([], 0)  # refused


@pytest.mark.parametrize(
    ("registers", "shared", "warps", "expected"),
    [
        (255, 0, 8, 1),  # 255 x 256 threads: 65,280 of 65,536 registers
        (128, 100 * 1024, 4, 2),  # registers allow 4, shared memory 2
        (32, 0, 4, 16),  # warps: 64 / 4
        (16, 0, 1, 32),  # the block limit
        (200, 300 * 1024, 4, 0),  # more shared memory than an SM has
    ],
)
def test_programs_per_sm(registers, shared, warps, expected):
    assert check.programs_per_sm(H200, registers, shared, warps) == expected


def test_a_host_mode_kernel_compiles_for_sm_90_and_reports_its_resources():
    (forward, *_), programs = check.kernels_for("lstm", "fp32", 8, 1024, H200.sms)
    result = check.compile_isolated(forward, H200, programs)
    assert result["compiled"], result
    assert 0 < result["registers"] <= 255 and result["spill_stores"] >= 0
    per_sm = check.programs_per_sm(H200, result["registers"], result["shared"], 4)
    assert result["programs_per_sm"] == per_sm >= 1 and result["co_resident"]


def test_a_compiler_that_aborts_the_process_is_a_result(monkeypatch):
    def abort(kernel, target, programs):
        os.write(2, b"Assertion `x' failed.\n")
        os.abort()

    monkeypatch.setattr(check, "compile_one", abort)
    (forward, *_), _ = check.kernels_for("lstm", "fp32", 8, 1024, H200.sms)
    result = check.compile_isolated(forward, H200, 1)
    assert result == {
        "compiled": False,
        "error": "the compiler died (exit -6): Assertion `x' failed.",
    }


@pytest.mark.parametrize("cell", ["lstm", "layernorm"])
def test_the_float32_backward_compiles_for_sm_90(cell):
    """Its ``(BLOCK_B, 1)`` row mask once made LLVM's SLP vectorizer abort the process on
    sm_90 with full-precision float32 products (benchmarks/gpu-compile)."""
    kernels, programs = check.kernels_for(cell, "fp32", 8, 32, H200.sms)
    backward = kernels[-1]
    assert (backward.kernel, backward.mode) == ("backward", "registers")
    result = check.compile_isolated(backward, H200, programs)
    assert result["compiled"], result
    assert result["spill_stores"] == 0


def test_a_large_batch_backward_fits_shared_memory_on_sm_90():
    """At B = 64 the backward once took 64-row tiles and asked 272 KB of shared memory, more
    than the 227 KB a program may have: the launch would fail."""
    kernels, programs = check.kernels_for("lstm", "fp32", 64, 64, H200.sms)
    result = check.compile_isolated(kernels[-1], H200, programs)
    assert result["compiled"], result
    assert result["shared_fits"] and result["programs_per_sm"] >= 1 and result["co_resident"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "0"], "argument --hidden: invalid positive int value: '0'"),
        (["--cells", "gru"], "argument --cells: invalid choice: 'gru'"),
    ],
)
def test_bad_arguments_are_refused_before_compiling(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unwritable_out_is_one_line_before_compiling(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert check.main(["--out", str(tmp_path / "file" / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("triton_check: error: cannot write into --out")
