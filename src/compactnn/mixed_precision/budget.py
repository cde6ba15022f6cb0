"""Budget bookkeeping of a search: the limits as given, the reachability check before the
allocation, and the verdict of the measured latency check after it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.mixed_precision.allocate import min_cost
from compactnn.mixed_precision.result import Budget


def as_budget(budget) -> Budget | None:
    """``budget`` as a :class:`Budget`: one, None, or a dict of its fields
    (``{"avg_bits": 3}``); anything else (``budget=3``: in which unit?) is refused.

    Example:
        >>> as_budget({"avg_bits": 3})
        Budget(max_bytes=None, avg_bits=3, max_bops=None, max_latency_ratio=None)
    """
    if budget is None or isinstance(budget, Budget):
        return budget
    fields = [f.name for f in dataclasses.fields(Budget)]
    if isinstance(budget, dict):
        unknown = [k for k in budget if k not in fields]
        if not unknown:
            return Budget(**budget)
        raise CompactnnError(
            f"budget={budget!r}: unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; a budget dict takes {', '.join(fields)}."
        )
    raise CompactnnError(
        f"budget={budget!r} is not a Budget: pass Budget(avg_bits=3) (or max_bytes=, "
        "max_bops=, max_latency_ratio=), or a dict of those fields such as {'avg_bits': 3}."
    )


def check_first_last_min_bits(bits) -> None:
    """``first_last_min_bits`` is None or a whole number of weight bits, 1 to 16."""
    ok = isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 16
    if bits is not None and not ok:
        raise CompactnnError(
            f"first_last_min_bits={bits!r} must be a whole number of weight bits from 1 to 16 "
            "(e.g. 8), or None for no end-layer rule."
        )


def checked_request(budget, first_last_min_bits) -> Budget | None:
    """The search's budget as a :class:`Budget` (:func:`as_budget`), its
    ``first_last_min_bits`` checked (:func:`check_first_last_min_bits`)."""
    check_first_last_min_bits(first_last_min_bits)
    return as_budget(budget)


def budget_given(budget: Budget | None, max_drop: float | None, max_evals: int) -> dict:
    """The limits a search ran under, as given: the set :class:`Budget` fields, and
    ``max_drop`` with ``max_evals`` in accuracy-aware mode (``SearchResult.budget``).

    Example:
        >>> budget_given(Budget(avg_bits=3), None, 8)
        {'avg_bits': 3}
    """
    given = {} if budget is None else dataclasses.asdict(budget)
    out = {k: v for k, v in given.items() if v is not None}
    if max_drop is not None:
        out.update(max_drop=max_drop, max_evals=max_evals)
    return out


# budget field -> (cost table, per-unit divisor name, unit words)
_BUDGET_UNITS = {
    "max_bytes": ("bytes", None, "bytes of the searched layers"),
    "avg_bits": ("code_bits", "weights", "bits/weight"),
    "max_bops": ("bops", None, "bit-operations per sample"),
    "max_latency_ratio": ("latency", "ref_ms", "x the widest format's latency (per-layer table)"),
}


def group_floor(table: dict[str, np.ndarray], allowed: np.ndarray, found: list, key: str) -> float:
    """The cheapest reachable total of cost ``key``: every layer and residual group at its
    cheapest allowed option."""
    floor = min_cost(table[key], allowed)
    return floor + sum(float(g.costs[key].min()) for g in found if key in g.costs)


def _limits(
    budget: Budget | None, table: dict[str, np.ndarray], n_weights: float, ref_ms: float | None
) -> Iterator[tuple[str, float, str, float, str]]:
    """Each limit ``budget`` sets on a cost the table has: ``(field, given, key, divisor,
    unit)``, the divisor turning the table's summed cost into the budget's unit."""
    if budget is None:
        return
    divisors = {"weights": n_weights, "ref_ms": ref_ms}
    for field, (key, per, unit) in _BUDGET_UNITS.items():
        given = getattr(budget, field)
        if given is not None and key in table:
            yield field, given, key, (divisors[per] if per else 1.0), unit


def check_reachable(
    budget: Budget | None,
    table: dict[str, np.ndarray],
    allowed: np.ndarray,
    found: list,
    n_weights: float,
    ref_ms: float | None,
) -> None:
    """Refuse a budget below the cheapest allowed assignment, in the budget's own unit
    (``avg_bits=1.5`` is compared in bits per weight, not in summed code bits)."""
    for field, given, key, divisor, unit in _limits(budget, table, n_weights, ref_ms):
        floor = group_floor(table, allowed, found, key) / divisor
        if given >= floor - 1e-9 * max(1.0, abs(floor)):
            continue
        digits = 2 if field in ("avg_bits", "max_latency_ratio") else 0
        while f"{given:,.{digits}f}" == f"{floor:,.{digits}f}" and digits < 8:
            digits += 1  # 1.995 vs 2.000: show the digit that differs
        raise CompactnnError(
            f"budget {field}: {given:,.{digits}f} {unit} is below the smallest reachable "
            f"{floor:,.{digits}f} (every layer at its cheapest allowed format): raise the "
            "budget or add a cheaper format."
        )


def warn_unbound(
    budget: Budget | None,
    table: dict[str, np.ndarray],
    allowed: np.ndarray,
    found: list,
    n_weights: float,
    ref_ms: float | None,
) -> None:
    """Warn, per limit, when a budget is at or above the dearest allowed assignment (every
    layer and group at its most expensive allowed option): that limit does not bind
    (``avg_bits=300`` with 8-bit formats at most; ``max_latency_ratio=5`` when no assignment
    is 5x slower than the widest format in the per-layer table)."""
    for field, given, key, divisor, unit in _limits(budget, table, n_weights, ref_ms):
        most = float(np.where(allowed, table[key], -np.inf).max(axis=1).sum())
        most += sum(float(g.costs[key].max()) for g in found if key in g.costs)
        most /= divisor
        if given >= most:
            digits = 2 if field in ("avg_bits", "max_latency_ratio") else 0
            warnings.warn(
                f"budget {field}: {given:,.{digits}f} {unit} does not bind: every layer at its "
                f"largest allowed format takes {most:,.{digits}f}; lower it to trade size "
                "(or speed) for quality.",
                stacklevel=user_stacklevel(),
            )


def worst_ratio(check: dict[str, Any]) -> float:
    """The ratio a latency budget is judged on: the larger of the wall-time and CPU-time
    ratios of the whole-model check (a missing CPU time is ignored).

    Example:
        >>> worst_ratio({"measured_ratio": 0.9, "cpu_ratio": float("nan")})
        0.9
    """
    ratios = [check.get(k, math.nan) for k in ("measured_ratio", "cpu_ratio")]
    return max((r for r in ratios if math.isfinite(r)), default=math.nan)


def tighter_failure(tighter_ms: float, floor_ms: float) -> str:
    """Why a latency re-solve under ``tighter_ms`` found nothing (``floor_ms``: the table's
    fastest reachable assignment)."""
    if tighter_ms < floor_ms:
        return (
            f"the re-solve under the tightened per-layer limit {tighter_ms:.3g} ms had no "
            f"solution: the table's fastest assignment is {floor_ms:.3g} ms"
        )
    return (
        f"the re-solve under the tightened per-layer limit {tighter_ms:.3g} ms had no "
        "solution within the other limits (bytes, bits, BOPs)"
    )


def latency_verdict(check: dict[str, Any], limit: float, stop: str | None) -> dict[str, Any]:
    """Whether the measured check meets ``max_latency_ratio=limit`` (``met``); when it does
    not, a warning naming measured vs budget and ``stop`` (why no further round was tried),
    also recorded as ``not_met``."""
    worst = worst_ratio(check)
    if worst <= limit:
        return {"met": True, "measured_ratio": worst}
    why = (
        f"the deployed recipe measured {worst:.2f}x {check['reference']} (wall "
        f"{check['measured_ratio']:.2f}, CPU {check['cpu_ratio']:.2f}: the larger counts) "
        f"against max_latency_ratio {limit:g}, and {stop}; add a faster format (e.g. a "
        "larger ch<P>+ ratio) or raise the budget."
    )
    warnings.warn(f"latency budget NOT met: {why}", stacklevel=user_stacklevel())
    return {"met": False, "measured_ratio": worst, "not_met": why}
