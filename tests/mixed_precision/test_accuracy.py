import numpy as np
import pytest

from compactnn.errors import CompactnnError
from compactnn.mixed_precision.accuracy import accuracy_search
from compactnn.mixed_precision.allocate import allocate, assignment_total


def instance():
    rng = np.random.default_rng(1)
    true = rng.random((8, 4)) * np.array([3.0, 1.0, 0.3, 0.0]) * rng.random((8, 1)) * 4
    cost = np.tile(np.array([2.0, 3.0, 4.0, 8.0]), (8, 1))
    return true, cost, np.ones((8, 4), bool)


def test_cheapest_passing_within_eval_budget():
    true, cost, allowed = instance()
    noisy = true * np.random.default_rng(2).uniform(0.7, 1.3, true.shape)  # the proxy
    calls = []

    def evaluate(choice):
        calls.append(tuple(choice))
        return 100.0 - assignment_total(true, choice)

    def solve(b):
        return allocate(noisy, {"bytes": cost}, {"bytes": b}, allowed)

    best, trials = accuracy_search(
        solve, evaluate, noisy, cost, allowed, baseline=100.0, max_drop=1.0, max_evals=7
    )
    assert len(calls) == len(trials) <= 7 and len(set(calls)) == len(calls)
    assert assignment_total(true, best) <= 1.0
    passing = [t for t in trials if t.passed]
    assert assignment_total(cost, best) == min(t.cost for t in passing)
    assert assignment_total(cost, best) < cost[:, 3].sum()  # smaller than all-8-bit
    assert all(t.drop == pytest.approx(assignment_total(true, np.array(t.choice))) for t in trials)


def test_none_when_largest_fails():
    true, cost, allowed = instance()
    best, trials = accuracy_search(
        lambda b: np.full(8, 3), lambda c: 0.0, true, cost, allowed, baseline=1.0, max_drop=0.5
    )
    assert best is None and len(trials) == 1 and not trials[0].passed


def test_bad_arguments():
    true, cost, allowed = instance()
    with pytest.raises(CompactnnError, match="max_drop"):
        accuracy_search(None, None, true, cost, allowed, baseline=1.0, max_drop=-1)
