"""Resident memory a running model adds, measured in a fresh Python process.

A model's size on disk says little about what it costs once it runs: a kernel layer may hold
a dense copy of its weights, a loader may keep float weights beside the packed codes, and
the first forward pass allocates workspaces. :func:`resident_memory` starts a fresh
interpreter, imports what the builder needs, runs an optional ``setup`` (whatever is not the
model: reference data, an input batch, a float skeleton), reads the resident set size (RSS),
builds the model, runs one forward pass, returns freed heap pages to the system (``malloc_trim``, so
memory the allocator merely kept from loading is not counted) and reads the RSS again. The
difference is the memory the running model adds. The high-water mark is reset just before
the first reading, so ``peak_added`` is the most the build and the forward pass held at once
(a loader's transient copy), not the imports' or the setup's. Libraries imported lazily by
the builder (``transformers``, ``onnxruntime``) would count too: name them in ``preload``.

The builder is named by ``"module:function"`` (a function importable in the child process)
and called with JSON arguments (after ``setup``'s result, when there is one); it returns a
zero-argument callable that runs one forward pass. Linux only (``/proc/self/status``).

Example:
    >>> mem = resident_memory("mypkg.models:build_w4", ["out/w4"])  # doctest: +SKIP
    >>> mem.added_mib                                                   # doctest: +SKIP
    31.4
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError
from compactnn.omp_policy import path_flags

MIB = 1024 * 1024
_MARK = "COMPACTNN_RSS "
_LIVE: set[subprocess.Popen] = set()  # children running now (see kill_children)
_LIVE_LOCK = threading.Lock()
# Run in the child: imports, setup, trim, peak reset, RSS, build + one forward, trim, RSS and
# peak. Prints one JSON line.
_CHILD = r"""
import ctypes, gc, importlib, json, sys
import torch

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon")}
    return kib["VmRSS"], kib["VmHWM"], kib["RssAnon"]

def reset_peak():
    # Linux 4.0+: VmHWM starts again from the current RSS, so the peak read after the build
    # is the build's and forward pass's, not the imports' or setup's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass

def named(spec):
    mod_name, fn_name = spec.split(":")
    return getattr(importlib.import_module(mod_name), fn_name)

spec, args, threads, preload, setup = json.loads(sys.argv[1])
torch.set_num_threads(threads)
for name in preload:  # libraries every contender shares are not the model's memory
    importlib.import_module(name)
builder = named(spec)
# what the builder needs that is not the model (data, a skeleton): held before the reading
context = [] if setup is None else [named(setup[0])(*setup[1])]
trim()
peak_reset = reset_peak()
before, _, anon_before = rss()
forward = builder(*context, *args)
with torch.no_grad():
    forward()
trim()
after, peak, anon_after = rss()
print("COMPACTNN_RSS " + json.dumps({"before": before, "after": after, "peak": peak,
      "anon_before": anon_before, "anon_after": anon_after, "peak_reset": peak_reset}))
