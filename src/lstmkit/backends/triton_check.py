"""Compile the triton backend's kernels for a GPU this machine need not have, and read what the
GPU's compiler made of them: ``python -m lstmkit.backends.triton_check``.

For every configuration the backend's rule (:func:`lstmkit.backends.triton._plan`) chooses over
a grid of hidden sizes, batch sizes, cells and dtypes, each kernel it would launch (the forward
for inference and for training, the backward) is compiled by Triton for a named target
(``sm_90``: H100 / H200; ``sm_80``: A100) and assembled by the ``ptxas`` shipped in the triton
wheel, whose report gives the registers per thread and the bytes spilled to local memory.
Shared memory per program comes from Triton's metadata. From those and the target's limits
follow the programs one SM can hold at once and, for the ``barrier`` mode, whether all the
programs of a launch are resident together (else its grid barrier would never open).

It writes ``OUT/compile.json`` and ``OUT/compile.md`` (default ``benchmarks/gpu-compile``).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lstmkit import machine
from lstmkit.backends import triton as backend
from lstmkit.bench.report import markdown_table


@dataclass(frozen=True)
class Target:
    """A GPU's name, compute capability and the per-SM limits occupancy depends on."""

    name: str
    capability: int
    sms: int
    registers: int = 65536  # 32-bit registers per SM
    shared: int = 228 * 1024  # bytes of shared memory per SM
    shared_per_block: int = 227 * 1024
    warps: int = 64  # resident warps per SM
    blocks: int = 32  # resident blocks per SM


