"""Allocation: one format per layer minimising summed sensitivity under budgets (HAWQ-V3).

The integer program, with a binary ``x[l, f]`` per (layer, format)::

    minimise    sum_{l,f} s[l, f] x[l, f]
    subject to  sum_f x[l, f] = 1                      for every layer l
                sum_{l,f} c_k[l, f] x[l, f] <= B_k     for every budget k (bytes, bits, BOPs)
                x[l, f] = 0                            where format f is not allowed for l

Rules such as "the first and last layers keep 8 bits" are rows of ``allowed``, not special
cases. Solved exactly with HiGHS through :func:`scipy.optimize.milp` (scores rescaled to a
largest of 1 and no MIP gap, so tiny sensitivities ~1e-10 are told apart).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from compactnn._optional import require
from compactnn.errors import CompactnnError


def _check(scores: np.ndarray, costs: dict[str, np.ndarray], allowed: np.ndarray) -> None:
    if scores.ndim != 2 or allowed.shape != scores.shape:
        raise CompactnnError(
            f"allocate: scores {scores.shape} and allowed {allowed.shape} must both be (L, F)."
        )
    for name, c in costs.items():
        if c.shape != scores.shape:
            raise CompactnnError(f"allocate: cost {name!r} is {c.shape}, not {scores.shape}.")
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        raise CompactnnError(
            f"allocate: layers {empty.tolist()} allow no format; relax the rules "
            "(first_last_min_bits) or add a format that fits them (group size)."
        )


# Lines HiGHS writes with printf whatever its options say (``disp=False`` is the default),
# e.g. "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();".
SOLVER_NOISE = re.compile(rb"^Highs\w*::\w+\b.*$\n?", re.MULTILINE)


@contextlib.contextmanager
def solver_output_filtered() -> Iterator[None]:
    """Run the block with the process's stdout and stderr (file descriptors 1 and 2, where a
    C library writes) captured; afterwards pass on everything but HiGHS's debug lines
    (``SOLVER_NOISE``), so a real message from the solver or from another thread still shows.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved: dict[int, tuple[int, Any]] = {}
    try:
        for fd in (1, 2):
            try:
                saved[fd] = (os.dup(fd), tempfile.TemporaryFile())
            except OSError:  # no such descriptor (e.g. a GUI app): nothing to capture
                continue
            os.dup2(saved[fd][1].fileno(), fd)
        yield
    finally:
        _flush_c_stdio()
        for fd, (original, capture) in saved.items():
            os.dup2(original, fd)
            os.close(original)
            capture.seek(0)
            kept = SOLVER_NOISE.sub(b"", capture.read())
            capture.close()
            while kept:
                kept = kept[os.write(fd, kept) :]


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers (printf output not yet written) into the capture."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach: Python's streams only
        pass


def min_cost(cost: np.ndarray, allowed: np.ndarray) -> float:
    """The smallest total of ``cost`` any allowed assignment reaches (each layer's cheapest)."""
    return float(np.where(allowed, cost, np.inf).min(axis=1).sum())


