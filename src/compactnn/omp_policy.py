"""OpenMP's wait policy for the command-line entry points, and the interpreter flags of a
child Python. Standard library only: the ``compactnn`` command imports this module before
torch, so the policy it sets is the one libgomp reads when torch loads it.

``OMP_WAIT_POLICY=PASSIVE`` (and, below the CPU count, a bounded spin: :data:`PASSIVE_SPINCOUNT`)
is set in the process itself while OpenMP is not loaded yet; an entry point that has loaded
torch already (``python -m compactnn.bench``) re-executes itself once with it.
"""

from __future__ import annotations

import os
import sys

REEXEC_MARK = "COMPACTNN_OMP_REEXEC"


def passive_policy_action(environ: dict[str, str], openmp_loaded: bool) -> str:
    """What an entry point does about ``OMP_WAIT_POLICY`` before it times anything.

    ``"keep"``: the user chose a policy (a bare PASSIVE too: no spin is added to it) or a
    re-executed process already has it; ``"set"``: set :func:`passive_policy_env` here
    (OpenMP not loaded yet, it will read it); ``"reexec"``: OpenMP was loaded (``import
    torch`` loads libgomp, which reads the variables once), so only a fresh process gets them.

    Example:
        >>> passive_policy_action({}, openmp_loaded=True)
        'reexec'
    """
    if environ.get(REEXEC_MARK) or "OMP_WAIT_POLICY" in environ:
        return "keep"
    return "reexec" if openmp_loaded else "set"


def passive_policy_env(environ: dict[str, str], load: float | None, cpus: int | None) -> dict:
    """What an entry point sets: ``OMP_WAIT_POLICY=PASSIVE``, plus ``GOMP_SPINCOUNT`` =
    :data:`PASSIVE_SPINCOUNT` where :func:`spin_helps` and ``environ`` has no spin count.

    Example:
        >>> passive_policy_env({}, load=8.0, cpus=2)
        {'OMP_WAIT_POLICY': 'PASSIVE'}
    """
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "GOMP_SPINCOUNT" not in environ and spin_helps(load, cpus):
        env["GOMP_SPINCOUNT"] = PASSIVE_SPINCOUNT
    return env


def ensure_passive_policy(module: str, argv: list[str], openmp_loaded: bool) -> None:
    """Give this process ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy, with
    ``GOMP_SPINCOUNT=20000`` (about 0.5 ms) only on a machine loaded below its CPU count
    (:func:`passive_policy_env`; :data:`PASSIVE_SPINCOUNT` says why).

    For command-line entry points only (``compactnn``, ``python -m compactnn.bench``): when
    OpenMP is already loaded, re-executes ``python -m module argv`` with the policy set
    (this call then does not return). A library never calls it.

    ``python -m`` puts the current folder first on ``sys.path``: from the ``compactnn``
    script (whose ``sys.path[0]`` is its own folder) that would import a ``tqdm.py`` or
    ``numpy.py`` lying in the user's folder, code the user never chose to run (found by a
    security review: a model folder's ``tqdm.py`` ran). The re-execution then adds ``-P``
    (Python 3.11: no unsafe path first), unless this process already had the current folder
    first (the user ran ``python -m`` there, and its imports came from there already).
    """
    action = passive_policy_action(dict(os.environ), openmp_loaded)
    if action == "keep":
        return
    os.environ.update(passive_policy_env(dict(os.environ), load_average(), os.cpu_count()))
    if action == "reexec":
        os.environ[REEXEC_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *path_flags(sys.path), "-m", module, *argv])


def path_flags(path: list[str]) -> list[str]:
    """Interpreter flags for a child Python run with ``-m`` or ``-c``: ``["-P"]`` (the
    current folder not put first on its ``sys.path``) unless ``path`` (this process's
    ``sys.path``) already starts with the current folder (see :func:`ensure_passive_policy`).

    Example:
        >>> path_flags(["/venv/bin", "/usr/lib/python3.11"]), path_flags([os.getcwd()])
        (['-P'], [])
    """
    first = path[0] if path else None
    here = first is not None and os.path.abspath(first or os.curdir) == os.path.abspath(os.curdir)
    return [] if here else ["-P"]


def omp_wait_policy() -> str:
    """The process's ``OMP_WAIT_POLICY`` in upper case (``""`` when not set)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper()


def spin_count() -> str:
    """The process's ``GOMP_SPINCOUNT`` (``""`` when not set: libgomp's own default)."""
    return os.environ.get("GOMP_SPINCOUNT", "").strip()


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``: ``taskset`` and cpusets
    shrink it below ``os.cpu_count()``; the CPU count where it is unknown)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


# With OMP_WAIT_POLICY=PASSIVE alone (= GOMP_SPINCOUNT=0), libgomp's idle threads sleep at once
# and each of a small model's many parallel regions first wakes them. On an idle machine (load
# 0.6-1.1, 2 CPUs, Zen 4) mnist-cnn at batch 16 then ran slower on 2 threads than on 1 (fp32
# eager 3.7-4.1 against 2.1-2.2 ms; deployed w4a8 0.99 ms, 0.50 ms with 20,000 spins); idle CPU
# after one region: 20,000 spins 0.58 ms, 3,000 0.15 ms, libgomp's default 8.2 ms.
# On a busy machine the spin inflates timings instead: spinning threads use up the process's
# share of the oversubscribed CPUs. Load 6.3-9.4 on 2 CPUs, 2 threads, median ms of 60 calls,
# three fresh processes each, PASSIVE with GOMP_SPINCOUNT 0 / 1,000 / 3,000 / 20,000:
#   8x8 CNN fp32 eager, batch 32:     0.37-0.40 / 0.42-0.88 / 1.7-3.3 / 17-46
#   mnist-cnn fp32 eager, batch 16:   5.9-6.0 / 4.1-8.6 / 7.2-20 / 68-105
#   mnist-cnn w4a8 deployed, batch 16: 0.85-1.07 / 0.51-1.53 / 0.41-2.8 / 0.50, 6.5, 30
# So the spin is added only below the CPU count (:func:`spin_helps`): under load no spin cost a
# deployed model up to 2x, the spin cost eager float 10-100x (speedups claimed 10x too high).
PASSIVE_SPINCOUNT = "20000"


def spin_helps(load: float | None, cpus: int | None) -> bool:
    """Whether :data:`PASSIVE_SPINCOUNT` helps: the 1-minute ``load`` is below ``cpus``.

    Example:
        >>> spin_helps(0.8, 2), spin_helps(2.0, 2), spin_helps(None, 2)
        (True, False, False)
    """
    return load is not None and cpus is not None and load < cpus


def openmp_runtime_loaded() -> bool:
    """Whether this process has loaded an OpenMP runtime already (libgomp or Intel's libiomp,
    as ``import torch`` does), read from ``/proc/self/maps``; where that cannot be read,
    whether torch is imported.

    Example:
        >>> isinstance(openmp_runtime_loaded(), bool)
        True
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libgomp" in line or "libiomp" in line for line in maps)
    except OSError:
        return "torch" in sys.modules
