"""Loading the native backend under concurrency: threads making a fresh process's first calls
at once load and register the operators once (no warning, the same outputs as serial calls);
processes finding no library take turns on a lock file, so one compiles and the others load
its build; a killed builder's lock passes on, and a process that waits too long gives up with a
message naming the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from test_native import needs_native

from lstmkit.backends.native import build

FIRST_CALLS = textwrap.dedent(
    """
    import threading
    import torch, lstmkit
    torch.manual_seed(0)
    model = lstmkit.LSTM(8, 16, 2).eval()
    xs = [torch.randn(5, batch, 8) for batch in range(1, 9)]
    got = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def first_call(i):
        start.wait()
        with torch.no_grad():
            got[i] = model(xs[i])[0]

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with torch.no_grad():
        serial = [model(x)[0] for x in xs]
    print(lstmkit.native_available()[0], all(torch.equal(a, b) for a, b in zip(got, serial)))
    """
)


@needs_native
def test_first_calls_from_many_threads_load_once():
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no "Overriding a previously registered kernel" warning
    assert done.stdout.split() == ["True", "True"]


# build.load() of a source directory of one small file: the same lock, compile, rename and load
# as the operators' build, in seconds instead of a minute (every fresh clone's first process,
# .ci/run's included, compiles the operators themselves)
LOAD_PROBE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lstmkit.backends.native import build
    build.CSRC = Path(sys.argv[1])
    print("ready", flush=True)
    while not Path(sys.argv[2]).exists():  # every process imported: all start the load at once
        time.sleep(0.01)
    print(build.load())
    """
)


# the smallest library that build.load can import: a Python module named like the operators'
PROBE_MODULE = textwrap.dedent(
    """
    #include <Python.h>
    static PyModuleDef probe = {PyModuleDef_HEAD_INIT, "lstmkit_native", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit_lstmkit_native() { return PyModule_Create(&probe); }
    """
)


@needs_native
def test_processes_on_an_empty_cache_compile_once(tmp_path):
    """Three processes starting their load at once on an empty cache: one builds, two load its
    build (without the lock all three built, checked by removing it)."""
    sources = tmp_path / "csrc"
    sources.mkdir()
    (sources / "probe.cpp").write_text(PROBE_MODULE)
    env = {**os.environ, "LSTMKIT_CACHE_DIR": str(tmp_path / "cache")}
    go = tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_PROBE, str(sources), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        assert run.stdout.readline().strip() == "ready"
    go.touch()
    answers = [run.communicate(timeout=900)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert all(answer.startswith("(<module 'lstmkit_native'") for answer in answers), answers
    assert sum("built" in answer for answer in answers) == 1, answers
    assert sum("loaded" in answer for answer in answers) == 2, answers
    assert len(list((tmp_path / "cache").glob("native-*/lstmkit_native.so"))) == 1


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lstmkit.backends.native import build
    with build.exclusive(Path(sys.argv[1]), 10):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_held_lock_times_out_and_a_killed_holders_lock_passes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LSTMKIT_NATIVE", raising=False)
    lock = build.library_path().parent / build.LOCK
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="build lock"), build.exclusive(lock, 0.5):
            pass
        monkeypatch.setattr(build, "LOCK_TIMEOUT_S", 0.5)
        library, why = build.load()  # nothing built here, and the builder never finishes
        assert library is None
        assert str(lock) in why
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with build.exclusive(lock, 5):  # the kernel let go of the dead holder's lock
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
