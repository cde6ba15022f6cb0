"""Where and how numbers were measured: versions, the CPU (model and AMX), threads, date,
and whether the threads oversubscribe the CPUs the process may use.

Every table of speeds names the CPU and whether it has AMX (shared/BENCHMARKING.md): int8
and bf16 kernels differ several-fold between CPUs with and without it.

Example:
    >>> env = environment(2, runs=10)
    >>> env["threads"], env["runs"]
    (2, 10)
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.measure.timing import spin_count
from compactnn.omp_policy import available_cpus


def cpu_description(cpuinfo: str | None = None) -> str:
    """``"AMD EPYC 9B14, no AMX"``: the CPU model and whether it has AMX tiles.

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None; other systems fall back to
    ``platform.processor()`` and say the AMX check was not possible).
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    fields = dict(
        line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line and line.strip()
    )
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    if "flags" not in fields:
        return f"{model}, AMX unknown"
    return f"{model}, {'AMX' if 'amx_tile' in fields['flags'].split() else 'no AMX'}"


def environment(threads: int, **extra: Any) -> dict[str, Any]:
    """Versions, machine (OS, architecture, CPU model, AMX, core count), ``threads``, the
    UTC date, and any ``extra`` fields (e.g. ``runs=10``); ``oversubscribed`` (a line to
    print beside the thread count) when the threads exceed the CPUs the process may use."""
    machine = f"{platform.system()} {platform.machine()}, {cpu_description()}"
    over = oversubscribed_note(threads)
    return {
        "compactnn": compactnn.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{machine}, {os.cpu_count()} CPUs",
        "threads": threads,
        **({"oversubscribed": over} if over else {}),
        **extra,
        **({"gomp_spincount": spin_count()} if spin_count() else {}),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def oversubscribed_note(threads: int | None, cpus: int | None = None) -> str | None:
    """One line saying the timings are oversubscribed when ``threads`` exceed the ``cpus``
    the process may use (:func:`available_cpus` when None); None otherwise. A command that
    prints the thread count of a latency table prints this line beside it (64 threads on 2
    CPUs doubled eager float, 12.3 -> 24.8 ms, and every speedup was computed under it).

    Example:
        >>> oversubscribed_note(64, cpus=2)[:62]
        'oversubscribed: 64 threads on the 2 CPUs this process may use '
        >>> oversubscribed_note(2, cpus=2) is None
        True
    """
    cpus = available_cpus() if cpus is None else cpus
    if threads is None or threads <= cpus:
        return None
    return (
        f"oversubscribed: {threads} threads on the {cpus} CPUs this process may use "
        "(os.sched_getaffinity): the threads wait for each other's cores, so these latencies "
        f"and the speedups computed under them are not the model's; time with --threads {cpus} "
        "or fewer."
    )
