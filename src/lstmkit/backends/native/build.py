"""Building and loading the native backend's C++ operators, once per machine.

The shared library is compiled by ``torch.utils.cpp_extension`` (ninja, the system's C++
compiler, :data:`FLAGS`) into a cache directory keyed by everything the binary
depends on: the C++ sources, torch's version, Python's, and the CPU's model and instruction-set
flags (``-march=native`` code must never run on another CPU). The first process on a machine
builds it (``python -m lstmkit.backends.native``, which ``make`` runs after installing); every
later one only imports the ``.so``: a Python module (``entry.cpp``) whose loading registers the
operators. Processes that find no library at once take turns on a lock
file beside it: one compiles while the others wait, then load what it built. The lock is the
kernel's (``flock``), released when its holder exits however it exits, so a killed builder's
lock passes to the next process; a process that waits longer than :data:`LOCK_TIMEOUT_S` gives
up with a message naming the lock.

The cache is ``$LSTMKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lstmkit`` or
``~/.cache/lstmkit``. ``LSTMKIT_NATIVE=0`` in the environment makes the backend unavailable
without trying to build or load it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"  # the C++ sources (*.cpp) and their headers (*.h)
NAME = "lstmkit_native"
# -fno-trapping-math lets GCC vectorise selects; -fopenmp makes at::parallel_for (an inline
# template compiled here) run on torch's OpenMP threads: without it the pragma is dropped and
# every parallel_for runs on one thread
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp")
LOCK = "build.lock"  # beside the library: whoever holds it is building that library
LOCK_TIMEOUT_S = 900.0  # a build takes 30-60 s on two cores; ten times that is a stuck one


def _cpu() -> str:
    """The CPU's model name and instruction-set flags, as the kernel reports them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return " ".join(fields.get(k, "") for k in ("vendor_id", "model name", "flags"))


def cache_dir() -> Path:
    """Where built libraries are kept, one subdirectory per key."""
    if os.environ.get("LSTMKIT_CACHE_DIR"):
        return Path(os.environ["LSTMKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lstmkit"


def library_path() -> Path:
    """The ``.so`` for this source, torch, Python and CPU."""
    key = hashlib.sha256()
    files = sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")])
    parts = [f.name.encode() + f.read_bytes() for f in files]
    for part in (*parts, torch.__version__, sys.version, _cpu(), " ".join(FLAGS)):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / f"native-{key.hexdigest()[:16]}" / f"{NAME}.so"


def _compile(target: Path) -> ModuleType:
    """Build the library, import it and move it to ``target`` in one rename, so that a
    concurrent process either finds no library or a whole one."""
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as build:
        module = cpp_extension.load(
            name=NAME,
            sources=[str(f) for f in sorted(CSRC.glob("*.cpp"))],
            extra_cflags=list(FLAGS),
            extra_ldflags=["-fopenmp"],  # the libgomp.so.1 that torch has already loaded
            build_directory=build,
            is_python_module=True,
            verbose=False,
        )
        os.replace(Path(build) / f"{NAME}.so", target)
    return module


@contextlib.contextmanager
def exclusive(path: Path, timeout: float) -> Iterator[None]:
    """Hold the lock file ``path`` (created if absent) for the block, waiting up to ``timeout``
    seconds for another process to let go of it (TimeoutError past that)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another process has held the build lock {path} for over {timeout:.0f}"
                        " s; if no build is running, delete the lock file"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(target: Path) -> ModuleType:
    """The library as the Python module :data:`NAME`; loading it registers its operators."""
    spec = importlib.util.spec_from_file_location(NAME, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> tuple[ModuleType | None, str]:
    """Load the library, building it first if no cached one fits this machine (one process at a
    time: see the top of the module): its operators go into ``torch.ops.lstmkit``. Returns
    ``(the library's Python module, what happened)`` or ``(None, why not)``; never raises."""
    if os.environ.get("LSTMKIT_NATIVE", "1") == "0":
        return None, "LSTMKIT_NATIVE=0 is set in the environment"
    try:
        target = library_path()
        start = time.perf_counter()
        if not target.exists():
            with exclusive(target.parent / LOCK, LOCK_TIMEOUT_S):
                if not target.exists():  # else another process built it while this one waited
                    module = _compile(target)  # imported from where it was built
                    return module, f"built {target} in {time.perf_counter() - start:.1f} s"
        module = _import(target)
        return module, f"loaded {target} in {1e3 * (time.perf_counter() - start):.0f} ms"
    except Exception as error:  # a missing compiler, a build error, an unwritable cache
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line]  # the compiler's first
        detail = (errors or lines or [type(error).__name__])[0]
        return None, f"the C++ extension could not be built or loaded: {detail}"