TARGETS = {
    "sm_90": Target("H200 (sm_90)", 90, sms=132),
    "sm_80": Target("A100 (sm_80)", 80, sms=108, shared=164 * 1024, shared_per_block=163 * 1024),
}
HIDDEN = (32, 64, 128, 256, 512, 1024)
BATCH = (1, 8, 64, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_INTS = ("t0", "t1", "batch", "hidden", "out_size")


@dataclass(frozen=True)
class Kernel:
    """One kernel as the backend would launch it: which, its compile-time arguments, its warps
    and its grid."""

    kernel: str  # "forward" (inference), "forward+save" (training) or "backward"
    cell: str
    dtype: str
    mode: str
    block_b: int
    block_h: int
    block_k: int
    block_out: int
    num_warps: int


def kernels_for(cell: str, dtype: str, batch: int, hidden: int, sms: int) -> tuple[list, int]:
    """The kernels a layer of ``cell`` (``input_size = hidden``, no projection) runs for
    inference and training at this batch size (none where the backend refuses it), and how
    many programs each launch has."""
    plan = backend._plan(batch, hidden, hidden, False, DTYPES[dtype].itemsize, sms)
    if plan is None or (cell == "layernorm" and plan.mode != "registers"):
        return [], 0
    fields = (cell, dtype, plan.mode, plan.block_b, plan.block_h, plan.block_k)
    kernels = [
        Kernel(kind, *fields, plan.block_out, plan.num_warps)
        for kind in ("forward", "forward+save", "backward")
    ]
    return kernels, -(-batch // plan.block_b) * plan.slices


def _compilable():
    """The kernel module as a GPU compiler takes it: the one imported, unless Triton's
    interpreter defined it (a process that set ``TRITON_INTERPRET``, the test suite), then a
    fresh copy defined with the interpreter off. Called in :func:`compile_isolated`'s child,
    which may turn the interpreter off for itself."""
    module = backend.kernels()
    if not module.INTERPRETED:
        return module
    import triton

    triton.knobs.runtime.interpret = False
    spec = importlib.util.spec_from_file_location("lstmkit_compiled_kernels", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def _signature(kernel: Kernel) -> tuple[object, dict[str, str], dict[str, object]]:
    """The Triton function, its argument types and its compile-time values."""
    kernels = _compilable()
    dot = _TRITON_TYPES[DTYPES[kernel.dtype]]
    # the backend's own compile-time arguments (a plan's slices do not reach them)
    plan = backend.Plan(
        kernel.block_b, kernel.block_h, kernel.block_k, kernel.block_out, 1, kernel.mode
    )
    flags = backend._blocks(plan, "ieee", False, False, kernel.cell)
    del flags["num_warps"]  # an option of the launch, not an argument
    if kernel.kernel == "backward":
        fn = kernels.lstm_backward
        flags |= backend._backward_blocks(plan)
        # the tensors the backend passes in the storage dtype of the products (dot) or of
        # the float32 accumulation
        in_dot = {"grad_out", "w_hh", "w_hr", "extra", "dz", "dr"}
    else:
        fn = kernels.lstm_forward
        flags |= backend._forward_blocks(plan, True, kernel.kernel == "forward+save")
        in_dot = {"xp", "w_hh", "w_hr", "extra", "h0", "out"}
    types = {}
    for name in fn.arg_names:
        if name in flags:
            types[name] = "constexpr"
        elif name in _INTS:
            types[name] = "i32"
        elif name in ("sizes", "counters"):
            types[name] = "*i32"
        else:
            types[name] = f"*{dot if name in in_dot else 'fp32'}"
    return fn, types, flags


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _ptxas_report(ptx: str, capability: int) -> str:
    """``ptxas -v``'s report on ``ptx``, by the ptxas Triton itself uses for ``capability``
    (shipped in the triton wheel), with the options Triton gives it."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target (\S+)", ptx, re.MULTILINE)[1]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}"]
        command += [str(source), "-o", str(Path(folder) / "kernel.cubin")]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def programs_per_sm(target: Target, registers: int, shared: int, num_warps: int) -> int:
    """How many programs of ``num_warps`` warps, each thread using ``registers`` registers and
    each program ``shared`` bytes of shared memory, one SM of ``target`` holds at once."""
    return min(
        target.registers // (registers * 32 * num_warps),
        target.shared // shared if shared else target.blocks,
        target.warps // num_warps,
        target.blocks,
    )


def compile_one(kernel: Kernel, target: Target, programs: int) -> dict:
    """Compile ``kernel`` for ``target``: registers, spills, stack and shared memory, the
    programs an SM holds and whether a launch of ``programs`` (its largest) has them all
    resident at once; or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, types, flags = _signature(kernel)
    names = fn.arg_names
    constants = {(names.index(k),): v for k, v in flags.items()}
    # as a launch specialises them: every tensor the backend passes starts 16-byte aligned
    aligned = {
        (names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t[0] == "*"
    }
    began = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, types, constants, aligned),
            target=GPUTarget("cuda", target.capability, 32),
            options={"num_warps": kernel.num_warps},
        )
    except Exception as error:  # a compile failure is a result to report, whatever its type
        return {"compiled": False, "error": " ".join(str(error).split())[:300]}
    report = _ptxas_report(compiled.asm["ptx"], target.capability)
    registers = int(_PTXAS.search(report)[1])
    stores, loads = map(int, _SPILLS.search(report).groups())
    stack = int(_STACK.search(report)[1])
    shared = compiled.metadata.shared
    per_sm = programs_per_sm(target, registers, shared, kernel.num_warps)
    resident = per_sm * target.sms
    return {
        "compiled": True,
        "seconds": round(time.perf_counter() - began, 2),
        "registers": registers,
        "spill_stores": stores,
        "spill_loads": loads,
        "stack": stack,
        "shared": shared,
        "shared_fits": shared <= target.shared_per_block,
        "programs_per_sm": per_sm,
        "co_resident": programs <= resident,
    }


def compile_isolated(kernel: Kernel, target: Target, programs: int) -> dict:
    """:func:`compile_one` in a forked child, so that a compiler that aborts the process (an
    LLVM assertion) is a result too: the child's last line on stderr, and its signal."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    with tempfile.TemporaryFile() as log:

        def child() -> None:
            faulthandler.disable()  # an abort's report goes to the log, not a stream of its own
            os.dup2(log.fileno(), 2)
            send.send(compile_one(kernel, target, programs))

        process = context.Process(target=child)
        process.start()
        process.join()
        if process.exitcode == 0 and receive.poll():
            return receive.recv()
        log.seek(0)
        lines = [line for line in log.read().decode(errors="replace").splitlines() if line]
    said = " ".join(lines[-1].split())[:300] if lines else ""
    return {"compiled": False, "error": f"the compiler died (exit {process.exitcode}): {said}"}


def grid(cells_: list[str], dtypes: list[str], hidden: list[int], batch: list[int], sms: int):
    """Each distinct kernel the rule chooses over the grid, with the (H, B, programs) that
    choose it."""
    chosen: dict[Kernel, list[tuple[int, int, int]]] = {}
    for cell, dtype, h, b in itertools.product(cells_, dtypes, hidden, batch):
        kernels, programs = kernels_for(cell, dtype, b, h, sms)
        for kernel in kernels:
            chosen.setdefault(kernel, []).append((h, b, programs))
    return chosen


def _sizes(sizes: list[list[int]]) -> str:
    """The (H, B, programs) that choose a kernel, as ``H 64: B 1-8; H 128: B 1``."""
    by_hidden: dict[int, list[int]] = {}
    for hidden, batch, _ in sizes:
        by_hidden.setdefault(hidden, []).append(batch)
    return "; ".join(
        f"H {h}: B {b[0]}" + (f"-{b[-1]}" if len(b) > 1 else "") for h, b in by_hidden.items()
    )


def table(rows: list[dict]) -> str:
    """Every compiled kernel, one row each, as Markdown."""
    header = ["target", "kernel", "cell", "dtype", "mode", "BLOCK B x H x K", "warps"]
    header += ["registers", "spilled bytes (stores / loads)", "shared KB", "programs / SM"]
    header += ["chosen for"]
    lines = []
    for r in rows:
        head = [r["target"], r["kernel"], r["cell"], r["dtype"], r["mode"]]
        head += [f"{r['block_b']} x {r['block_h']} x {r['block_k']}", str(r["num_warps"])]
        if r["compiled"]:
            spills = f"{r['spill_stores']} / {r['spill_loads']}"
            tail = [str(r["registers"]), spills, f"{r['shared'] / 1024:.0f}"]
            tail.append(str(r["programs_per_sm"]))
        else:
            tail = [f"fails: {r['error']}", "", "", ""]
        lines.append([*head, *tail, _sizes(r["sizes"])])
    return markdown_table(header, lines, 7)


def _size(text: str) -> int:
    """A hidden or batch size from the command line: a positive int."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_size.__name__ = "positive int"  # what argparse names in its one-line error


def _fail(message: str) -> int:
    print(f"triton_check: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstmkit.backends.triton_check")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    cells = sorted(backend.KINDS)
    parser.add_argument("--cells", nargs="+", default=cells, choices=cells)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--hidden", nargs="+", type=_size, default=list(HIDDEN))
    parser.add_argument("--batch", nargs="+", type=_size, default=list(BATCH))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gpu-compile"))
    args = parser.parse_args(argv)
    if not backend.AVAILABLE:
        return _fail("the triton package is not installed (pip install triton)")
    try:  # before minutes of compiling, not after
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _fail(f"cannot write into --out {str(args.out)!r}: {error.strerror or error}")
    if not os.access(args.out, os.W_OK):
        return _fail(f"cannot write into --out {str(args.out)!r}: permission denied")
    import triton

    rows = []
    for name in args.targets:
        target = TARGETS[name]
        chosen = grid(args.cells, args.dtypes, args.hidden, args.batch, target.sms)
        for kernel, sizes in chosen.items():
            result = compile_isolated(kernel, target, max(p for _, _, p in sizes))
            rows.append({"target": name, **asdict(kernel), "sizes": sizes, **result})
            print(json.dumps(rows[-1]), flush=True)
    settings = {
        "triton": triton.__version__,
        "targets": {n: asdict(TARGETS[n]) for n in args.targets},
    }
    info = {**machine.cpu_info(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    result = {"machine": info, "settings": settings, "rows": rows}
    (args.out / "compile.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "compile.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
