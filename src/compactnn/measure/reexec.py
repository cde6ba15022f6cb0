"""Command-line entry points and OpenMP's wait policy: the one re-execution that gives a
process ``OMP_WAIT_POLICY=PASSIVE`` (libgomp reads it once, when torch loads it), and the
interpreter flags of a child Python (no current folder first on its ``sys.path``).

Why passive, and when a spin is added: :data:`compactnn.measure.timing.PASSIVE_SPINCOUNT`.
"""

from __future__ import annotations

import os
import sys

from compactnn.measure.timing import PASSIVE_SPINCOUNT, load_average, spin_helps

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
