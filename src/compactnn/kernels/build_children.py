"""The processes a C++ extension build starts: how many, which ``ninja``, and their cleanup.

torch's ``cpp_extension`` runs ``ninja`` with ``subprocess.run``, which on Ctrl-C or SIGTERM
(the CLI's ``Terminated``) kills ``ninja`` only. ninja starts every compiler in its own
process group, so the ``c++`` / ``cc1plus`` processes outlive it, re-parented to PID 1, and
keep compiling for minutes (a one-core board loses its core). :func:`reaped_descendants`
makes this process a child subreaper around the build (Linux ``prctl``), so such orphans
re-parent to it, and when the build raises it stops (SIGTERM, then SIGKILL) and reaps every
process the build left; elsewhere it does nothing. A SIGKILL of this process itself cannot
be handled: its compilers finish on their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

from compactnn.omp_policy import available_cpus

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
STOP_WAIT_S = 2.0  # how long stopped processes get after SIGTERM before SIGKILL


@contextlib.contextmanager
def max_jobs():
    """``MAX_JOBS`` = the usable CPUs while building, unless the user set it (ninja's own
    default ran 3 compilers on 2 cores)."""
    if "MAX_JOBS" in os.environ:
        yield
        return
    os.environ["MAX_JOBS"] = str(available_cpus())
    try:
        yield
    finally:
        os.environ.pop("MAX_JOBS", None)


@contextlib.contextmanager
def pinned_ninja():
    """This Python environment's ``ninja`` (the pip package torch installs) first on
    ``PATH`` while building, whatever the caller's ``PATH``: ninja versions keep
    incompatible logs, and a build finished by another version recompiles every file."""
    try:
        import ninja

        bin_dir = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        bin_dir = ""
    if not bin_dir or not os.access(os.path.join(bin_dir, "ninja"), os.X_OK):
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = bin_dir + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _prctl():
    """libc's ``prctl`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4  # variadic in C: say the widths
    prctl.restype = ctypes.c_int
    return prctl


def _processes() -> dict[int, tuple[int, str]]:
    """Every visible process: pid -> (parent pid, state letter), from ``/proc/*/stat``."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat.rpartition(")")[2].split()  # the name may hold spaces and ")"
        if len(fields) >= 2 and fields[1].lstrip("-").isdigit():
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _children() -> set[int]:
    me = os.getpid()
    return {pid for pid, (ppid, _) in _processes().items() if ppid == me}


def descendants(keep: frozenset[int] = frozenset()) -> dict[int, str]:
    """This process's descendants (pid -> state), leaving out the children in ``keep`` and
    everything under them."""
    table = _processes()
    below: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        below.setdefault(ppid, []).append(pid)
    found, todo = {}, [p for p in below.get(os.getpid(), []) if p not in keep]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid][1]
            todo.extend(below.get(pid, []))
    return found


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is an exited child of ours (never ``-1``: other
    children's statuses belong to their ``Popen``)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_descendants(keep: frozenset[int] = frozenset(), wait_s: float = STOP_WAIT_S) -> int:
    """Stop every descendant except ``keep``'s subtrees: SIGTERM, SIGKILL after ``wait_s``,
    reaping those re-parented to this process, until none is left (or ``2 * wait_s`` more
    passed). Returns how many processes were signalled."""
    start, signalled = time.monotonic(), set()
    while True:
        found = descendants(keep)
        for pid, state in found.items():
            if state == "Z":
                _reap(pid)
        live = [pid for pid, state in found.items() if state != "Z"]
        elapsed = time.monotonic() - start
        if not live or elapsed > 3 * wait_s:
            return len(signalled)
        sig = signal.SIGKILL if elapsed > wait_s else signal.SIGTERM
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            signalled.add(pid)
        time.sleep(0.02)


@contextlib.contextmanager
def reaped_descendants():
    """Around a build: this process is a child subreaper (the previous setting restored
    after); if the body raises (``KeyboardInterrupt`` too), the processes it started and
    left behind are stopped and reaped before the exception goes on. Not Linux: no-op."""
    prctl = _prctl()
    previous = ctypes.c_int(0)
    if prctl is None or prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(previous), 0, 0, 0) != 0:
        yield
        return
    keep = frozenset(_children())  # children from before the build are not its leftovers
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    except BaseException:
        stop_descendants(keep)
        raise
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, previous.value, 0, 0, 0)