def allocate(
    scores: np.ndarray,
    costs: dict[str, np.ndarray],
    budgets: dict[str, float],
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The format index of each layer minimising ``scores`` under ``budgets``.

    Args:
        scores: ``(L, F)`` sensitivity of layer ``l`` at format ``f`` (lower is better).
        costs: name -> ``(L, F)`` cost of each choice (``"bytes"``, ``"bops"``, ...).
        budgets: name -> the largest total allowed for that cost (names in ``costs``).
        allowed: ``(L, F)`` bool, False forbids a choice; None allows all.

    Returns:
        ``(L,)`` int array: the chosen format of each layer.

    Raises:
        CompactnnError: a budget is below the cheapest allowed assignment (the message gives
            that minimum), or a layer allows no format.

    Example:
        >>> s = np.array([[4.0, 0.0], [1.0, 0.0]]); c = np.array([[1.0, 2.0], [1.0, 2.0]])
        >>> allocate(s, {"bytes": c}, {"bytes": 3.0}).tolist()
        [1, 0]
    """
    return allocate_with_groups(scores, costs, budgets, allowed)[0]


def allocate_with_groups(
    scores: np.ndarray,
    costs: dict[str, np.ndarray],
    budgets: dict[str, float],
    allowed: np.ndarray | None = None,
    groups: list[tuple[np.ndarray, dict[str, np.ndarray]]] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """:func:`allocate` with extra exclusive choices: one option per group.

    Group ``g`` adds binaries ``y[g, k]`` with ``sum_k y[g, k] = 1``, objective
    ``sum_k s_g[k] y[g, k]`` and ``sum_k c_g[k] y[g, k]`` in every budget row (a cost the
    group does not list counts 0; costs may be negative, a saving).

    Args:
        groups: ``(scores (K,), {cost name: (K,)})`` per group.

    Returns:
        The ``(L,)`` format indices and the chosen option of each group.

    Example:
        >>> s = np.array([[1.0, 0.0]]); c = np.array([[1.0, 2.0]])
        >>> g = (np.array([0.0, 0.5]), {"t": np.array([0.0, -1.5])})
        >>> choice, picks = allocate_with_groups(s, {"t": c}, {"t": 1.0}, groups=[g])
        >>> choice.tolist(), picks
        ([1], [1])
    """
    optimize = require("scipy.optimize", "demo")  # HiGHS MILP
    Bounds, LinearConstraint, milp = optimize.Bounds, optimize.LinearConstraint, optimize.milp

    scores = np.asarray(scores, dtype=np.float64)
    allowed = np.ones(scores.shape, bool) if allowed is None else np.asarray(allowed, bool)
    costs = {k: np.asarray(v, dtype=np.float64) for k, v in costs.items()}
    groups = [
        (np.asarray(s, np.float64), {k: np.asarray(v, np.float64) for k, v in c.items()})
        for s, c in (groups or [])
    ]
    _check(scores, costs, allowed)
    n_layers, n_formats = scores.shape
    sizes = [len(s) for s, _ in groups]
    n_vars = n_layers * n_formats + sum(sizes)
    for name, budget in budgets.items():
        if name not in costs:
            raise CompactnnError(f"allocate: budget {name!r} has no cost table ({list(costs)}).")
        floor = min_cost(costs[name], allowed)
        floor += sum(float(c.get(name, np.zeros(1)).min()) for _, c in groups)
        if budget < floor - 1e-9 * max(1.0, abs(floor)):
            raise CompactnnError(
                f"budget {name}={budget:.6g} is below the smallest reachable {floor:.6g} "
                "(every layer at its cheapest allowed format): raise the budget or add a "
                "cheaper format."
            )
    one_each = np.zeros((n_layers + len(groups), n_vars))  # one format per layer / group
    one_each[:n_layers, : n_layers * n_formats] = np.kron(np.eye(n_layers), np.ones(n_formats))
    start = n_layers * n_formats
    for g, k in enumerate(sizes):
        one_each[n_layers + g, start : start + k] = 1
        start += k
    constraints = [LinearConstraint(one_each, 1, 1)]
    for name, budget in budgets.items():
        parts = [costs[name].reshape(-1)]
        parts += [c.get(name, np.zeros(len(s))) for s, c in groups]
        row = np.concatenate(parts).reshape(1, -1)
        scale = max(float(np.abs(row).max()), 1.0)  # well-conditioned rows for HiGHS
        constraints.append(LinearConstraint(row / scale, -np.inf, budget / scale + 1e-9))
    # shift scores so that each row's best is 0: same argmin, better numerics
    c = (scores - np.where(allowed, scores, np.inf).min(axis=1, keepdims=True)).reshape(-1)
    c = np.where(allowed.reshape(-1), c, 0.0)
    c = np.concatenate([c, *(s - s.min() for s, _ in groups)])
    top = float(np.abs(c).max()) if c.size else 0.0
    if top > 0:  # HiGHS's absolute gap (1e-6) would accept any solution at scores ~1e-10
        c = c / top
    upper = np.concatenate([allowed.reshape(-1).astype(float), np.ones(sum(sizes))])
    with solver_output_filtered():  # HiGHS prints debug lines past sys.stdout
        result = milp(
            c,
            constraints=constraints,
            integrality=np.ones(c.size),
            bounds=Bounds(0, upper),
            options={"mip_rel_gap": 0.0},  # exact: the default 1e-4 gap stops early
        )
    if result.x is None:
        raise CompactnnError(f"allocate: no assignment meets budgets {budgets} ({result.message}).")
    x = np.round(result.x)
    choice = x[: n_layers * n_formats].reshape(n_layers, n_formats).argmax(axis=1)
    picks, start = [], n_layers * n_formats
    for k in sizes:
        picks.append(int(x[start : start + k].argmax()))
        start += k
    return choice, picks


def assignment_total(table: np.ndarray, choice: np.ndarray) -> float:
    """Sum of ``table[l, choice[l]]`` over layers."""
    return float(table[np.arange(len(choice)), choice].sum())


def frontier(
    scores: np.ndarray,
    cost: np.ndarray,
    allowed: np.ndarray,
    points: int,
    extra: dict[str, tuple[np.ndarray, float]] | None = None,
) -> list[tuple[float, float, np.ndarray]]:
    """``(cost, predicted score, choice)`` at ``points`` budgets from cheapest to largest.

    ``extra`` holds other budgets (name -> (cost table, limit)) held fixed along the sweep.
    Duplicate choices are dropped.
    """
    lo = min_cost(cost, allowed)
    hi = -min_cost(-cost, allowed)
    out: list[tuple[float, float, np.ndarray]] = []
    seen: set[tuple[int, ...]] = set()
    costs = {"sweep": cost, **{k: v[0] for k, v in (extra or {}).items()}}
    for budget in np.linspace(lo, hi, points):
        budgets = {"sweep": float(budget), **{k: v[1] for k, v in (extra or {}).items()}}
        try:
            choice = allocate(scores, costs, budgets, allowed)
        except CompactnnError:
            continue  # an extra budget makes the low end infeasible
        if tuple(choice) not in seen:
            seen.add(tuple(choice))
            out.append((assignment_total(cost, choice), assignment_total(scores, choice), choice))
    return out