"""


@dataclasses.dataclass(frozen=True)
class ResidentMemory:
    """RSS of a fresh process after its imports, and after building the model and one
    forward pass (bytes); ``peak`` is the process's high-water mark (VmHWM) at the end: since
    the reading ``before`` where ``peak_reset`` (the child reset it there, Linux 4.0+), else
    since the process started; ``anon_*`` the anonymous part (RssAnon: heap, tensors; not the
    pages of shared libraries that the first forward pass touches, which VmRSS also counts)."""

    before: int
    after: int
    peak: int
    anon_before: int = 0
    anon_after: int = 0
    peak_reset: bool = False

    @property
    def added(self) -> int:
        """Bytes the built model adds to the process after one forward pass."""
        return self.after - self.before

    @property
    def anon_added(self) -> int:
        """Anonymous bytes (heap, tensors) the built model adds: the model's own memory."""
        return self.anon_after - self.anon_before

    @property
    def peak_added(self) -> int:
        """The most the build and forward pass held at once above ``before`` (a loader's
        transient dense copy shows here, not in :attr:`added`); without ``peak_reset`` an
        upper bound: the imports or ``setup`` may have set the high-water mark."""
        return self.peak - self.before

    @property
    def added_mib(self) -> float:
        """:attr:`added` in MiB."""
        return self.added / MIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-able numbers (bytes), with ``added``, ``anon_added`` and ``peak_added``."""
        added = {"added": self.added, "anon_added": self.anon_added, "peak_added": self.peak_added}
        return {**dataclasses.asdict(self), **added}


# compactnn's own modules for a ``preload``: ``import compactnn`` imports its names on first use
# (PEP 562), so a builder's first ``compactnn.load`` would import every method file after the
# first reading and count them as the model's memory; these are what that first use imports
LIBRARY = (
    "compactnn.methods",
    "compactnn.api",
    "compactnn.deployment.ship",
    "compactnn.measure",
    "compactnn.training",
    "compactnn.mixed_precision",
)


def resident_memory(
    builder: str,
    args: list[Any] | None = None,
    *,
    preload: tuple[str, ...] = (),
    threads: int = 1,
    timeout: float = 600.0,
    setup: str | None = None,
    setup_args: list[Any] | None = None,
) -> ResidentMemory:
    """Resident memory that a model built by ``builder`` adds once it has run one forward.

    Args:
        builder: ``"module:function"``; ``function(*args)`` builds the model (e.g. loads an
            artifact) and returns a zero-argument callable running one forward pass.
        args: JSON-serialisable arguments for the builder (paths, names, numbers).
        preload: modules imported before the first reading (e.g. ``"transformers"``,
            ``"onnxruntime"``): import them all for every contender compared, or a
            library's own memory (hundreds of MiB for ``transformers``) counts as the model's.
        threads: ``torch.set_num_threads`` in the child (workspaces grow with threads).
        timeout: seconds before the child is killed.
        setup: ``"module:function"`` run before the first reading; ``function(*setup_args)``
            returns what the builder needs that is not the model (an input batch, the float
            skeleton an artifact is loaded into), passed as the builder's first argument.
            What it holds counts in ``before``, never as the model's.
        setup_args: JSON-serialisable arguments for ``setup``.

    Returns:
        A :class:`ResidentMemory`; ``added`` is the measurement.

    Raises:
        CompactnnError: not on Linux, a malformed ``builder`` or ``setup``, or the child
            failed (its error output is quoted).
    """
    if not Path("/proc/self/status").exists():
        raise CompactnnError("resident_memory needs Linux (/proc/self/status); not available")
    for label, spec in (("builder", builder), ("setup", setup)):
        if spec is not None and (spec.count(":") != 1 or not all(spec.split(":"))):
            raise CompactnnError(
                f"resident_memory {label}={spec!r} must be 'module:function', e.g. "
                "'compactnn.bench.transformers:rss_float'"
            )
    prepare = None if setup is None else [setup, list(setup_args or [])]
    payload = json.dumps([builder, list(args or []), int(threads), list(preload), prepare])
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    flags = path_flags(sys.path)  # no `numpy.py` of the current folder imported by the child
    proc = _run_child([sys.executable, *flags, "-c", _CHILD, payload], env, timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise CompactnnError(
            f"resident_memory: the child process building {builder!r} failed "
            f"(exit {proc.returncode}): " + " | ".join(tail)
        )
    return ResidentMemory(**json.loads(line[len(_MARK) :]))


def _run_child(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` that :func:`kill_children` can stop from another thread."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def kill_children() -> None:
    """Kill every :func:`resident_memory` child still running (e.g. the caller was stopped
    by Ctrl-C or SIGTERM while worker threads waited on them: their measurements then fail
    at once instead of the process waiting for them to finish)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        proc.kill()
