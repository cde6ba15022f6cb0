import itertools

import numpy as np
import pytest

from compactnn.errors import CompactnnError
from compactnn.mixed_precision.allocate import allocate, assignment_total, frontier


def brute_force(scores, costs, budgets, allowed):
    best, best_choice = np.inf, None
    for choice in itertools.product(range(scores.shape[1]), repeat=scores.shape[0]):
        c = np.array(choice)
        if not allowed[np.arange(len(c)), c].all():
            continue
        if any(assignment_total(costs[k], c) > b + 1e-9 for k, b in budgets.items()):
            continue
        s = assignment_total(scores, c)
        if s < best - 1e-12:
            best, best_choice = s, c
    return best, best_choice


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((5, 3)) * np.array([4.0, 2.0, 0.5])  # more bits, less error
    costs = {"bytes": rng.integers(1, 9, (5, 3)).astype(float), "bops": rng.random((5, 3))}
    allowed = rng.random((5, 3)) > 0.2
    allowed[:, 0] = True
    budgets = {
        "bytes": float(costs["bytes"][:, 0].sum() + 6),
        "bops": float(costs["bops"].sum() / 2),
    }
    want, _ = brute_force(scores, costs, budgets, allowed)
    if not np.isfinite(want):
        with pytest.raises(CompactnnError):
            allocate(scores, costs, budgets, allowed)
        return
    got = allocate(scores, costs, budgets, allowed)
    assert assignment_total(scores, got) == pytest.approx(want, abs=1e-9)
    assert allowed[np.arange(5), got].all()
    for k, b in budgets.items():
        assert assignment_total(costs[k], got) <= b + 1e-9


def test_budget_below_minimum_names_it():
    c = np.array([[1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(CompactnnError, match="smallest reachable 2"):
        allocate(np.zeros((2, 2)), {"bytes": c}, {"bytes": 1.5})


def test_layer_without_format_refused():
    allowed = np.array([[True, True], [False, False]])
    with pytest.raises(CompactnnError, match=r"layers \[1\] allow no format"):
        allocate(np.zeros((2, 2)), {"bytes": np.ones((2, 2))}, {"bytes": 9}, allowed)


def test_frontier_is_monotone():
    rng = np.random.default_rng(0)
    scores = np.sort(rng.random((6, 4)), axis=1)[:, ::-1].copy()
    cost = np.tile(np.array([2.0, 3.0, 4.0, 8.0]), (6, 1)) * rng.integers(1, 5, (6, 1))
    points = frontier(scores, cost, np.ones((6, 4), bool), 10)
    costs, preds = [p[0] for p in points], [p[1] for p in points]
    assert costs == sorted(costs) and preds == sorted(preds, reverse=True)
    assert preds[-1] == pytest.approx(scores[:, 3].sum())
