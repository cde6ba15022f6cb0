"""Accuracy-aware mode: the cheapest allocation whose measured drop stays within budget.

With ``q0`` the float model's quality and ``q(B)`` the quality of the allocation at budget
``B``, find the smallest ``B`` with ``q0 - q(B) <= max_drop`` using at most ``max_evals`` full
evaluations:

1. bisection on ``B`` between the cheapest and the largest assignment (an allocation already
   evaluated is not evaluated again);
2. local repair from the most expensive failing allocation below the best passing one: move
   the layer whose next larger format removes the most sensitivity per extra cost up one
   format, evaluate, repeat until it passes or evaluations run out.

Evaluations are kept back for repair only once a trial below the best passing one has failed:
repair has nothing to start from before that, so while every trial passes, bisection may spend
the budget, all but its last evaluation: that one goes to the cheapest allowed assignment
(stage ``"cheapest"``), which halving the budget interval never reaches. A model that passes
at every budget then gets the cheapest assignment; if that one fails, the best bisection
result stands.

Every configuration evaluated is returned, passing or not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from compactnn.errors import CompactnnError


@dataclasses.dataclass(frozen=True)
class Trial:
    """One evaluated configuration."""

    choice: tuple[int, ...]
    cost: float
    quality: float
    drop: float
    passed: bool
    stage: str  # "bisection", "cheapest" or "repair"


def quality_of(value: Any, where: str) -> float:
    """``eval_fn``'s result as a float; a CompactnnError naming what it returned (``where``:
    on which model) unless it is one finite number (an int, float, numpy or 0-d tensor).

    Example:
        >>> quality_of(97.5, "the float model")
        97.5
    """
    try:
        ok = not isinstance(value, (bool, str, bytes)) and getattr(value, "ndim", 0) == 0
        number = float(value) if ok else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
        raise CompactnnError(
            f"eval_fn must return one finite number (higher is better, e.g. top-1 in percent); "
            f"it returned {shown} on {where}: end it with `return accuracy`."
        )
    return number


def check_max_drop(max_drop: Any) -> float:
    """``max_drop`` as a float; a CompactnnError unless it is a finite number >= 0.

    Example:
        >>> check_max_drop(0.5)
        0.5
    """
    ok = isinstance(max_drop, (int, float, np.number)) and not isinstance(max_drop, bool)
    if not ok or not math.isfinite(float(max_drop)) or max_drop < 0:
        raise CompactnnError(
            f"max_drop={max_drop!r} must be a number >= 0: the largest quality drop you "
            "accept, in eval_fn's units (e.g. 0.5 for half a top-1 point)."
        )
    return float(max_drop)


def check_drop_vs_baseline(max_drop: float, baseline: float) -> None:
    """Refuse a ``max_drop`` at least as large as a positive ``baseline``: with a
    non-negative metric (accuracy, top-1 in percent) every compressed model would pass,
    a quality of 0 included, so the bound says nothing (a unit mix-up, e.g. 50 meant as
    0.5 points, or a fraction's metric given a drop in percent).

    Example:
        >>> check_drop_vs_baseline(0.5, 97.5)
    """
    if baseline > 0 and max_drop >= baseline:
        raise CompactnnError(
            f"max_drop={max_drop:g} is not below the float model's quality {baseline:.4g}: "
            f"even a quality of 0 would pass. Give the largest drop you accept in eval_fn's "
            f"units (e.g. max_drop={baseline * 0.01:.2g}, 1% of it)."
        )


def _upgrade(choice: np.ndarray, scores: np.ndarray, cost: np.ndarray, allowed: np.ndarray):
    """``choice`` with one layer moved to a costlier allowed format, the one that removes the
    most sensitivity per unit of extra cost; None when no move lowers the sensitivity."""
    best, best_gain = None, 0.0
    for layer, f in enumerate(choice):
        for g in range(scores.shape[1]):
            extra = cost[layer, g] - cost[layer, f]
            gain = scores[layer, f] - scores[layer, g]
            if allowed[layer, g] and extra > 0 and gain > 0 and gain / extra > best_gain:
                best, best_gain = (layer, g), gain / extra
    if best is None:
        return None
    out = choice.copy()
    out[best[0]] = best[1]
    return out


def accuracy_search(
    solve: Callable[[float], np.ndarray],
    evaluate: Callable[[np.ndarray], float],
    scores: np.ndarray,
    cost: np.ndarray,
    allowed: np.ndarray,
    *,
    baseline: float,
    max_drop: float,
    max_evals: int = 8,
    bisection_evals: int | None = None,
) -> tuple[np.ndarray | None, list[Trial]]:
    """The cheapest evaluated allocation within ``max_drop`` of ``baseline``, and all trials.

    Args:
        solve: budget -> allocation (``(L,)`` format indices), e.g. a bound
            :func:`~compactnn.mixed_precision.allocate.allocate`.
        evaluate: allocation -> quality (higher is better), one full evaluation.
        scores: ``(L, F)`` sensitivities (for the repair moves).
        cost: ``(L, F)`` cost being minimised (bytes, BOPs or latency).
        allowed: ``(L, F)`` allowed choices.
        baseline: the float model's quality.
        max_drop: the largest allowed ``baseline - quality``.
        max_evals: full evaluations in all.
        bisection_evals: of which bisection may use once a trial cheaper than the best passing
            one has failed, the rest being kept for repair (default: ``max_evals - 2``, at
            least 1). While every trial passes, bisection may use all ``max_evals`` but the
            last, which evaluates the cheapest assignment.

    Returns:
        The best passing allocation (None if none passed) and every trial in order.
    """
    if max_drop < 0:
        raise CompactnnError(f"max_drop={max_drop} must be >= 0.")
    check_max_evals(max_evals)
    bisection_evals = max(1, max_evals - 2) if bisection_evals is None else bisection_evals
    trials: list[Trial] = []
    seen: dict[tuple[int, ...], Trial] = {}

    def trial(choice: np.ndarray, stage: str) -> Trial:
        key = tuple(int(c) for c in choice)
        if key not in seen:
            q = float(evaluate(choice))
            c = float(cost[np.arange(len(choice)), choice].sum())
            t = Trial(key, c, q, baseline - q, baseline - q <= max_drop, stage)
            seen[key] = t
            trials.append(t)
        return seen[key]

    lo = float(np.where(allowed, cost, np.inf).min(axis=1).sum())
    hi = float(np.where(allowed, cost, -np.inf).max(axis=1).sum())
    top = trial(solve(hi), "bisection")
    if not top.passed:  # even the largest configuration fails: nothing cheaper will pass
        return None, trials
    best = top

    def failing() -> list[Trial]:  # where repair would start from
        return [t for t in trials if not t.passed and t.cost < best.cost]

    for _ in range(64):  # budgets are continuous; stop on evaluations, not on width
        # keep evaluations back for repair only once there is something to repair
        limit = min(bisection_evals, max_evals) if failing() else max_evals
        if len(trials) >= limit or hi - lo <= 1e-6 * hi:
            break
        if len(trials) == max_evals - 1 and all(t.passed for t in trials):
            # the last evaluation of a run where all passed: the cheapest assignment (lo),
            # which bisection alone never reaches; if it fails, the best stands
            t = trial(solve(lo), "cheapest")
            best = min(best, t, key=lambda x: x.cost) if t.passed else best
            break
        mid = (lo + hi) / 2
        t = trial(solve(mid), "bisection")
        if t.passed:
            best = min(best, t, key=lambda x: x.cost)
            hi = mid
        else:
            lo = mid
    if failing():
        current = np.array(max(failing(), key=lambda t: t.cost).choice)
        while len(trials) < max_evals:
            current = _upgrade(current, scores, cost, allowed)
            if current is None:
                break
            c = float(cost[np.arange(len(current)), current].sum())
            if c >= best.cost:
                break
            t = trial(current, "repair")
            if t.passed:
                best = t
                break
    return np.array(best.choice), trials


def check_max_evals(max_evals: int) -> int:
    """``max_evals`` if it is an integer >= 1 (the full evaluations accuracy-aware mode runs).

    Example:
        >>> check_max_evals(0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: max_evals=0 must be an integer >= 1: ...
    """
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise CompactnnError(
            f"max_evals={max_evals!r} must be an integer >= 1: the compressed models eval_fn "
            "may score (e.g. 8)."
        )
    return max_evals


def trial_dict(t: Trial, names: list[str], formats: list[str]) -> dict:
    """One accuracy-aware trial as ``SearchResult.tried`` records it (layer -> format name)."""
    return {
        "stage": t.stage,
        "bytes": t.cost,
        "quality": t.quality,
        "drop": t.drop,
        "passed": t.passed,
        "assignment": {n: formats[j] for n, j in zip(names, t.choice, strict=True)},
    }
