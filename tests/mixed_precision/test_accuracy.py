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


def bisection_reference(solve, cost, n_evals):
    """Cost of the cheapest allocation a pure bisection finds with ``n_evals`` evaluations
    when every trial passes: budgets ``hi, (lo + hi) / 2, ...``, repeats not counted."""
    lo, hi = cost.min(axis=1).sum(), cost.max(axis=1).sum()
    seen = {}
    budget = hi
    for _ in range(64):
        seen.setdefault(tuple(int(c) for c in solve(budget)), None)
        if len(seen) == n_evals:
            break
        budget = (lo + budget) / 2
    return min(assignment_total(cost, np.array(choice)) for choice in seen)


def counting_search(max_evals, passes, **kwargs):
    """``accuracy_search`` on :func:`instance` with ``passes(cost) -> bool`` as the evaluation;
    returns the best allocation's cost (None if none passed), the trials and the calls."""
    true, cost, allowed = instance()
    calls = []

    def evaluate(choice):
        calls.append(tuple(int(c) for c in choice))
        return 0.0 if passes(assignment_total(cost, choice)) else -1.0

    def solve(b):
        return allocate(true, {"bytes": cost}, {"bytes": b}, allowed)

    best, trials = accuracy_search(
        solve,
        evaluate,
        true,
        cost,
        allowed,
        baseline=0.0,
        max_drop=0.5,
        max_evals=max_evals,
        **kwargs,
    )
    return (None if best is None else assignment_total(cost, best)), trials, calls


def test_eval_count_never_exceeds_max_evals():
    for threshold in range(14, 68, 2):  # from "every trial passes" to "even the top fails"
        for max_evals in range(1, 11):
            best, trials, calls = counting_search(max_evals, lambda c, t=threshold: c >= t)
            assert len(calls) == len(trials) <= max_evals and len(set(calls)) == len(calls)
            passing = [t.cost for t in trials if t.passed]
            assert best == (min(passing) if passing else None)
            if any(t.stage == "repair" for t in trials):  # repair starts from a failure
                assert any(not t.passed and t.stage == "bisection" for t in trials)


def test_all_passing_spends_the_budget_on_bisection_then_the_cheapest():
    true, cost, allowed = instance()
    cheapest = cost.min(axis=1).sum()  # 16: every layer at its smallest format

    def solve(b):
        return allocate(true, {"bytes": cost}, {"bytes": b}, allowed)

    for max_evals in range(1, 9):
        best, trials, calls = counting_search(max_evals, lambda c: True)
        assert len(calls) == len(trials) <= max_evals
        if max_evals == 1:
            assert best == cost.max(axis=1).sum() and trials[0].stage == "bisection"
            continue
        # before, up to 7 passing evaluations stopped short of the cheapest (17 > 16 at 7)
        assert best == cheapest == trials[-1].cost and len(trials) == min(max_evals, 7)
        assert all(t.stage == "bisection" for t in trials[:-1])
        if max_evals < 8:  # at 8 bisection reaches the cheapest itself on the 7th
            assert trials[-1].stage == "cheapest"
    # every evaluation passes but the cheapest: the bisection result stands
    best, trials, _ = counting_search(7, lambda c: c > cheapest)
    assert [t.stage for t in trials] == ["bisection"] * 6 + ["cheapest"]
    assert [t.passed for t in trials] == [True] * 6 + [False]
    assert best == bisection_reference(solve, cost, 6) == 17.0
    # an explicit bisection share also holds back nothing while there is nothing to repair
    best, trials, _ = counting_search(5, lambda c: c > cheapest, bisection_evals=1)
    assert len(trials) == 5 and best == bisection_reference(solve, cost, 4)


def test_failure_within_bisection_share_keeps_evaluations_for_repair():
    # 27 fails on the third evaluation: bisection stops at max_evals - 2 = 4, repair gets 2
    best, trials, _ = counting_search(6, lambda c: c >= 34)
    assert [t.stage for t in trials] == ["bisection"] * 4 + ["repair"]
    assert [t.passed for t in trials] == [True, True, False, False, True]
    assert best == trials[-1].cost == 37.0
    # repair that never reaches a passing allocation uses the remaining evaluations, no more
    best, trials, _ = counting_search(6, lambda c: c >= 26)
    assert [t.stage for t in trials] == ["bisection"] * 4 + ["repair"] * 2
    assert best == 27.0 and not any(t.passed for t in trials if t.stage == "repair")


def test_late_failure_is_repaired_with_the_evaluations_left():
    # every trial passes until the fifth, past the bisection share: the one left goes to repair
    best, trials, _ = counting_search(6, lambda c: c >= 20)
    assert [t.stage for t in trials] == ["bisection"] * 5 + ["repair"]
    assert [t.passed for t in trials] == [True] * 4 + [False, True]
    assert best == 21.0
