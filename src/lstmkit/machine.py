"""Which machine a result comes from: the CPU as ``lscpu`` names it and the software around it.
Every benchmark result and every training run records it (machines of one kind come with
different CPUs, on which the same code runs at different speeds)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import torch


def cpu_info() -> dict[str, object]:
    """The CPU as ``lscpu`` names it, from ``/proc/cpuinfo``: ``model name``, ``cpu family``,
    ``model`` and the vector-instruction ``flags`` (sse, avx, fma, amx, ...; all of them go to
    ``flags_all``). Machines of one kind come with different CPUs, on which the same code runs
    at different speeds: every result records which it came from. ``platform.processor()``
    where there is no ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu": platform.processor() or "unknown"}
    flags = fields.get("flags", "").split()
    vector = [f for f in flags if f.startswith(("sse", "ssse", "avx", "fma", "amx", "f16c"))]
    return {
        "cpu": fields.get("model name", "unknown"),
        "cpu_family": fields.get("cpu family"),
        "cpu_model": fields.get("model"),
        "cpu_vector_flags": " ".join(vector),
        "cpu_flags_all": " ".join(flags),
    }


def machine_info(threads: int) -> dict[str, object]:
    """The machine and software the numbers come from. Call it before the timing: the load
    average it records is the best hint of other work on the machine spoiling the numbers."""
    return {
        **cpu_info(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
